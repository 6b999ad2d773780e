"""``hsconv <stage>``: every pipeline stage as a command, so each runs and is tested without Snakemake.

Rules in ``workflow/rules`` call these commands; run ``hsconv <stage> --help`` for a stage's arguments. A stage is one
package function: its flags come from the function's signature and the ``@flags`` beside it (:mod:`hsconv.flags`),
and its module is imported only when the stage runs, so that `hsconv --help` and the plotting stages stay torch-free.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import re
import sys
import traceback

from hsconv.errors import EXIT_BAD_INPUT, InputError
from hsconv.flags import add_flags, call
from hsconv.lifetime import stop_with_workflow

STAGES = {  # stage: (module:function, what it does)
    "prepare-model": ("models:prepare_model", "resolve a model source into a model directory"),
    "prepare-texts": ("texts:prepare_texts", "read, subset and write an evaluation data set as Parquet"),
    "sample-corpus": ("corpus:sample_corpus", "draw training documents into Parquet shards with a manifest"),
    "pack-tokens": ("corpus:pack_tokens", "tokenise sampled documents and pack fixed-length sequences"),
    "dump-hidden-states": ("hidden_states:dump_hidden_states", "per-token, per-layer movement from one forward pass"),
    "distill": ("distill.train:distill", "self-distil a model under DeepSpeed ZeRO (resumes from checkpoints)"),
    "cache-teacher": ("distill.teacher:write_teacher_cache", "the frozen model's top-k distribution, for every run"),
    "plot-training": ("figures.training:plot_training", "loss curves of a distillation run"),
    "evaluate-layers": ("evaluation.per_layer:evaluate_per_layer", "per-layer lm-eval through the logit lens"),
    "train-tuned-lens": ("tuned_lens:train_tuned_lens", "per-layer affine translators (the tuned-lens baseline)"),
    "plot-per-layer": ("figures.per_layer:plot_per_layer", "Figs. 5, 6, 9, 10: a per-layer lm-eval metric per model"),
    "prune-model": ("early_exit:prune_model", "keep a model's first layers (with its final norm and head)"),
    "tabulate-early-exit": ("early_exit:tabulate_early_exit", "the shallowest exit within each tolerance; pruned"),
    "plot-early-exit": ("figures.early_exit:plot_early_exit", "quality against the fraction of layers kept"),
    "paired-differences": ("paired:tabulate_paired_differences", "variant − base per exit, paired by document"),
    "tabulate-variants": ("ablations:tabulate_variants", "S_model, D_L and accuracy per ablation or recipe"),
    "plot-ablations": ("figures.ablations:plot_ablations", "S_model, D_L and accuracy per setting, a row per model"),
    "plot-frontier": ("figures.frontier:plot_frontier", "the recipes' S_model against their accuracy cost"),
    "compute-convergence": ("metrics:compute_convergence", "D_l per layer and S_model from the per-token table"),
    "compare-convergence": ("metrics:compare_convergence", "variant − base S_model, paired by document"),
    "tabulate-seeds": ("seeds:tabulate_seeds", "spread over seeds of S_model or of paired differences"),
    "gather-tables": ("tables:gather_tables", "concatenate per-model tables into Parquet, CSV and Markdown"),
    "plot-movement": ("figures.movement:plot_movement", "Figs. 3 and 8: D_l per layer, one panel per model"),
    "trace-sentence": ("sentence:trace_sentence_stage", "one sentence through every layer: logit lens, D_l and PCA"),
    "plot-trajectory": ("figures.trajectory:plot_trajectory", "Fig. 4: per-layer states of the sentence in 3-D (PCA)"),
    "plot-lens-heatmap": ("figures.lens_heatmap:plot_lens_heatmap", "Fig. 7: the logit lens's top-1 per layer"),
    "layer-relevance": ("evaluation.layer_skip:measure_layer_relevance", "each block removed, alone and greedily"),
    "tabulate-layer-relevance": ("layer_relevance:tabulate_layer_relevance", "movement beside removal, per block"),
    "plot-layer-relevance": ("figures.layer_relevance:plot_layer_relevance", "D_l beside the removal KL per block"),
}


def stage_function(stage: str):
    """The package function a stage runs (importing its module)."""
    module, function = STAGES[stage][0].split(":")
    return getattr(importlib.import_module(f"hsconv.{module}"), function)


class StageParser(argparse.ArgumentParser):
    """argparse, whose usage errors are one line in the form of every other bad-input message (exit status 2)."""

    def error(self, message: str):
        option = re.match(r"argument ([^:]+): (.*)", message, re.S)
        message = f"{option.group(2)} ({option.group(1)})" if option else message
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message}: see `{self.prog} --help`\n")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser, with the flags of the stage ``argv`` names (only that stage's module is imported)."""
    parser = StageParser(prog="hsconv", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("--debug", action="store_true", help="show the traceback of a bad-input error too")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (_, help) in STAGES.items():
        stage = stages.add_parser(name, help=help, description=help)
        if name in argv:
            add_flags(stage, stage_function(name))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_stage(build_parser(argv).parse_args(argv))


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
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # embedding fonts in a PDF logs every glyph at INFO
    stop_with_workflow(args.stage)
    try:
        call(stage_function(args.stage), args)
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
    where = "" if os.environ.get("RANK", "0") == "0" else f" (rank {os.environ['RANK']})"
    print(f"hsconv {args.stage}{where}: {error}", file=sys.stderr, flush=True)
    return status


def entry_point() -> None:
    """The `hsconv` command. A stage that started DeepSpeed/gloo leaves without the interpreter's teardown once its
    outputs are written and flushed: gloo's native threads can still be joinable then, and the process aborts
    (SIGABRT, seen under load on a 2-core machine) after its outputs are already in place."""
    args = build_parser(sys.argv[1:]).parse_args()
    status = run_stage(args)
    if args.stage == "distill":
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry_point()
