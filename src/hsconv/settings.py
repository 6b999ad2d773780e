"""Stage settings whose defaults live here and nowhere else: torch-free, so the CLI's parser and the config checks
read them without importing the model code. The schema's defaults for the same keys are tested equal to these
(tests/test_config_schema.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hsconv.errors import InputError


@dataclass(frozen=True)
class TunedLensSettings:
    """The tuned-lens baseline's training (config section ``tuned_lens``, stage ``train-tuned-lens``)."""

    steps: int = 250
    """Optimizer steps (Adam)."""
    batch_size: int = 8
    """Packed sequences per step."""
    micro_batch_size: int | None = None
    """Sequences per forward pass (gradients accumulate); None: the whole batch."""
    learning_rate: float = 1e-3
    holdout_sequences: int = 4
    """Packed sequences held out to report each layer's KL before and after."""
    seed: int = 0


# The distillation's settings (config section ``distill``, flat): the loss's and the trainer's.
KL_DIRECTIONS = ("student_target", "target_student")
MOVEMENT_CONVENTIONS = ("hf", "pre_norm")
# ζ2's per-layer step: the paper's ‖h_l − h_{l−1}‖² / ‖h_{l−1}‖² (eq. 5), or the scale-free 1 − cos(h_{l−1}, h_l)
# (= 2 D_l), which a norm's gain cannot inflate or shrink.
ZETA2_MEASURES = ("relative_step", "cosine_distance")
EXIT_SAMPLING = ("uniform", "weighted", "uniform_keep_last")
LOSS_IMPLEMENTATIONS = ("fused", "reference")
PRECISIONS = ("auto", "float32", "bfloat16")


def check_settings(direction: str, movement_convention: str) -> None:
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"kl_direction {direction!r} is not one of {', '.join(KL_DIRECTIONS)}")
    if movement_convention not in MOVEMENT_CONVENTIONS:
        raise ValueError(f"movement_convention {movement_convention!r} is not one of "
                         f"{', '.join(MOVEMENT_CONVENTIONS)}")


@dataclass(frozen=True)
class LossSettings:
    alpha: float = 1.0
    k: float = 0.25
    kl_direction: str = "student_target"
    movement_convention: str = "hf"
    chunk_tokens: int = 256
    implementation: str = "fused"
    exit_samples: int | None = None  # ζ1 on this many exits per forward pass (None: all, the exact loss)
    exit_sampling: str = "uniform"
    # The frozen model's distribution read from a cache of its k most likely tokens per position (written once by
    # `hsconv cache-teacher`), KL folded onto those k and one bucket; None: recomputed exactly in every step.
    teacher_top_k: int | None = None
    zeta2_measure: str = "relative_step"

    def __post_init__(self):
        check_settings(self.kl_direction, self.movement_convention)
        if self.zeta2_measure not in ZETA2_MEASURES:
            raise ValueError(f"zeta2_measure {self.zeta2_measure!r} is not one of {', '.join(ZETA2_MEASURES)}")
        if self.implementation not in LOSS_IMPLEMENTATIONS:
            raise ValueError(f"loss implementation {self.implementation!r} is not one of "
                             f"{', '.join(LOSS_IMPLEMENTATIONS)}")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        if self.exit_samples is not None and self.exit_samples < 1:
            raise ValueError(f"exit_samples must be at least 1 (or null for every exit), got {self.exit_samples}")
        if self.exit_sampling not in EXIT_SAMPLING:
            raise ValueError(f"exit_sampling {self.exit_sampling!r} is not one of {', '.join(EXIT_SAMPLING)}")
        if self.exit_sampling == "uniform_keep_last" and self.exit_samples is not None and self.exit_samples < 2:
            raise ValueError("exit_sampling uniform_keep_last needs exit_samples >= 2 (the output exit and at least "
                             "one other)")
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
    batch_size: int = 128  # sequences per optimizer step, over all ranks and micro-batches (the paper: 128)
    micro_batch_size: int = 4  # sequences per forward pass on one rank
    epochs: int = 1
    max_steps: int | None = None  # stop early (the schedule still spans all epochs' steps)
    learning_rate: float = 1e-4
    min_lr_ratio: float = 0.0  # the cosine decays to learning_rate × this
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    seed: int = 0
    zero_stage: int = 2
    offload_optimizer: bool = False
    precision: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50  # optimizer steps
    keep_checkpoints: int = 2
    deterministic: bool = True

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise TrainingError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise TrainingError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        for name in ("batch_size", "micro_batch_size", "epochs", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class DistillSettings:
    loss: LossSettings = field(default_factory=LossSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    @classmethod
    def from_dict(cls, settings: dict) -> "DistillSettings":
        """From the config's ``distill`` section (keys of both dataclasses, flat; unknown keys are errors)."""
        loss_keys = LossSettings.__dataclass_fields__.keys()
        train_keys = TrainSettings.__dataclass_fields__.keys()
        unknown = set(settings) - set(loss_keys) - set(train_keys)
        if unknown:
            raise TrainingError(f"unknown distillation setting(s): {', '.join(sorted(unknown))}", "distill",
                                "see the distill section of workflow/schemas/config.schema.yaml")
        for key, value in settings.items():
            kind = (LossSettings if key in loss_keys else TrainSettings).__dataclass_fields__[key].type
            if not _has_type(value, kind):
                raise TrainingError(f"{value!r} is not of type {kind}", f"distill.{key}")
        train = {key: settings[key] for key in train_keys if key in settings}
        if "adam_betas" in train:
            train["adam_betas"] = tuple(train["adam_betas"])
        try:
            return cls(loss=LossSettings(**{key: settings[key] for key in loss_keys if key in settings}),
                       train=TrainSettings(**train))
        except TrainingError:
            raise
        except ValueError as error:  # a value in range of its type but not of the loss (LossSettings' checks)
            raise TrainingError(str(error), "distill") from None

    def to_dict(self) -> dict:
        return {**asdict(self.loss), **asdict(self.train)}


def _has_type(value, annotation: str) -> bool:
    """Whether a JSON value fits a settings field's annotation (``int``, ``float | None``, ``tuple[...]``...)."""
    options = [option.strip() for option in annotation.split("|")]
    checks = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
              "None": lambda v: v is None}
    return any(checks[option](value) if option in checks else isinstance(value, (list, tuple))
               for option in options)
