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
from dataclasses import asdict
from pathlib import Path

from hsconv.errors import EXIT_BAD_INPUT, NULLS, InputError, device, integer, real
from hsconv.settings import TunedLensSettings


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
    if parts[1] not in ("lambada", "wikitext"):
        raise argparse.ArgumentTypeError(f"{text!r}: KIND {parts[1]!r} is not lambada or wikitext")
    return parts[0], parts[1], parts[2]


def limit_spec(text: str) -> tuple[str, int]:
    """NAME=N of `evaluate-layers --limit`."""
    name, _, count = text.partition("=")
    try:
        return name, integer(1)(count)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=N with N an integer ≥ 1 ({error})") from None


class StageParser(argparse.ArgumentParser):
    """argparse, whose usage errors are one line in the form of every other bad-input message (exit status 2)."""

    def error(self, message: str):
        option = re.match(r"argument ([^:]+): (.*)", message, re.S)
        if option:
            message = f"{option.group(2)} ({option.group(1)})"
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message}: see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = StageParser(prog="hsconv", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="logging level")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a bad-input error too")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    stage = stages.add_parser("prepare-model", help="resolve a model source into a model directory")
    stage.add_argument("--name", required=True, help="the model's name in the config")
    stage.add_argument("--source", required=True, type=json_object, help="the model's source, as JSON")
    stage.add_argument("--out", required=True, help="model directory to write")
    stage.add_argument("--fold-final-norm-gain", action="store_true",
                       help="move the final norm's gain into the LM head (the same function, another parametrisation)")

    stage = stages.add_parser("prepare-texts", help="read, subset and write an evaluation data set as Parquet")
    stage.add_argument("--name", required=True)
    stage.add_argument("--kind", required=True, choices=("lambada", "wikitext", "jsonl"))
    stage.add_argument("--path", type=optional_str, default=None, help="local file, used when it exists")
    stage.add_argument("--hub-id", type=optional_str, default=None, help="hub data set used when the local file does not exist")
    stage.add_argument("--subset-size", type=integer(1, optional=True), default=None, help="documents to keep (none: all)")
    stage.add_argument("--subset-mode", default="first", choices=("first", "sample"))
    stage.add_argument("--subset-seed", type=integer(0), default=0)
    stage.add_argument("--out", required=True)

    stage = stages.add_parser("sample-corpus", help="draw training documents into Parquet shards with a manifest")
    stage.add_argument("--source", required=True, type=json_object, help="the corpus source, as JSON")
    stage.add_argument("--out", required=True, help="directory to write")
    stage.add_argument("--documents", type=integer(1, optional=True), default=None, help="documents to draw (none: all)")
    stage.add_argument("--seed", type=integer(0), default=0)
    stage.add_argument("--min-int-score", type=integer(0, optional=True), default=None,
                       help="keep documents whose int_score is at least this (where the source has it)")
    stage.add_argument("--shuffle-buffer", type=integer(1), default=10000)
    stage.add_argument("--shard-documents", type=integer(1), default=10000)

    stage = stages.add_parser("pack-tokens", help="tokenise sampled documents and pack fixed-length sequences")
    stage.add_argument("--corpus", required=True, help="directory written by sample-corpus")
    stage.add_argument("--model-dir", required=True, help="a model directory whose tokenizer is used")
    stage.add_argument("--out", required=True)
    stage.add_argument("--sequence-length", type=integer(1), required=True)
    stage.add_argument("--token-budget", type=integer(1), required=True)
    stage.add_argument("--boundary", default="cut", choices=("cut", "document"))

    stage = stages.add_parser("dump-hidden-states", help="per-token, per-layer movement from one forward pass")
    stage.add_argument("--model-dir", required=True)
    stage.add_argument("--texts", required=True, help="Parquet written by prepare-texts")
    stage.add_argument("--out", required=True)
    stage.add_argument("--variant", default="base")
    stage.add_argument("--dataset", default=None)
    stage.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    stage.add_argument("--device", type=device, default="cpu")
    stage.add_argument("--max-tokens", type=integer(2, optional=True), default=None,
                       help="longest sequence per forward pass (none: the model's context length)")
    stage.add_argument("--overflow", default="error", choices=("error", "truncate", "split"),
                       help="what to do with a document longer than --max-tokens")
    stage.add_argument("--batch-size", type=integer(1), default=8)
    stage.add_argument("--keep-special-tokens", action="store_true",
                       help="measure special tokens (BOS) too; by default they are left out of every statistic")

    stage = stages.add_parser("distill", help="self-distil a model under DeepSpeed ZeRO (resumes from checkpoints)")
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

    stage = stages.add_parser("cache-teacher", help="the frozen model's top-k distribution over the packed rows, "
                                                    "written once for every distillation on them")
    stage.add_argument("--model-dir", required=True)
    stage.add_argument("--tokens", required=True, help="packed tokens (Parquet) from pack-tokens")
    stage.add_argument("--out", required=True, help="cache directory to write")
    stage.add_argument("--top-k", type=integer(1), required=True, help="tokens kept per position")
    stage.add_argument("--batch-size", type=integer(1), default=8)
    stage.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    stage.add_argument("--device", type=device, default="cpu")

    stage = stages.add_parser("plot-training", help="loss curves of a distillation run")
    stage.add_argument("--log", required=True)
    stage.add_argument("--layers", required=True)
    stage.add_argument("--pdf", required=True)
    stage.add_argument("--png", required=True)
    stage.add_argument("--title", required=True)

    stage = stages.add_parser("evaluate-layers", help="per-layer LAMBADA/WikiText through lm-eval and the logit lens")
    stage.add_argument("--model-dir", required=True)
    stage.add_argument("--dataset", dest="datasets", type=dataset_spec, nargs="+", required=True, metavar="NAME=KIND=PARQUET",
                       help="evaluation texts written by prepare-texts; KIND is lambada or wikitext")
    stage.add_argument("--limit", dest="limits", type=limit_spec, nargs="*", default=[], metavar="NAME=N",
                       help="evaluate only the first N documents of a data set")
    stage.add_argument("--out", required=True, help="tidy per-layer table (Parquet)")
    stage.add_argument("--json-out", required=True, help="lm-eval's results for every exit (JSON)")
    stage.add_argument("--model", required=True)
    stage.add_argument("--variant", required=True)
    stage.add_argument("--layers", type=integer(0), nargs="*", default=None, help="exits to evaluate (default: all)")
    stage.add_argument("--batch-size", type=integer(1), default=8)
    stage.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    stage.add_argument("--device", type=device, default="cpu")
    stage.add_argument("--bootstrap-iters", type=integer(0), default=1000)
    stage.add_argument("--documents-out", default=None, help="every document's outcome per exit (Parquet)")
    stage.add_argument("--stock", action="store_true",
                       help="lm-eval's own HFLM on the model's output (one exit), e.g. for a pruned model")
    stage.add_argument("--tuned-lens", default=None, help="translators of train-tuned-lens in front of each exit")
    stage.add_argument("--output-only", action="store_true",
                       help="the model's output alone, through the lens: stock lm-eval's numbers, memory-bounded")

    stage = stages.add_parser("train-tuned-lens", help="per-layer affine translators (the tuned-lens baseline)")
    stage.add_argument("--model-dir", required=True)
    stage.add_argument("--tokens", required=True, help="packed sequences (pack-tokens)")
    stage.add_argument("--out", required=True, help="directory for the translators")
    stage.add_argument("--log-out", required=True, help="held-out KL per layer before and after, training KL (Parquet)")
    # Defaults from hsconv.settings, the only place they are declared.
    stage.set_defaults(**asdict(TunedLensSettings()))
    stage.add_argument("--steps", type=integer(1))
    stage.add_argument("--batch-size", type=integer(1), help="sequences per step")
    stage.add_argument("--learning-rate", type=real(0, float("inf"), open_low=True))
    stage.add_argument("--holdout-sequences", type=integer(1))
    stage.add_argument("--micro-batch-size", type=integer(1, optional=True), help="sequences per forward pass (none: the batch)")
    stage.add_argument("--seed", type=integer(0))
    stage.add_argument("--device", type=device, default="cpu")

    stage = stages.add_parser("plot-per-layer", help="Figs. 5, 6, 9, 10: a per-layer lm-eval metric per model")
    stage.add_argument("--table", required=True, help="the gathered per-layer evaluation table (Parquet)")
    stage.add_argument("--pdf", required=True)
    stage.add_argument("--png", required=True)
    stage.add_argument("--model", dest="models", type=name_label, nargs="+", required=True, help="NAME=LABEL, in order")
    stage.add_argument("--task", required=True)
    stage.add_argument("--metric", required=True)
    stage.add_argument("--title", required=True)

    stage = stages.add_parser("prune-model", help="keep a model's first layers (with its final norm and head)")
    stage.add_argument("--model-dir", required=True)
    keep = stage.add_mutually_exclusive_group(required=True)
    keep.add_argument("--keep-layers", type=integer(1), help="decoder layers to keep, from the first")
    keep.add_argument("--keep-fraction", type=real(0, 1, open_low=True), help="the fraction of the decoder layers to keep (rounded)")
    stage.add_argument("--out", required=True, help="model directory to write")

    stage = stages.add_parser("tabulate-early-exit",
                              help="the shallowest exit within each tolerance, and pruned models vs the logit lens")
    stage.add_argument("--evaluation", required=True, help="the gathered per-layer evaluation table (Parquet)")
    stage.add_argument("--pruned", nargs="+", required=True, help="stock lm-eval tables of the pruned models")
    stage.add_argument("--exits-out", required=True, help="Parquet; .csv and .md are written beside it")
    stage.add_argument("--pruned-out", required=True, help="Parquet; .csv and .md are written beside it")
    stage.add_argument("--config-hash", required=True)
    stage.add_argument("--tolerances", type=real(0, 1), nargs="+", default=[0.01, 0.05])

    stage = stages.add_parser("plot-early-exit", help="quality against the fraction of layers kept, per model")
    stage.add_argument("--evaluation", required=True)
    stage.add_argument("--exits", required=True, help="the early-exit table")
    stage.add_argument("--pdf", required=True)
    stage.add_argument("--png", required=True)
    stage.add_argument("--model", dest="models", type=name_label, nargs="+", required=True, help="NAME=LABEL, in order")
    stage.add_argument("--tolerance", type=real(0, 1), default=0.05)

    stage = stages.add_parser("paired-differences",
                              help="distilled − base per exit with a paired bootstrap interval over documents")
    stage.add_argument("--documents", nargs="+", required=True, help="per-document outcomes of evaluate-layers")
    stage.add_argument("--out", required=True, help="Parquet; .csv and .md are written beside it")
    stage.add_argument("--config-hash", required=True)
    stage.add_argument("--bootstrap-samples", type=integer(1), default=1000)
    stage.add_argument("--confidence", type=real(0, 1, open_low=True, open_high=True), default=0.95)
    stage.add_argument("--seed", type=integer(0), default=0)

    stage = stages.add_parser("tabulate-ablations",
                              help="S_model, D_L and stock LAMBADA accuracy per distillation setting")
    stage.add_argument("--convergence", nargs="+", required=True, help="compute-convergence scores per variant")
    stage.add_argument("--stock", nargs="+", required=True, help="stock lm-eval tables per variant")
    stage.add_argument("--documents", nargs="+", required=True, help="their per-document outcomes")
    stage.add_argument("--settings", type=json_object, required=True, help="{setting: distillation settings}, as JSON")
    stage.add_argument("--variants", type=json_object, required=True, help="{setting: model variant}, as JSON")
    stage.add_argument("--out", required=True, help="Parquet; .csv and .md are written beside it")
    stage.add_argument("--config-hash", required=True)
    stage.add_argument("--bootstrap-samples", type=integer(1), default=1000)
    stage.add_argument("--confidence", type=real(0, 1, open_low=True, open_high=True), default=0.95)
    stage.add_argument("--seed", type=integer(0), default=0)

    stage = stages.add_parser("plot-ablations", help="S_model, D_L and accuracy per setting, one row per model")
    stage.add_argument("--table", required=True, help="the ablation table")
    stage.add_argument("--pdf", required=True)
    stage.add_argument("--png", required=True)
    stage.add_argument("--model", dest="models", type=name_label, nargs="+", required=True, help="NAME=LABEL, in order")
    stage.add_argument("--final-norm", default="pre_norm", choices=("pre_norm", "hf"))

    stage = stages.add_parser("compute-convergence", help="D_l per layer and S_model from the per-token table")
    stage.add_argument("--hidden", required=True)
    stage.add_argument("--layers-out", required=True)
    stage.add_argument("--scores-out", required=True)
    stage.add_argument("--model", required=True)
    stage.add_argument("--variant", required=True)
    stage.add_argument("--dataset", required=True)
    stage.add_argument("--quantiles", type=real(0, 1), nargs="+", default=[0.1, 0.5, 0.9])
    stage.add_argument("--bootstrap-samples", type=integer(1), default=1000)
    stage.add_argument("--confidence", type=real(0, 1, open_low=True, open_high=True), default=0.95)
    stage.add_argument("--seed", type=integer(0), default=0)

    stage = stages.add_parser("compare-convergence", help="variant − base S_model and last-layer ratio, paired by "
                              "document")
    stage.add_argument("--base", required=True, help="the base model's per-token table")
    stage.add_argument("--hidden", required=True, help="the variant's per-token table")
    stage.add_argument("--out", required=True)
    stage.add_argument("--model", required=True)
    stage.add_argument("--variant", required=True)
    stage.add_argument("--dataset", required=True)
    stage.add_argument("--bootstrap-samples", type=integer(1), default=1000)
    stage.add_argument("--confidence", type=real(0, 1, open_low=True, open_high=True), default=0.95)
    stage.add_argument("--seed", type=integer(0), default=0)

    stage = stages.add_parser("tabulate-seeds", help="spread over the main distillation's seeds: of S_model and the "
                              "last-layer ratio, or of paired differences from base")
    tables = stage.add_mutually_exclusive_group(required=True)
    tables.add_argument("--convergence", nargs="+", help="compute-convergence scores of every seed")
    tables.add_argument("--paired", nargs="+", help="paired-differences table(s) holding every seed's variant")
    stage.add_argument("--first-seed", type=integer(0), required=True, help="distill.seed")
    stage.add_argument("--seeds", type=integer(2), required=True, help="distill.seeds")
    stage.add_argument("--out", required=True, help="the Parquet table; .csv and .md are written beside it")
    stage.add_argument("--config-hash", required=True)

    stage = stages.add_parser("gather-tables", help="concatenate per-model tables into Parquet, CSV and Markdown")
    stage.add_argument("--inputs", nargs="+", required=True)
    stage.add_argument("--out", required=True, help="the Parquet table; .csv and .md are written beside it")
    stage.add_argument("--config-hash", required=True)
    stage.add_argument("--columns", nargs="*", default=None, help="keep and order these columns")

    stage = stages.add_parser("plot-movement", help="Figs. 3 and 8: D_l per layer, one panel per model")
    stage.add_argument("--table", required=True, help="the gathered layer-movement table (Parquet)")
    stage.add_argument("--pdf", required=True)
    stage.add_argument("--png", required=True)
    stage.add_argument("--model", dest="models", type=name_label, nargs="+", required=True, help="NAME=LABEL, in order")
    stage.add_argument("--dataset", required=True)
    stage.add_argument("--final-norm", default="hf", choices=("hf", "pre_norm"))
    stage.add_argument("--title", default="Fig. 3")

    stage = stages.add_parser("trace-sentence", help="one sentence through every layer: logit lens, D_l and PCA")
    stage.add_argument("--model-dir", required=True)
    stage.add_argument("--text", required=True, help="the sentence")
    stage.add_argument("--target", required=True, help="its last words whose prediction is traced, e.g. ' at the top'")
    stage.add_argument("--lens-out", required=True, help="per position and layer: top-1 token, probability, D_l")
    stage.add_argument("--pca-out", required=True, help="per position and layer: the state's first 3 PCA coordinates")
    stage.add_argument("--model", required=True)
    stage.add_argument("--variant", required=True)
    stage.add_argument("--keep-first-position", action="store_true",
                       help="keep the first position (the attention sink) in the PCA")
    stage.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    stage.add_argument("--device", type=device, default="cpu")

    stage = stages.add_parser("plot-trajectory", help="Fig. 4: per-layer states of the sentence in 3-D (PCA)")
    stage.add_argument("--table", required=True, help="the gathered sentence PCA table (Parquet)")
    stage.add_argument("--pdf", required=True)
    stage.add_argument("--png", required=True)
    stage.add_argument("--model", dest="models", type=name_label, nargs="+", required=True, help="NAME=LABEL, in order")
    stage.add_argument("--variants", nargs="+", required=True)
    stage.add_argument("--final-norm", default="hf", choices=("hf", "pre_norm"))
    stage.add_argument("--title", default="Fig. 4")

    stage = stages.add_parser("plot-lens-heatmap", help="Fig. 7: logit-lens top-1 token per layer at the target")
    stage.add_argument("--table", required=True, help="the gathered sentence logit-lens table (Parquet)")
    stage.add_argument("--pdf", required=True)
    stage.add_argument("--png", required=True)
    stage.add_argument("--model", required=True, type=name_label, help="NAME=LABEL")
    stage.add_argument("--variants", nargs="+", required=True)
    stage.add_argument("--final-norm", default="hf", choices=("hf", "pre_norm"))
    stage.add_argument("--title", default="Fig. 7")
    return parser


def run(args: argparse.Namespace) -> None:
    if args.stage == "prepare-model":
        from hsconv.models import prepare_model

        prepare_model(args.name, args.source, args.out, fold_final_norm_gain=args.fold_final_norm_gain)
    elif args.stage == "prepare-texts":
        from hsconv.texts import prepare_texts

        prepare_texts(args.name, args.kind, args.out, path=args.path, hub_id=args.hub_id,
                      subset_size=args.subset_size, subset_mode=args.subset_mode, subset_seed=args.subset_seed)
    elif args.stage == "sample-corpus":
        from hsconv.corpus import sample_corpus

        sample_corpus(args.source, args.out, documents=args.documents, seed=args.seed,
                      min_int_score=args.min_int_score, shuffle_buffer=args.shuffle_buffer,
                      shard_documents=args.shard_documents)
    elif args.stage == "pack-tokens":
        from hsconv.corpus import pack_tokens

        pack_tokens(args.corpus, args.model_dir, args.out, args.sequence_length, args.token_budget, args.boundary)
    elif args.stage == "dump-hidden-states":
        from hsconv.hidden_states import dump_hidden_states

        dump_hidden_states(args.model_dir, args.texts, args.out, variant=args.variant, dataset=args.dataset,
                           dtype=args.dtype, device=args.device, max_tokens=args.max_tokens, overflow=args.overflow,
                           batch_size=args.batch_size, exclude_special_tokens=not args.keep_special_tokens)
    elif args.stage == "distill":
        from hsconv.distill.train import DistillSettings, distill

        distill(args.model_dir, args.tokens, args.out, args.log_out, args.layers_out, args.checkpoints,
                DistillSettings.from_dict(args.settings), device=args.device, name=args.name,
                teacher_cache=args.teacher_cache)
    elif args.stage == "cache-teacher":
        from hsconv.distill.teacher import write_teacher_cache

        write_teacher_cache(args.model_dir, args.tokens, args.out, args.top_k, batch_size=args.batch_size,
                            dtype=args.dtype, device=args.device)
    elif args.stage == "plot-training":
        from hsconv.figures.training import plot_training

        plot_training(args.log, args.layers, args.pdf, args.png, args.title)
    elif args.stage == "evaluate-layers":
        from hsconv.evaluation.per_layer import evaluate_per_layer

        datasets = {name: (kind, path) for name, kind, path in args.datasets}
        limits = dict(args.limits)
        evaluate_per_layer(args.model_dir, datasets, args.out, args.json_out, args.model, args.variant,
                           layers=args.layers or None, batch_size=args.batch_size, dtype=args.dtype,
                           device=args.device, bootstrap_iters=args.bootstrap_iters, limits=limits,
                           documents_out=args.documents_out, stock=args.stock, tuned_lens=args.tuned_lens,
                           output_only=args.output_only)
    elif args.stage == "train-tuned-lens":
        from hsconv.tuned_lens import train_tuned_lens

        train_tuned_lens(args.model_dir, args.tokens, args.out, args.log_out, args.steps, args.batch_size,
                         args.learning_rate, args.holdout_sequences, args.seed, args.device, args.micro_batch_size)
    elif args.stage == "plot-per-layer":
        from hsconv.figures.per_layer import plot_per_layer

        plot_per_layer(args.table, args.pdf, args.png, dict(args.models), args.task, args.metric, args.title)
    elif args.stage == "prune-model":
        from hsconv.early_exit import prune_model

        prune_model(args.model_dir, args.keep_layers, args.out, keep_fraction=args.keep_fraction)
    elif args.stage == "tabulate-early-exit":
        from hsconv.early_exit import tabulate_early_exit

        tabulate_early_exit(args.evaluation, args.pruned, Path(args.exits_out).with_suffix(""),
                            Path(args.pruned_out).with_suffix(""), args.config_hash, tuple(args.tolerances))
    elif args.stage == "plot-early-exit":
        from hsconv.figures.early_exit import plot_early_exit

        plot_early_exit(args.evaluation, args.exits, args.pdf, args.png, dict(args.models), args.tolerance)
    elif args.stage == "paired-differences":
        from hsconv.paired import tabulate_paired_differences

        tabulate_paired_differences(args.documents, Path(args.out).with_suffix(""), args.config_hash,
                                    args.bootstrap_samples, args.confidence, args.seed)
    elif args.stage == "tabulate-ablations":
        from hsconv.ablations import tabulate_ablations

        tabulate_ablations(args.convergence, args.stock, args.documents, args.settings, args.variants,
                           Path(args.out).with_suffix(""), args.config_hash, args.bootstrap_samples,
                           args.confidence, args.seed)
    elif args.stage == "plot-ablations":
        from hsconv.figures.ablations import plot_ablations

        plot_ablations(args.table, args.pdf, args.png, dict(args.models), args.final_norm)
    elif args.stage == "compute-convergence":
        from hsconv.metrics import compute_convergence

        compute_convergence(args.hidden, args.layers_out, args.scores_out, args.model, args.variant, args.dataset,
                            quantiles=tuple(args.quantiles), bootstrap_samples=args.bootstrap_samples,
                            confidence=args.confidence, seed=args.seed)
    elif args.stage == "compare-convergence":
        from hsconv.metrics import compare_convergence

        compare_convergence(args.base, args.hidden, args.out, args.model, args.variant, args.dataset,
                            bootstrap_samples=args.bootstrap_samples, confidence=args.confidence, seed=args.seed)
    elif args.stage == "tabulate-seeds":
        from hsconv.seeds import tabulate_seeds

        tabulate_seeds(args.convergence or args.paired, args.first_seed, args.seeds, Path(args.out).with_suffix(""),
                       args.config_hash, paired=args.paired is not None)
    elif args.stage == "gather-tables":
        from hsconv.tables import gather_tables

        gather_tables(args.inputs, Path(args.out).with_suffix(""), args.config_hash, args.columns)
    elif args.stage == "plot-movement":
        from hsconv.figures.movement import plot_movement

        plot_movement(args.table, args.pdf, args.png, dict(args.models), args.dataset, args.final_norm, args.title)
    elif args.stage == "trace-sentence":
        from hsconv.sentence import trace_sentence_stage

        trace_sentence_stage(args.model_dir, args.text, args.target, args.lens_out, args.pca_out, args.model,
                             args.variant, pca_exclude_first=not args.keep_first_position, dtype=args.dtype,
                             device=args.device)
    elif args.stage == "plot-trajectory":
        from hsconv.figures.trajectory import plot_trajectory

        plot_trajectory(args.table, args.pdf, args.png, dict(args.models), args.variants, args.final_norm, args.title)
    elif args.stage == "plot-lens-heatmap":
        from hsconv.figures.lens_heatmap import plot_lens_heatmap

        plot_lens_heatmap(args.table, args.pdf, args.png, args.model[0], args.model[1], args.variants,
                          args.final_norm, args.title)


def main(argv: list[str] | None = None) -> int:
    return run_stage(build_parser().parse_args(argv))


def run_stage(args: argparse.Namespace) -> int:
    """Run one parsed stage; its exit status: 2 for bad input (one line naming the culprit), 1 for an environment
    failure such as a full disk (one line), and a traceback for anything else, which is a bug."""
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Embedding fonts in a PDF logs every glyph table at INFO.
    logging.getLogger("fontTools").setLevel(logging.WARNING)
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
    print(f"hsconv {args.stage}: {error}", file=sys.stderr, flush=True)
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
