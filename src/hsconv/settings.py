"""Every stage's settings, whose defaults live here and nowhere else: torch-free, so the CLI's parser and the config
checks read them without importing the model code.

Each config section a stage reads is one frozen dataclass here; a rule passes its section whole as JSON
(``--settings``), :func:`from_section` checks it (unknown keys, types, ranges, each refused naming the key), and the
CLI's flags for a stage are built from the same fields (``hsconv.cli``). The schema's defaults, ranges and choices for
these keys are tested equal to the fields' (tests/test_config_schema.py).
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Literal, Union

from hsconv.errors import InputError
from hsconv.names import (  # noqa: F401
    Boundary,
    Convention,
    EvaluationKind,
    ExitSampling,
    FrozenPart,
    KLDirection,
    LossImplementation,
    Overflow,
    CompileMode,
    TrainingPrecision,
    Zeta2Measure,
    Zeta2Penalty,
    choices,
)


class SettingsError(InputError):
    """A setting of the wrong type or out of range; the culprit is its config key (``section.key``) or flag."""


def setting(default, help: str, **bounds):
    """A settings field: its default, what it means (the CLI's help), and the range of a number (or of each number
    in a list) in the schema's words: ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``, or the
    ``choices`` of a number (names are ``Literal`` types instead)."""
    return field(default=default, metadata={"help": help, **bounds})


def from_section(cls, values: dict, section: str):
    """A settings dataclass from its config section (or part of it): unknown keys, wrong types and values out of
    range are refused, each naming ``section.key``; lists become tuples."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise SettingsError(f"unknown setting(s) {', '.join(unknown)}", section,
                            f"see the {section} section of workflow/schemas/config.schema.yaml")
    checked = {}
    for item in fields(cls):
        if item.name in values:
            checked[item.name] = check_value(values[item.name], hints[item.name], item.metadata,
                                             f"{section}.{item.name}")
    try:
        return cls(**checked)
    except InputError:  # the dataclass's own checks, already naming the key
        raise
    except ValueError as error:  # a value of the right type and range that the dataclass's own checks refuse
        raise SettingsError(str(error), section) from None


def check_value(value, kind, bounds: dict, culprit: str):
    """The value, lists made tuples, if it fits the field's annotation and bounds; else :class:`SettingsError`."""
    if not fits(value, kind):
        raise SettingsError(f"{value!r} is not {describe(kind)}", culprit)
    if "choices" in bounds and value not in bounds["choices"]:
        raise SettingsError(f"{value!r} is not one of {', '.join(map(str, bounds['choices']))}", culprit)
    numbers = value if isinstance(value, (list, tuple)) else [value]
    for number in numbers:
        problem = out_of_range(number, bounds)
        if problem:
            raise SettingsError(f"{number!r} is out of range: {problem}", culprit)
    return tuple(value) if isinstance(value, list) else value


def fits(value, kind) -> bool:
    """Whether a JSON value fits an annotation: int, float, str, bool, None, Literal, tuple[X, ...] and unions."""
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        return any(fits(value, option) for option in typing.get_args(kind))
    if origin is Literal:
        return isinstance(value, str) and value in typing.get_args(kind)
    if origin is tuple:
        element, *rest = typing.get_args(kind)
        return isinstance(value, (list, tuple)) and (rest == [Ellipsis] or len(value) == 1 + len(rest)) and all(
            fits(item, element) for item in value)
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def describe(kind) -> str:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(option) for option in typing.get_args(kind))
    if origin is Literal:
        return "one of " + ", ".join(typing.get_args(kind))
    if origin is tuple:
        return f"a list, each {describe(typing.get_args(kind)[0])}"
    return "null" if kind is type(None) else f"a{'n' if kind is int else ''} {kind.__name__}"


def out_of_range(number, bounds: dict) -> str | None:
    """What is wrong with a number given the schema-style bounds, or None."""
    if not isinstance(number, (int, float)) or isinstance(number, bool):
        return None
    tests = {"minimum": (lambda b: number >= b, "at least"), "maximum": (lambda b: number <= b, "at most"),
             "exclusiveMinimum": (lambda b: number > b, "more than"),
             "exclusiveMaximum": (lambda b: number < b, "less than")}
    for key, (holds, words) in tests.items():
        if key in bounds and not holds(bounds[key]):
            return f"give {words} {bounds[key]}"
    return None


def defaults(cls) -> dict:
    """Every field's default (the settings a stage runs with when its section is empty)."""
    return {item.name: item.default for item in fields(cls) if item.default is not MISSING}


@dataclass(frozen=True)
class CorpusSettings:
    """How training text is sampled (config section ``corpus``, less its ``source``; stage ``sample-corpus``)."""

    documents: int | None = setting(None, "documents to draw (none: all)", minimum=1)
    seed: int = setting(0, "seed of the streaming shuffle", minimum=0)
    min_int_score: int | None = setting(None, "keep documents whose int_score is at least this (where the source "
                                              "has it; FineWeb-Edu has 0-5)", minimum=0)
    shuffle_buffer: int = setting(10000, "documents held for the seeded streaming shuffle (bounds memory)", minimum=1)
    shard_documents: int = setting(10000, "documents per Parquet shard", minimum=1)


@dataclass(frozen=True)
class PackingSettings:
    """Tokenisation and packing of the corpus (config section ``packing``, stage ``pack-tokens``)."""

    sequence_length: int = setting(1024, "tokens per training sequence", minimum=2)
    token_budget: int = setting(10_000_000, "tokens to pack (the paper: 10M); whole sequences", minimum=2)
    boundary: Boundary = setting("cut", "cut: fill every sequence, cutting the last document; document: stop at the "
                                        "last whole document")


@dataclass(frozen=True)
class HiddenStatesSettings:
    """The per-layer hidden-state dump (config section ``hidden_states``, less ``datasets``; stage
    ``dump-hidden-states``)."""

    batch_size: int = setting(8, "sequences per forward pass", minimum=1)
    max_tokens: int | None = setting(None, "longest sequence per forward pass (none: the model's context length)",
                                     minimum=2)  # one token has no movement to measure
    overflow: Overflow = setting("error", "a document longer than max_tokens is refused (error), cut (truncate) or "
                                          "cut into pieces (split)")
    exclude_special_tokens: bool = setting(True, "leave special tokens (a BOS the tokenizer adds) out of every "
                                                 "statistic")


@dataclass(frozen=True)
class MetricsSettings:
    """Statistics of the measured movement and of paired differences (config section ``metrics``; stages
    ``compute-convergence``, ``compare-convergence``, ``paired-differences``, ``tabulate-variants``)."""

    quantiles: tuple[float, ...] = setting((0.1, 0.5, 0.9), "per-token quantiles of D reported for each layer",
                                           exclusiveMinimum=0, exclusiveMaximum=1)
    bootstrap_samples: int = setting(1000, "resamples of documents for intervals", minimum=10)
    confidence: float = setting(0.95, "level of the bootstrap intervals", exclusiveMinimum=0, exclusiveMaximum=1)
    seed: int = setting(0, "seed of the bootstrap", minimum=0)


@dataclass(frozen=True)
class EvaluationSettings:
    """lm-eval at every exit (config section ``evaluation``, less which data sets and limits; stage
    ``evaluate-layers``)."""

    layers: tuple[int, ...] | None = setting(None, "exits to evaluate (0 = embeddings, L = the output; none: all)",
                                             minimum=0)
    batch_size: int = setting(8, "requests per forward pass (lm-eval's batch_size)", minimum=1)
    bootstrap_iters: int = setting(1000, "lm-eval's bootstrap resamples for standard errors of perplexities",
                                   minimum=0)


@dataclass(frozen=True)
class EarlyExitSettings:
    """Early exit after convergence (config section ``early_exit``; stages ``prune-model``,
    ``tabulate-early-exit``)."""

    keep_fraction: float = setting(0.75, "a model cut after round(keep_fraction × L) layers is evaluated with stock "
                                         "lm-eval beside the logit lens at that exit", exclusiveMinimum=0, maximum=1)
    tolerances: tuple[float, ...] = setting((0.01, 0.05), "relative tolerances for the shallowest exit within the "
                                                          "full model's quality", exclusiveMinimum=0,
                                            exclusiveMaximum=1)


@dataclass(frozen=True)
class LayerRelevanceSettings:
    """Each block removed, beside its movement (config section ``layer_relevance``, less ``models`` and
    ``datasets``; stage ``layer-relevance``)."""

    prune_max_layers: int = setting(8, "the greedy prunings remove up to this many blocks together (capped at L − 1)",
                                    minimum=1)
    batch_tokens: int = setting(8192, "padded tokens per forward pass (requests are packed longest first)", minimum=1)
    window_tokens: int | None = setting(None, "lm-eval's max_length: the longest window, so WikiText is scored in "
                                              "rolling windows of this many tokens (none: the model's context)",
                                        minimum=2)
    precision: TrainingPrecision = setting("auto", "the models' precision: auto is bfloat16 where the device "
                                                   "multiplies it natively (AMX, avx512_bf16, a CUDA GPU), else float32")


@dataclass(frozen=True)
class SentenceSettings:
    """The one sentence Figs. 4 and 7 trace (config section ``sentence``; stage ``trace-sentence``)."""

    text: str = setting("The curious cat climbed up the tall tree, carefully balancing on each thin branch, until it "
                        "suddenly noticed a small bird sitting quietly at the top.", "the sentence")
    target: str = setting(" at the top", "its last words whose prediction is traced, with the leading space")
    pca_exclude_first: bool = setting(True, "leave the first position (the attention sink) out of the PCA")


@dataclass(frozen=True)
class TunedLensSettings:
    """The tuned-lens baseline's training (config section ``tuned_lens``, less ``models``; stage
    ``train-tuned-lens``)."""

    steps: int = setting(250, "optimizer steps (Adam)", minimum=1)
    batch_size: int = setting(8, "packed sequences per step", minimum=1)
    micro_batch_size: int | None = setting(None, "sequences per forward pass (gradients accumulate; none: the whole "
                                                 "batch)", minimum=1)
    learning_rate: float = setting(1e-3, "Adam's learning rate", exclusiveMinimum=0)
    holdout_sequences: int = setting(4, "packed sequences held out to report each layer's KL before and after",
                                     minimum=1)
    seed: int = setting(0, "seed of the translators' initialisation and the batches", minimum=0)


# The distillation's settings (config section ``distill``, flat): the loss's and the trainer's.
KL_DIRECTIONS = choices(KLDirection)
MOVEMENT_CONVENTIONS = choices(Convention)
ZETA2_MEASURES = choices(Zeta2Measure)
ZETA2_PENALTIES = choices(Zeta2Penalty)
EXIT_SAMPLING = choices(ExitSampling)
# the schemes that compute the output exit every step and draw the rest: they need at least one other exit
KEEP_LAST_SAMPLING = tuple(scheme for scheme in EXIT_SAMPLING if scheme.endswith("_keep_last"))
LOSS_IMPLEMENTATIONS = choices(LossImplementation)
PRECISIONS = choices(TrainingPrecision)
COMPILE_MODES = choices(CompileMode)


def check_settings(direction: str, movement_convention: str) -> None:
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"kl_direction {direction!r} is not one of {', '.join(KL_DIRECTIONS)}")
    if movement_convention not in MOVEMENT_CONVENTIONS:
        raise ValueError(f"movement_convention {movement_convention!r} is not one of "
                         f"{', '.join(MOVEMENT_CONVENTIONS)}")


@dataclass(frozen=True)
class LossSettings:
    """The self-distillation loss ζ = ζ1 + α ζ2 (config section ``distill``, with the trainer's settings)."""

    alpha: float = setting(1.0, "weight of the hidden-state term ζ2", minimum=0)
    k: float = setting(0.25, "layer weights w_l = softmax(k l); 0 weighs all layers alike", minimum=0)
    kl_direction: KLDirection = setting("student_target", "student_target: KL(q_l || q_target), eq. 4 as written; "
                                                          "target_student: the usual distillation direction")
    movement_convention: Convention = setting("hf", "which h_L enters ζ2: after the final norm (hf) or before it "
                                                    "(pre_norm)")
    chunk_tokens: int = setting(256, "tokens per chunk of the per-layer KL (bounds the loss's memory)", minimum=1)
    implementation: LossImplementation = setting("fused", "fused: chunked, memory-efficient; reference: every "
                                                          "layer's logits at once (for checks)")
    exit_samples: int | None = setting(None, "ζ1 on this many exits per forward pass, an unbiased estimate (none: "
                                             "all, the exact loss)", minimum=1)
    exit_sampling: ExitSampling = setting("uniform", "how the sampled exits are drawn")
    # The frozen model's distribution read from a cache of its k most likely tokens per position (written once by
    # `hsconv cache-teacher`), KL folded onto those k and one bucket; None: recomputed exactly in every step.
    teacher_top_k: int | None = setting(None, "read the frozen model's top-k distribution from a cache (none: "
                                              "recompute it every step)", minimum=1)
    zeta2_measure: Zeta2Measure = setting("relative_step", "ζ2's step between adjacent states")
    zeta2_penalty: Zeta2Penalty = setting("step", "step: Σ w_l s_l, every step (the paper); rise: Σ w_l max(0, s_l − "
                                                  "s_{l−1}), only a step larger than the one before it")
    # β of ζ1 + β KL_L: the output exit's KL weighed again on top of its layer weight w_L, so that holding the model's
    # own output to the target does not depend on k (0: the paper's loss).
    output_kl_weight: float = setting(0.0, "extra weight β on the output exit's KL, outside the layer weights "
                                           "(0: the paper's loss)", minimum=0)

    def __post_init__(self):
        check_settings(self.kl_direction, self.movement_convention)
        if self.output_kl_weight < 0:
            raise ValueError(f"output_kl_weight must be at least 0, got {self.output_kl_weight}")
        if self.zeta2_measure not in ZETA2_MEASURES:
            raise ValueError(f"zeta2_measure {self.zeta2_measure!r} is not one of {', '.join(ZETA2_MEASURES)}")
        if self.zeta2_penalty not in ZETA2_PENALTIES:
            raise ValueError(f"zeta2_penalty {self.zeta2_penalty!r} is not one of {', '.join(ZETA2_PENALTIES)}")
        if self.implementation not in LOSS_IMPLEMENTATIONS:
            raise ValueError(f"loss implementation {self.implementation!r} is not one of "
                             f"{', '.join(LOSS_IMPLEMENTATIONS)}")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        if self.exit_samples is not None and self.exit_samples < 1:
            raise ValueError(f"exit_samples must be at least 1 (or null for every exit), got {self.exit_samples}")
        if self.exit_sampling not in EXIT_SAMPLING:
            raise ValueError(f"exit_sampling {self.exit_sampling!r} is not one of {', '.join(EXIT_SAMPLING)}")
        if self.exit_sampling in KEEP_LAST_SAMPLING and self.exit_samples is not None and self.exit_samples < 2:
            raise ValueError(f"exit_sampling {self.exit_sampling} needs exit_samples >= 2 (the output exit and at "
                             "least one other)")
        if self.implementation == "reference" and self.exit_samples is not None:
            raise ValueError("exit_samples needs the fused loss (the reference loss computes every exit)")
        if self.teacher_top_k is not None and self.teacher_top_k < 1:
            raise ValueError(f"teacher_top_k must be at least 1 (or null to recompute the teacher), got "
                             f"{self.teacher_top_k}")
        if self.implementation == "reference" and self.teacher_top_k is not None:
            raise ValueError("teacher_top_k needs the fused loss (the reference loss recomputes the teacher)")


class TrainingError(InputError):
    """Settings or data that cannot train; the message names the setting or file."""


@dataclass(frozen=True)
class TrainSettings:
    """The trainer's settings (config section ``distill``, with the loss's)."""

    batch_size: int = setting(128, "sequences per optimizer step, over all ranks and micro-batches (the paper: 128)",
                              minimum=1)
    micro_batch_size: int = setting(4, "sequences per forward pass on one rank", minimum=1)
    epochs: int = setting(1, "passes over the packed corpus", minimum=1)
    max_steps: int | None = setting(None, "stop early (the schedule still spans all epochs' steps)", minimum=1)
    learning_rate: float = setting(1e-4, "AdamW's peak learning rate", exclusiveMinimum=0)
    min_lr_ratio: float = setting(0.0, "the cosine decays to learning_rate × this", minimum=0, maximum=1)
    warmup_steps: int = setting(0, "linear warm-up steps", minimum=0)
    weight_decay: float = setting(0.0, "AdamW's weight decay", minimum=0)
    adam_betas: tuple[float, float] = setting((0.9, 0.999), "AdamW's betas", minimum=0, exclusiveMaximum=1)
    grad_clip: float = setting(1.0, "clip the global gradient norm to this", exclusiveMinimum=0)
    seed: int = setting(0, "seed of the data order and of exit sampling", minimum=0)
    zero_stage: int | Literal["auto"] = setting(
        "auto", "DeepSpeed ZeRO stage; auto: the fastest per step (hsconv.distill.train.resolve_zero_stage): bf16 "
                "1 (its bf16 optimizer) without accumulation, else 2; float32 0 on one rank, 2 on several; 2 with "
                "offload_optimizer", choices=("auto", 0, 1, 2, 3))
    offload_optimizer: bool = setting(False, "ZeRO-Offload of the optimizer state to CPU memory")
    precision: TrainingPrecision = setting("auto", "auto: bfloat16 where the device multiplies it natively (a CUDA GPU "
                                                   "with bf16, a CPU with AMX or avx512_bf16), float32 elsewhere")
    gradient_checkpointing: bool = setting(False, "recompute the student's layers in backward")
    compile: CompileMode = setting("auto", "torch.compile the decoder layers and the loss's vocabulary-sized kernels: "
                                           "auto where a chunk of logits holds 4M elements or more (a real model, "
                                           "not a test one), the layers only where they are not checkpointed and "
                                           "ZeRO's stage is below 3; always; never")
    frozen: tuple[FrozenPart, ...] = setting((), "parts of the student left as they are: embeddings (with a tied LM "
                                                 "head), final_norm (its gain)")
    checkpoint_every: int = setting(50, "optimizer steps between checkpoints", minimum=1)
    keep_checkpoints: int = setting(2, "checkpoints kept (the newest)", minimum=1)
    deterministic: bool = setting(True, "deterministic kernels (a resumed run then matches an uninterrupted one)")

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise TrainingError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.compile not in COMPILE_MODES:
            raise TrainingError(f"compile {self.compile!r} is not one of {', '.join(COMPILE_MODES)}")
        if self.zero_stage not in ("auto", 0, 1, 2, 3):
            raise TrainingError(f"zero_stage must be auto, 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise TrainingError("offload_optimizer needs zero_stage 1, 2, 3 or auto (ZeRO-Offload is part of ZeRO)")
        for name in ("batch_size", "micro_batch_size", "epochs", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class DistillSettings:
    loss: LossSettings = field(default_factory=LossSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    @classmethod
    def from_dict(cls, settings: dict) -> "DistillSettings":
        """From the config's ``distill`` section (keys of both dataclasses, flat): unknown keys, wrong types and values
        out of range are refused, naming ``distill.key``."""
        loss_keys = LossSettings.__dataclass_fields__.keys()
        train_keys = TrainSettings.__dataclass_fields__.keys()
        unknown = set(settings) - set(loss_keys) - set(train_keys)
        if unknown:
            raise TrainingError(f"unknown distillation setting(s): {', '.join(sorted(unknown))}", "distill",
                                "see the distill section of workflow/schemas/config.schema.yaml")
        try:
            return cls(loss=from_section(LossSettings, {key: settings[key] for key in loss_keys if key in settings},
                                         "distill"),
                       train=from_section(TrainSettings, {key: settings[key] for key in train_keys if key in settings},
                                          "distill"))
        except SettingsError as error:
            raise TrainingError(error.what, error.culprit, error.fix) from None

    def to_dict(self) -> dict:
        return {**asdict(self.loss), **asdict(self.train)}


# The config section each stage's settings come from (``@flags(section=...)`` of the stage functions).
SECTIONS = {"corpus": CorpusSettings, "packing": PackingSettings, "hidden_states": HiddenStatesSettings,
            "metrics": MetricsSettings, "evaluation": EvaluationSettings, "early_exit": EarlyExitSettings,
            "layer_relevance": LayerRelevanceSettings, "sentence": SentenceSettings, "tuned_lens": TunedLensSettings}
