"""``hsconv <stage>``: every pipeline stage as a command, so each runs and is tested without Snakemake.

Rules in ``workflow/rules`` call these commands; run ``hsconv <stage> --help`` for a stage's arguments.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
import traceback
import typing
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable, NamedTuple

from hsconv.errors import EXIT_BAD_INPUT, NULLS, InputError, device, integer, real
from hsconv.lifetime import stop_with_workflow
from hsconv.names import (
    Convention,
    EvaluationKind,
    ModelDtype,
    Split,
    SubsetMode,
    TextKind,
    TrainingPrecision,
    choices,
)
from hsconv.settings import (
    CorpusSettings,
    EarlyExitSettings,
    EvaluationSettings,
    HiddenStatesSettings,
    LayerRelevanceSettings,
    MetricsSettings,
    PackingSettings,
    SentenceSettings,
    TunedLensSettings,
    from_section,
)


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON {type(value).__name__}, where an object {{...}} is needed")
    return value


def name_label(text: str) -> tuple[str, str]:
    name, _, label = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r} has no name: give NAME=LABEL")
    return name, label or name


def optional_str(text: str) -> str | None:
    return None if text in NULLS else text


def dataset_spec(text: str) -> tuple[str, str, str]:
    """NAME=KIND=PARQUET of `evaluate-layers --dataset`."""
    parts = text.split("=", 2)
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=KIND=PARQUET")
    if parts[1] not in choices(EvaluationKind):
        raise argparse.ArgumentTypeError(f"{text!r}: KIND {parts[1]!r} is not {' or '.join(choices(EvaluationKind))}")
    return parts[0], parts[1], parts[2]


def limit_spec(text: str) -> tuple[str, int]:
    """NAME=N of `evaluate-layers --limit`."""
    name, _, count = text.partition("=")
    try:
        return name, integer(1)(count)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=N with N an integer ≥ 1 ({error})") from None


def add_settings(stage: argparse.ArgumentParser, settings_class, section: str) -> None:
    """A stage's settings, from one dataclass of hsconv.settings: ``--settings`` takes the config section whole (as
    the workflow passes it), and every field is also a flag of its own (type, range, choices and help from the
    field), which wins over the JSON. :func:`stage_settings` reads them back."""
    stage.set_defaults(settings_class=settings_class, settings_section=section)
    stage.add_argument("--settings", type=json_object, default={},
                       help=f"the config's {section} section, as JSON (the flags below win over it)")
    group = stage.add_argument_group(f"{section} settings (hsconv.settings.{settings_class.__name__})")
    hints = typing.get_type_hints(settings_class)
    for item in fields(settings_class):
        group.add_argument("--" + item.name.replace("_", "-"), dest=item.name, default=argparse.SUPPRESS,
                           help=f"{item.metadata['help']} (default: {item.default})",
                           **_flag(hints[item.name], item.metadata))


def _flag(kind, bounds) -> dict:
    """argparse's type, choices, action or nargs for a settings field's annotation."""
    options = [option for option in typing.get_args(kind) if option is not type(None)]
    optional = typing.get_origin(kind) in (typing.Union, type(int | None)) and type(None) in typing.get_args(kind)
    value_type = options[0] if optional else kind
    if value_type is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(value_type) is typing.Literal:
        return {"choices": typing.get_args(value_type)}
    if typing.get_origin(value_type) is tuple:
        return {"nargs": "+", "type": _scalar(typing.get_args(value_type)[0], bounds, False)}
    return {"type": _scalar(value_type, bounds, optional)}


def _scalar(kind, bounds: dict, optional: bool):
    if kind is int:
        low = bounds.get("minimum", bounds["exclusiveMinimum"] + 1 if "exclusiveMinimum" in bounds else None)
        high = bounds.get("maximum", bounds["exclusiveMaximum"] - 1 if "exclusiveMaximum" in bounds else None)
        return integer(low, high, optional=optional)
    if kind is float:
        return real(bounds.get("minimum", bounds.get("exclusiveMinimum", float("-inf"))),
                    bounds.get("maximum", bounds.get("exclusiveMaximum", float("inf"))),
                    open_low="exclusiveMinimum" in bounds, open_high="exclusiveMaximum" in bounds)
    return optional_str if optional else kind


def _required(stage: argparse.ArgumentParser, *options: str) -> None:
    """Options every run of the stage gives: paths, and which model, variant and data set."""
    for option in options:
        stage.add_argument(option, required=True)


def _model_arguments(stage: argparse.ArgumentParser) -> None:
    """Which model and variant (the names the tables carry), and the dtype and device it is loaded in."""
    _required(stage, "--model", "--variant")
    stage.add_argument("--dtype", default="float32", choices=choices(ModelDtype))
    stage.add_argument("--device", type=device, default="cpu")


def stage_settings(args: argparse.Namespace):
    """The stage's settings dataclass: its config section (``--settings``) with the flags given on top."""
    flags = {item.name: getattr(args, item.name) for item in fields(args.settings_class) if hasattr(args, item.name)}
    return from_section(args.settings_class, {**args.settings, **flags}, args.settings_section)


class StageParser(argparse.ArgumentParser):
    """argparse, whose usage errors are one line in the form of every other bad-input message (exit status 2)."""

    def error(self, message: str):
        option = re.match(r"argument ([^:]+): (.*)", message, re.S)
        if option:
            message = f"{option.group(2)} ({option.group(1)})"
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message}: see `{self.prog} --help`\n")

class Stage(NamedTuple):
    """A pipeline stage as a command: its one-line help, its arguments, and what it runs (one package function,
    imported when the stage runs, so that `hsconv --help` and the workflow's dry runs stay torch-free)."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


def _prepare_model_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--name", required=True, help="the model's name in the config")
    stage.add_argument("--source", required=True, type=json_object, help="the model's source, as JSON")
    stage.add_argument("--out", required=True, help="model directory to write")
    stage.add_argument("--fold-final-norm-gain", action="store_true",
                       help="move the final norm's gain into the LM head (the same function, another parametrisation)")


def _prepare_model(args: argparse.Namespace) -> None:
    from hsconv.models import prepare_model

    prepare_model(args.name, args.source, args.out, fold_final_norm_gain=args.fold_final_norm_gain)


def _prepare_texts_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--name", required=True)
    stage.add_argument("--kind", required=True, choices=choices(TextKind))
    stage.add_argument("--path", type=optional_str, default=None, help="local file, used when it exists")
    stage.add_argument("--hub-id", type=optional_str, default=None, help="hub data set used when the local file does not exist")
    stage.add_argument("--subset-size", type=integer(1, optional=True), default=None, help="documents to keep (none: all)")
    stage.add_argument("--subset-mode", default="first", choices=choices(SubsetMode))
    stage.add_argument("--subset-seed", type=integer(0), default=0)
    stage.add_argument("--subset-skip", type=integer(0), default=0, help="documents passed over before the subset")
    stage.add_argument("--split", default="test", choices=choices(Split), help="validation or test text")
    stage.add_argument("--out", required=True)


def _prepare_texts(args: argparse.Namespace) -> None:
    from hsconv.texts import prepare_texts

    prepare_texts(args.name, args.kind, args.out, path=args.path, hub_id=args.hub_id,
                  subset_size=args.subset_size, subset_mode=args.subset_mode, subset_seed=args.subset_seed,
                  subset_skip=args.subset_skip, split=args.split)


def _sample_corpus_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--source", required=True, type=json_object, help="the corpus source, as JSON")
    stage.add_argument("--out", required=True, help="directory to write")
    add_settings(stage, CorpusSettings, "corpus")


def _sample_corpus(args: argparse.Namespace) -> None:
    from hsconv.corpus import sample_corpus

    sample_corpus(args.source, args.out, **asdict(stage_settings(args)))


def _pack_tokens_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--corpus", required=True, help="directory written by sample-corpus")
    stage.add_argument("--model-dir", required=True, help="a model directory whose tokenizer is used")
    stage.add_argument("--out", required=True)
    add_settings(stage, PackingSettings, "packing")


def _pack_tokens(args: argparse.Namespace) -> None:
    from hsconv.corpus import pack_tokens

    pack_tokens(args.corpus, args.model_dir, args.out, **asdict(stage_settings(args)))


def _dump_hidden_states_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--model-dir", required=True)
    stage.add_argument("--texts", required=True, help="Parquet written by prepare-texts")
    stage.add_argument("--out", required=True)
    stage.add_argument("--variant", default="base")
    stage.add_argument("--dataset", default=None)
    stage.add_argument("--dtype", default="float32", choices=choices(ModelDtype))
    stage.add_argument("--device", type=device, default="cpu")
    add_settings(stage, HiddenStatesSettings, "hidden_states")


def _dump_hidden_states(args: argparse.Namespace) -> None:
    from hsconv.hidden_states import dump_hidden_states

    dump_hidden_states(args.model_dir, args.texts, args.out, variant=args.variant, dataset=args.dataset,
                       dtype=args.dtype, device=args.device, **asdict(stage_settings(args)))


def _distill_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--model-dir", required=True, help="the pretrained model directory (student and target)")
    stage.add_argument("--tokens", required=True, help="packed tokens (Parquet) from pack-tokens")
    stage.add_argument("--out", required=True, help="model directory to write")
    stage.add_argument("--log-out", required=True, help="per-step training log (Parquet)")
    stage.add_argument("--layers-out", required=True, help="per-step, per-layer KL and hidden-state steps (Parquet)")
    stage.add_argument("--checkpoints", required=True, help="DeepSpeed checkpoint directory (resumed from)")
    stage.add_argument("--settings", type=json_object, default={}, help="the config's distill section, as JSON")
    stage.add_argument("--device", type=device, default="cpu")
    stage.add_argument("--name", default=None, help="the model's name, for logs and messages")
    stage.add_argument("--teacher-cache", default=None,
                       help="read the frozen model's distribution from this cache (cache-teacher; needs "
                            "teacher_top_k in --settings) instead of running the frozen model")
    stage.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`


def _distill(args: argparse.Namespace) -> None:
    from hsconv.distill.train import DistillSettings, distill

    distill(args.model_dir, args.tokens, args.out, args.log_out, args.layers_out, args.checkpoints,
            DistillSettings.from_dict(args.settings), device=args.device, name=args.name,
            teacher_cache=args.teacher_cache)


def _cache_teacher_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--model-dir", required=True)
    stage.add_argument("--tokens", required=True, help="packed tokens (Parquet) from pack-tokens")
    stage.add_argument("--out", required=True, help="cache directory to write")
    stage.add_argument("--top-k", type=integer(1), required=True, help="tokens kept per position")
    stage.add_argument("--batch-size", type=integer(1), default=8)
    stage.add_argument("--dtype", default="float32", choices=choices(TrainingPrecision),
                       help="the frozen model's precision (auto: bfloat16 where this device multiplies it natively)")
    stage.add_argument("--device", type=device, default="cpu")


def _cache_teacher(args: argparse.Namespace) -> None:
    from hsconv.distill.teacher import write_teacher_cache

    write_teacher_cache(args.model_dir, args.tokens, args.out, args.top_k, batch_size=args.batch_size,
                        dtype=args.dtype, device=args.device)


def _plot_training_arguments(stage: argparse.ArgumentParser) -> None:
    _required(stage, "--log", "--layers", "--pdf", "--png", "--title")


def _plot_training(args: argparse.Namespace) -> None:
    from hsconv.figures.training import plot_training

    plot_training(args.log, args.layers, args.pdf, args.png, args.title)


def _evaluate_layers_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--model-dir", required=True)
    stage.add_argument("--dataset", dest="datasets", type=dataset_spec, nargs="+", required=True, metavar="NAME=KIND=PARQUET",
                       help="evaluation texts written by prepare-texts; KIND is lambada or wikitext")
    stage.add_argument("--limit", dest="limits", type=limit_spec, nargs="*", default=[], metavar="NAME=N",
                       help="evaluate only the first N documents of a data set")
    stage.add_argument("--out", required=True, help="tidy per-layer table (Parquet)")
    stage.add_argument("--json-out", required=True, help="lm-eval's results for every exit (JSON)")
    _model_arguments(stage)
    add_settings(stage, EvaluationSettings, "evaluation")
    stage.add_argument("--documents-out", default=None, help="every document's outcome per exit (Parquet)")
    stage.add_argument("--stock", action="store_true",
                       help="lm-eval's own HFLM on the model's output (one exit), e.g. for a pruned model")
    stage.add_argument("--tuned-lens", default=None, help="translators of train-tuned-lens in front of each exit")
    stage.add_argument("--output-only", action="store_true",
                       help="the model's output alone, through the lens: stock lm-eval's numbers, memory-bounded")


def _evaluate_layers(args: argparse.Namespace) -> None:
    from hsconv.evaluation.per_layer import evaluate_per_layer

    datasets = {name: (kind, path) for name, kind, path in args.datasets}
    limits = dict(args.limits)
    evaluate_per_layer(args.model_dir, datasets, args.out, args.json_out, args.model, args.variant,
                       **asdict(stage_settings(args)), dtype=args.dtype, device=args.device, limits=limits,
                       documents_out=args.documents_out, stock=args.stock, tuned_lens=args.tuned_lens,
                       output_only=args.output_only)


def _train_tuned_lens_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--model-dir", required=True)
    stage.add_argument("--tokens", required=True, help="packed sequences (pack-tokens)")
    stage.add_argument("--out", required=True, help="directory for the translators")
    stage.add_argument("--log-out", required=True, help="held-out KL per layer before and after, training KL (Parquet)")
    stage.add_argument("--device", type=device, default="cpu")
    add_settings(stage, TunedLensSettings, "tuned_lens")


def _train_tuned_lens(args: argparse.Namespace) -> None:
    from hsconv.tuned_lens import train_tuned_lens

    train_tuned_lens(args.model_dir, args.tokens, args.out, args.log_out, device=args.device,
                     **asdict(stage_settings(args)))


def _plot_per_layer_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--table", required=True, help="the gathered per-layer evaluation table (Parquet)")
    stage.add_argument("--pdf", required=True)
    stage.add_argument("--png", required=True)
    stage.add_argument("--model", dest="models", type=name_label, nargs="+", required=True, help="NAME=LABEL, in order")
    _required(stage, "--task", "--metric", "--title")


def _plot_per_layer(args: argparse.Namespace) -> None:
    from hsconv.figures.per_layer import plot_per_layer

    plot_per_layer(args.table, args.pdf, args.png, dict(args.models), args.task, args.metric, args.title)


def _prune_model_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--model-dir", required=True)
    keep = stage.add_mutually_exclusive_group(required=True)
    keep.add_argument("--keep-layers", type=integer(1), help="decoder layers to keep, from the first")
    keep.add_argument("--keep-fraction", type=real(0, 1, open_low=True), help="the fraction of the decoder layers to keep (rounded)")
    stage.add_argument("--out", required=True, help="model directory to write")


def _prune_model(args: argparse.Namespace) -> None:
    from hsconv.early_exit import prune_model

    prune_model(args.model_dir, args.keep_layers, args.out, keep_fraction=args.keep_fraction)


def _tabulate_early_exit_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--evaluation", required=True, help="the gathered per-layer evaluation table (Parquet)")
    stage.add_argument("--pruned", nargs="+", required=True, help="stock lm-eval tables of the pruned models")
    stage.add_argument("--exits-out", required=True, help="Parquet; .csv and .md are written beside it")
    stage.add_argument("--pruned-out", required=True, help="Parquet; .csv and .md are written beside it")
    stage.add_argument("--config-hash", required=True)
    add_settings(stage, EarlyExitSettings, "early_exit")


def _tabulate_early_exit(args: argparse.Namespace) -> None:
    from hsconv.early_exit import tabulate_early_exit

    tabulate_early_exit(args.evaluation, args.pruned, Path(args.exits_out).with_suffix(""),
                        Path(args.pruned_out).with_suffix(""), args.config_hash, stage_settings(args).tolerances)


def _plot_early_exit_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--evaluation", required=True)
    stage.add_argument("--exits", required=True, help="the early-exit table")
    stage.add_argument("--pdf", required=True)
    stage.add_argument("--png", required=True)
    stage.add_argument("--model", dest="models", type=name_label, nargs="+", required=True, help="NAME=LABEL, in order")
    stage.add_argument("--tolerance", type=real(0, 1), default=0.05)


def _plot_early_exit(args: argparse.Namespace) -> None:
    from hsconv.figures.early_exit import plot_early_exit

    plot_early_exit(args.evaluation, args.exits, args.pdf, args.png, dict(args.models), args.tolerance)


def _paired_differences_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--documents", nargs="+", required=True, help="per-document outcomes of evaluate-layers")
    stage.add_argument("--out", required=True, help="Parquet; .csv and .md are written beside it")
    stage.add_argument("--config-hash", required=True)
    add_settings(stage, MetricsSettings, "metrics")


def _paired_differences(args: argparse.Namespace) -> None:
    from hsconv.paired import tabulate_paired_differences

    metrics = stage_settings(args)
    tabulate_paired_differences(args.documents, Path(args.out).with_suffix(""), args.config_hash,
                                metrics.bootstrap_samples, metrics.confidence, metrics.seed)


def _tabulate_variants_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--convergence", nargs="+", required=True, help="compute-convergence scores per variant")
    stage.add_argument("--stock", nargs="+", required=True, help="stock lm-eval tables per variant")
    stage.add_argument("--documents", nargs="+", required=True, help="their per-document outcomes")
    stage.add_argument("--variant-settings", type=json_object, required=True,
                       help="{setting: distillation settings}, as JSON")
    stage.add_argument("--variants", type=json_object, required=True, help="{setting: model variant}, as JSON")
    stage.add_argument("--study", default="ablations", choices=("ablations", "recipes"),
                       help="ablations: differences from the reference; recipes: from the pretrained model")
    stage.add_argument("--out", required=True, help="Parquet; .csv and .md are written beside it")
    stage.add_argument("--config-hash", required=True)
    add_settings(stage, MetricsSettings, "metrics")


def _tabulate_variants(args: argparse.Namespace) -> None:
    from hsconv.ablations import tabulate_variants

    metrics = stage_settings(args)
    tabulate_variants(args.convergence, args.stock, args.documents, args.variant_settings, args.variants,
                       Path(args.out).with_suffix(""), args.config_hash, metrics.bootstrap_samples,
                       metrics.confidence, metrics.seed, study=args.study)


def _plot_ablations_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--table", required=True, help="the ablation table")
    stage.add_argument("--pdf", required=True)
    stage.add_argument("--png", required=True)
    stage.add_argument("--model", dest="models", type=name_label, nargs="+", required=True, help="NAME=LABEL, in order")
    stage.add_argument("--final-norm", default="pre_norm", choices=choices(Convention))


def _plot_ablations(args: argparse.Namespace) -> None:
    from hsconv.figures.ablations import plot_ablations

    plot_ablations(args.table, args.pdf, args.png, dict(args.models), args.final_norm)


def _plot_frontier(args: argparse.Namespace) -> None:
    from hsconv.figures.frontier import plot_frontier

    plot_frontier(args.table, args.pdf, args.png, dict(args.models), args.final_norm)


def _compute_convergence_arguments(stage: argparse.ArgumentParser) -> None:
    _required(stage, "--hidden", "--layers-out", "--scores-out", "--model", "--variant", "--dataset")
    add_settings(stage, MetricsSettings, "metrics")


def _compute_convergence(args: argparse.Namespace) -> None:
    from hsconv.metrics import compute_convergence

    compute_convergence(args.hidden, args.layers_out, args.scores_out, args.model, args.variant, args.dataset,
                        **asdict(stage_settings(args)))


def _compare_convergence_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--base", required=True, help="the base model's per-token table")
    stage.add_argument("--hidden", required=True, help="the variant's per-token table")
    _required(stage, "--out", "--model", "--variant", "--dataset")
    add_settings(stage, MetricsSettings, "metrics")


def _compare_convergence(args: argparse.Namespace) -> None:
    from hsconv.metrics import compare_convergence

    metrics = stage_settings(args)
    compare_convergence(args.base, args.hidden, args.out, args.model, args.variant, args.dataset,
                        metrics.bootstrap_samples, metrics.confidence, metrics.seed)


def _tabulate_seeds_arguments(stage: argparse.ArgumentParser) -> None:
    tables = stage.add_mutually_exclusive_group(required=True)
    tables.add_argument("--convergence", nargs="+", help="compute-convergence scores of every seed")
    tables.add_argument("--paired", nargs="+", help="paired-differences table(s) holding every seed's variant")
    stage.add_argument("--first-seed", type=integer(0), required=True, help="distill.seed")
    stage.add_argument("--seeds", type=integer(2), required=True, help="distill.seeds")
    stage.add_argument("--out", required=True, help="the Parquet table; .csv and .md are written beside it")
    stage.add_argument("--config-hash", required=True)


def _tabulate_seeds(args: argparse.Namespace) -> None:
    from hsconv.seeds import tabulate_seeds

    tabulate_seeds(args.convergence or args.paired, args.first_seed, args.seeds, Path(args.out).with_suffix(""),
                   args.config_hash, paired=args.paired is not None)


def _gather_tables_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--inputs", nargs="+", required=True)
    stage.add_argument("--out", required=True, help="the Parquet table; .csv and .md are written beside it")
    stage.add_argument("--config-hash", required=True)
    stage.add_argument("--columns", nargs="*", default=None, help="keep and order these columns")


def _gather_tables(args: argparse.Namespace) -> None:
    from hsconv.tables import gather_tables

    gather_tables(args.inputs, Path(args.out).with_suffix(""), args.config_hash, args.columns)


def _plot_movement_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--table", required=True, help="the gathered layer-movement table (Parquet)")
    stage.add_argument("--pdf", required=True)
    stage.add_argument("--png", required=True)
    stage.add_argument("--model", dest="models", type=name_label, nargs="+", required=True, help="NAME=LABEL, in order")
    stage.add_argument("--dataset", required=True)
    stage.add_argument("--final-norm", default="hf", choices=choices(Convention))
    stage.add_argument("--title", default="Fig. 3")


def _plot_movement(args: argparse.Namespace) -> None:
    from hsconv.figures.movement import plot_movement

    plot_movement(args.table, args.pdf, args.png, dict(args.models), args.dataset, args.final_norm, args.title)


def _trace_sentence_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--model-dir", required=True)
    stage.add_argument("--lens-out", required=True, help="per position and layer: top-1 token, probability, D_l")
    stage.add_argument("--pca-out", required=True, help="per position and layer: the state's first 3 PCA coordinates")
    _model_arguments(stage)
    add_settings(stage, SentenceSettings, "sentence")


def _trace_sentence(args: argparse.Namespace) -> None:
    from hsconv.sentence import trace_sentence_stage

    sentence = stage_settings(args)
    trace_sentence_stage(args.model_dir, sentence.text, sentence.target, args.lens_out, args.pca_out, args.model,
                         args.variant, pca_exclude_first=sentence.pca_exclude_first, dtype=args.dtype,
                         device=args.device)


def _plot_trajectory_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--table", required=True, help="the gathered sentence PCA table (Parquet)")
    stage.add_argument("--pdf", required=True)
    stage.add_argument("--png", required=True)
    stage.add_argument("--model", dest="models", type=name_label, nargs="+", required=True, help="NAME=LABEL, in order")
    stage.add_argument("--variants", nargs="+", required=True)
    stage.add_argument("--final-norm", default="hf", choices=choices(Convention))
    stage.add_argument("--title", default="Fig. 4")


def _plot_trajectory(args: argparse.Namespace) -> None:
    from hsconv.figures.trajectory import plot_trajectory

    plot_trajectory(args.table, args.pdf, args.png, dict(args.models), args.variants, args.final_norm, args.title)


def _plot_lens_heatmap_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--table", required=True, help="the gathered sentence logit-lens table (Parquet)")
    stage.add_argument("--pdf", required=True)
    stage.add_argument("--png", required=True)
    stage.add_argument("--model", required=True, type=name_label, help="NAME=LABEL")
    stage.add_argument("--variants", nargs="+", required=True)
    stage.add_argument("--final-norm", default="hf", choices=choices(Convention))
    stage.add_argument("--title", default="Fig. 7")


def _plot_lens_heatmap(args: argparse.Namespace) -> None:
    from hsconv.figures.lens_heatmap import plot_lens_heatmap

    plot_lens_heatmap(args.table, args.pdf, args.png, args.model[0], args.model[1], args.variants,
                      args.final_norm, args.title)


def _layer_relevance_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--model-dir", required=True)
    stage.add_argument("--dataset", dest="datasets", type=dataset_spec, nargs="+", required=True,
                       metavar="NAME=KIND=PARQUET", help="texts written by prepare-texts; KIND is lambada or wikitext")
    stage.add_argument("--limit", dest="limits", type=limit_spec, nargs="*", default=[], metavar="NAME=N",
                       help="only the first N documents of a data set")
    stage.add_argument("--documents-out", required=True, help="each document's outcome per configuration (Parquet)")
    stage.add_argument("--layers-out", required=True, help="the intact model's per-layer sums per document (Parquet)")
    _required(stage, "--model", "--variant")
    stage.add_argument("--device", type=device, default="cpu")
    add_settings(stage, LayerRelevanceSettings, "layer_relevance")


def _layer_relevance(args: argparse.Namespace) -> None:
    from hsconv.evaluation.layer_skip import measure_layer_relevance

    measure_layer_relevance(args.model_dir, {name: (kind, path) for name, kind, path in args.datasets},
                            args.documents_out, args.layers_out, args.model, args.variant, device=args.device,
                            limits=dict(args.limits), **asdict(stage_settings(args)))


def _tabulate_layer_relevance_arguments(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--documents", nargs="+", required=True, help="layer-relevance outcomes per model and variant")
    stage.add_argument("--layers", nargs="+", required=True, help="their per-layer sums")
    _required(stage, "--out", "--agreement-out", "--pruning-out", "--config-hash")
    add_settings(stage, MetricsSettings, "metrics")


def _tabulate_layer_relevance(args: argparse.Namespace) -> None:
    from hsconv.layer_relevance import tabulate_layer_relevance

    metrics = stage_settings(args)
    tabulate_layer_relevance(args.documents, args.layers, *(Path(path).with_suffix("") for path in
                                                            (args.out, args.agreement_out, args.pruning_out)),
                             args.config_hash, metrics.bootstrap_samples, metrics.confidence, metrics.seed)


def _plot_layer_relevance_arguments(stage: argparse.ArgumentParser) -> None:
    _required(stage, "--table", "--pruning", "--pdf", "--png")
    stage.add_argument("--model", dest="models", type=name_label, nargs="+", required=True, help="NAME=LABEL, in order")


def _plot_layer_relevance(args: argparse.Namespace) -> None:
    from hsconv.figures.layer_relevance import plot_layer_relevance

    plot_layer_relevance(args.table, args.pruning, args.pdf, args.png, dict(args.models))


STAGES = {
    "prepare-model": Stage("resolve a model source into a model directory", _prepare_model_arguments, _prepare_model),
    "prepare-texts": Stage("read, subset and write an evaluation data set as Parquet", _prepare_texts_arguments, _prepare_texts),
    "sample-corpus": Stage("draw training documents into Parquet shards with a manifest", _sample_corpus_arguments, _sample_corpus),
    "pack-tokens": Stage("tokenise sampled documents and pack fixed-length sequences", _pack_tokens_arguments, _pack_tokens),
    "dump-hidden-states": Stage("per-token, per-layer movement from one forward pass", _dump_hidden_states_arguments, _dump_hidden_states),
    "distill": Stage("self-distil a model under DeepSpeed ZeRO (resumes from checkpoints)", _distill_arguments, _distill),
    "cache-teacher": Stage("the frozen model's top-k distribution over the packed rows, "
                                                    "written once for every distillation on them", _cache_teacher_arguments, _cache_teacher),
    "plot-training": Stage("loss curves of a distillation run", _plot_training_arguments, _plot_training),
    "evaluate-layers": Stage("per-layer LAMBADA/WikiText through lm-eval and the logit lens", _evaluate_layers_arguments, _evaluate_layers),
    "train-tuned-lens": Stage("per-layer affine translators (the tuned-lens baseline)", _train_tuned_lens_arguments, _train_tuned_lens),
    "plot-per-layer": Stage("Figs. 5, 6, 9, 10: a per-layer lm-eval metric per model", _plot_per_layer_arguments, _plot_per_layer),
    "prune-model": Stage("keep a model's first layers (with its final norm and head)", _prune_model_arguments, _prune_model),
    "tabulate-early-exit": Stage("the shallowest exit within each tolerance, and pruned models vs the logit lens", _tabulate_early_exit_arguments, _tabulate_early_exit),
    "plot-early-exit": Stage("quality against the fraction of layers kept, per model", _plot_early_exit_arguments, _plot_early_exit),
    "paired-differences": Stage("distilled − base per exit with a paired bootstrap interval over documents", _paired_differences_arguments, _paired_differences),
    "tabulate-variants": Stage("S_model, D_L and stock LAMBADA accuracy per distillation setting (ablations, recipes)",
                               _tabulate_variants_arguments, _tabulate_variants),
    "plot-ablations": Stage("S_model, D_L and accuracy per setting, one row per model", _plot_ablations_arguments, _plot_ablations),
    "plot-frontier": Stage("the recipes' S_model against their accuracy cost", _plot_ablations_arguments, _plot_frontier),
    "compute-convergence": Stage("D_l per layer and S_model from the per-token table", _compute_convergence_arguments, _compute_convergence),
    "compare-convergence": Stage("variant − base S_model and last-layer ratio, paired by "
                              "document", _compare_convergence_arguments, _compare_convergence),
    "tabulate-seeds": Stage("spread over the main distillation's seeds: of S_model and the "
                              "last-layer ratio, or of paired differences from base", _tabulate_seeds_arguments, _tabulate_seeds),
    "gather-tables": Stage("concatenate per-model tables into Parquet, CSV and Markdown", _gather_tables_arguments, _gather_tables),
    "plot-movement": Stage("Figs. 3 and 8: D_l per layer, one panel per model", _plot_movement_arguments, _plot_movement),
    "trace-sentence": Stage("one sentence through every layer: logit lens, D_l and PCA", _trace_sentence_arguments, _trace_sentence),
    "plot-trajectory": Stage("Fig. 4: per-layer states of the sentence in 3-D (PCA)", _plot_trajectory_arguments, _plot_trajectory),
    "layer-relevance": Stage("each block removed (alone and greedily pruned) against the intact model, through "
                             "lm-eval", _layer_relevance_arguments, _layer_relevance),
    "tabulate-layer-relevance": Stage("per block: movement beside removal effect; their agreement; the prunings",
                                      _tabulate_layer_relevance_arguments, _tabulate_layer_relevance),
    "plot-layer-relevance": Stage("D_l beside the removal KL per block, and the greedy prunings",
                                  _plot_layer_relevance_arguments, _plot_layer_relevance),
    "plot-lens-heatmap": Stage("Fig. 7: logit-lens top-1 token per layer at the target", _plot_lens_heatmap_arguments, _plot_lens_heatmap),
}


def build_parser() -> argparse.ArgumentParser:
    parser = StageParser(prog="hsconv", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="logging level")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a bad-input error too")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, stage in STAGES.items():
        stage.arguments(stages.add_parser(name, help=stage.help))
    return parser


def run(args: argparse.Namespace) -> None:
    STAGES[args.stage].run(args)


def main(argv: list[str] | None = None) -> int:
    return run_stage(build_parser().parse_args(argv))


def run_stage(args: argparse.Namespace) -> int:
    """Run one parsed stage; its exit status: 2 for bad input (one line naming the culprit), 1 for an environment
    failure such as a full disk (one line), and a traceback for anything else, which is a bug."""
    # Under a launcher (torchrun, deepspeed) every rank runs this: rank 0 tells the progress, the others only warn
    # or fail, and say which rank they are.
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=args.log_level if rank == 0 else max(logging.getLevelName(args.log_level),
                                                                    logging.WARNING),
                        stream=sys.stderr, format=("" if rank == 0 else f"[rank {rank}] ")
                        + "%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Embedding fonts in a PDF logs every glyph table at INFO.
    logging.getLogger("fontTools").setLevel(logging.WARNING)
    stop_with_workflow(args.stage)
    try:
        run(args)
    except (InputError, FileNotFoundError, IsADirectoryError) as error:
        if isinstance(error, OSError):  # an input that is not there (outputs' folders are created as needed)
            error = InputError("not found" if isinstance(error, FileNotFoundError) else "a directory, not a file",
                               error.filename, "check the path")
        return _report(args, error, EXIT_BAD_INPUT)
    except (OSError, FloatingPointError) as error:
        hint = ""
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            hint = " (disk full or over a file-size limit; outputs are renamed into place only when complete, " \
                   "so nothing half-written was left)"
        elif isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = " (the output location is not writable)"
        elif isinstance(error, (FileExistsError, NotADirectoryError)):
            hint = " (a file stands where a folder is needed: the output location is not writable)"
        return _report(args, f"{error}{hint}", 1)
    return 0


def _report(args: argparse.Namespace, error, status: int) -> int:
    """The failure as the last line of stderr (under Snakemake, of the job's log), plain, without a traceback."""
    if args.debug:
        traceback.print_exc()
    sys.stderr.flush()
    rank = os.environ.get("RANK", "0")
    where = "" if rank == "0" else f" (rank {rank})"
    print(f"hsconv {args.stage}{where}: {error}", file=sys.stderr, flush=True)
    return status


# Stages that start DeepSpeed/gloo: their native worker threads can still be joinable when the interpreter tears
# down, and then the process aborts ("terminate called without an active exception", SIGABRT) after its outputs are
# already in place; seen under load on the 2-core machine. Once everything is written and flushed, such a stage
# leaves without running the interpreter's teardown.
_EXIT_WITHOUT_TEARDOWN = {"distill"}


def entry_point() -> None:
    """The `hsconv` command."""
    args = build_parser().parse_args()
    status = run_stage(args)
    if args.stage in _EXIT_WITHOUT_TEARDOWN:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry_point()
