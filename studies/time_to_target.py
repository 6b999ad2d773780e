"""Time to target: does ζ1 on a few sampled exits reach the full loss's convergence gain in less wall-clock?

    python -m studies.time_to_target                       # train every setting, evaluate its snapshots, report
    python -m studies.time_to_target --phase evaluate      # (again) evaluate what training left; skips what is done
    python -m studies.time_to_target --phase report        # only the table, the figure and the Markdown

Each setting trains the embedded default with the workflow's own trainer (``hsconv distill``: DeepSpeed ZeRO-2, one
process, on config.yaml's distill settings) on the same packed FineWeb-Edu rows in the same order with the same
learning-rate schedule; only the loss's exit sampling (``exit_samples``, ``exit_sampling``) and where the teacher comes
from differ (recomputed, or a top-k cache, ``teacher_top_k``, written once before and timed on its own). The trainings
run one after another and alone, since their step times are the measurement. A DeepSpeed checkpoint every
``--eval-every`` optimizer steps becomes a snapshot (the student's float32 master weights, as the trainer saves its
model); after all trainings, each snapshot is evaluated (not timed): S_model and the last
layer's D on held-out LAMBADA passages (both conventions for h_L, bootstrap interval over passages; the hidden-state
and metric stages' own code) and last-layer LAMBADA accuracy from stock lm-eval on the first passages, each passage's
outcome kept so that every snapshot is compared with the full loss's last one by a paired bootstrap. Wall-clock is the
sum of the training log's step times up to the snapshot: start-up, checkpoint writing and evaluation are excluded,
alike for every setting.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, SHARED, environment

OUT = ROOT / "results" / "benchmarks" / "time_to_target"
# name: (exit_samples, exit_sampling, optimizer steps, teacher_top_k). The faster settings get more steps.
SETTINGS = {"all-exits": (None, "uniform", 12, None), "m4-uniform": (4, "uniform", 24, None),
            "m4-keep-last": (4, "uniform_keep_last", 24, None), "m4-top256": (4, "uniform", 24, 256)}
REFERENCE = "all-exits"


def parse_setting(text: str) -> tuple[str, tuple]:
    """``NAME=M:SCHEME:STEPS[:TOPK]`` (M ``all`` for every exit; TOPK: read the teacher from a top-k cache)."""
    name, spec = text.split("=", 1)
    samples, scheme, steps, *top_k = spec.split(":")
    return name, (None if samples == "all" else int(samples), scheme, int(steps), int(top_k[0]) if top_k else None)


def prepare_inputs(model: str, out: Path, steps: int, batch: int, seq: int, accuracy_passages: int,
                   movement_passages: int) -> dict:
    """Packed training rows for the longest run and the two held-out LAMBADA sets, written once."""
    from hsconv.corpus import pack_tokens, sample_corpus
    from hsconv.texts import prepare_texts

    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    tokens = inputs / f"tokens-{steps * batch}x{seq}.parquet"
    if not tokens.exists():
        with tempfile.TemporaryDirectory() as tmp:
            sample_corpus({"kind": "jsonl", "path": str(SHARED / "fineweb_edu_10BT_150docs.jsonl")}, Path(tmp) / "c")
            pack_tokens(Path(tmp) / "c", model, tokens, seq, steps * batch * seq)
    paths = {"tokens": str(tokens)}
    for name, size in (("accuracy", accuracy_passages), ("movement", movement_passages)):
        path = inputs / f"lambada-{name}-{size}.parquet"
        if not path.exists():
            # The first passages for accuracy (the default's ablation set); a seeded sample for S_model.
            mode = "first" if name == "accuracy" else "sample"
            prepare_texts(name, "lambada", path, path=str(SHARED / "lambada_test.jsonl"), subset_size=size,
                          subset_mode=mode, subset_seed=1)
        paths[name] = str(path)
    return paths


def train(model: str, name: str, setting: tuple, inputs: dict, out: Path, eval_every: int, base_settings: dict) -> None:
    """One setting through ``hsconv distill``, a checkpoint every ``eval_every`` steps kept as a snapshot."""
    samples, scheme, steps, top_k = setting
    run = out / "runs" / name
    if (run / "steps.parquet").exists():
        print(f"{name}: trained already", flush=True)
        return
    settings = {**base_settings, "exit_samples": samples, "exit_sampling": scheme, "max_steps": steps,
                "checkpoint_every": eval_every, "keep_checkpoints": steps // eval_every + 1, "teacher_top_k": top_k}
    command = [sys.executable, "-m", "hsconv.cli", "distill", "--model-dir", model, "--tokens", inputs["tokens"],
               "--out", str(run / "model"), "--log-out", str(run / "steps.parquet"),
               "--layers-out", str(run / "layers.parquet"), "--checkpoints", str(run / "checkpoints"),
               "--settings", json.dumps(settings), "--name", name]
    run.mkdir(parents=True, exist_ok=True)
    if top_k is not None:
        command += ["--teacher-cache", str(teacher_cache(model, inputs, out, top_k))]
    print(f"{name}: training {steps} steps ({'all exits' if samples is None else f'{samples} exits, {scheme}'})",
          flush=True)
    with open(run / "train.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    # Each checkpoint becomes a snapshot (the float32 student, as the trainer saves its model); the DeepSpeed files
    # (the optimizer's states are 3× the weights) would fill the disk.
    for checkpoint in sorted((run / "checkpoints").glob("*/step*")):
        snapshot_model(model, checkpoint, run / "snapshots" / checkpoint.name, base_settings.get("frozen", ()))
    shutil.rmtree(run / "checkpoints")


def teacher_cache(model: str, inputs: dict, out: Path, top_k: int) -> Path:
    """The top-k cache of the training rows, written once (in a fresh process, timed) for every setting using k."""
    cache = out / "inputs" / f"teacher-top{top_k}"
    if not cache.exists():
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hsconv.cli", "cache-teacher", "--model-dir", model, "--tokens",
                        inputs["tokens"], "--out", str(cache), "--top-k", str(top_k)], check=True, cwd=ROOT,
                       capture_output=True)
        manifest = json.loads((cache / "manifest.json").read_text())
        (out / "inputs" / f"teacher-top{top_k}.json").write_text(json.dumps(
            {"top_k": top_k, "seconds": time.perf_counter() - started, "tokens": manifest["rows"] *
             manifest["sequence_length"], "bytes": sum(path.stat().st_size for path in cache.glob("*.npy"))}))
    return cache


def snapshot_model(model: str, checkpoint: Path, out: Path, frozen=()) -> None:
    """The student weights of a ZeRO-2 checkpoint as an HF model directory, as the trainer saves its model: the
    optimizer's float32 master copies of the trained parameters (the module's own weights in a bf16 run are those
    copies rounded to bf16) and the pretrained values of the ``frozen`` parts (which have no master)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from hsconv.distill.train import _trainable_parameters
    from hsconv.models import load_model, save_hf

    loaded = load_model(model)
    _trainable_parameters(loaded.model, tuple(frozen))
    # every name of a frozen tensor, a tied head's too (the checkpoint has it under both names, bf16-rounded)
    kept = {name for name, parameter in loaded.model.named_parameters(remove_duplicate=False)
            if not parameter.requires_grad}
    states = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    student = {key.removeprefix("student."): value for key, value in states.items()
               if key.startswith("student.") and key.removeprefix("student.") not in kept}
    missing, unexpected = loaded.model.load_state_dict(student, strict=False)
    # A tied head has no weight of its own in the state dict; anything else missing would be a bug.
    if unexpected or [key for key in missing if key != "lm_head.weight" and key not in kept]:
        raise RuntimeError(f"{checkpoint}: missing {missing}, unexpected {unexpected}")
    save_hf(loaded.model, loaded.tokenizer, out)


def evaluate_model(model_dir: str, inputs: dict, out: Path, accuracy_passages: int, bootstrap: int) -> dict:
    """S_model and last-layer D (both conventions) on the movement passages; stock lm-eval accuracy per passage."""
    import pandas as pd

    from hsconv.evaluation.per_layer import evaluate_per_layer
    from hsconv.hidden_states import dump_hidden_states
    from hsconv.metrics import summarise_movement

    with tempfile.TemporaryDirectory() as tmp:
        # (truncate: a passage longer than the context, as byte-level tokens of a test model can be, keeps its end)
        tokens = dump_hidden_states(model_dir, inputs["movement"], Path(tmp) / "hidden.parquet", batch_size=8,
                                    overflow="truncate")
        _, scores = summarise_movement(tokens, bootstrap_samples=bootstrap)
        evaluate_per_layer(model_dir, {"lambada": ("lambada", inputs["accuracy"])}, Path(tmp) / "acc.parquet",
                           Path(tmp) / "acc.json", model="smollm2", variant="snapshot",
                           limits={"lambada": accuracy_passages}, documents_out=out, stock=True, batch_size=8)
        documents = pd.read_parquet(out)
    result = {"accuracy": float(documents["acc"].mean())}
    for row in scores.itertuples():
        result.update({f"s_model_{row.final_norm}": row.s_model, f"s_model_{row.final_norm}_low": row.s_model_ci_low,
                       f"s_model_{row.final_norm}_high": row.s_model_ci_high,
                       f"last_movement_{row.final_norm}": row.last_layer_movement})
    return result


def evaluate(model: str, settings: dict, inputs: dict, out: Path, accuracy_passages: int, bootstrap: int) -> None:
    """Every snapshot of every setting, and the pretrained model as step 0; each result is written as it is made."""
    import pandas as pd

    evaluated = out / "evaluated"
    evaluated.mkdir(parents=True, exist_ok=True)
    jobs = [("pretrained", 0, None)]
    for name in settings:
        for snapshot in sorted((out / "runs" / name / "snapshots").glob("step*")):
            jobs.append((name, int(snapshot.name.removeprefix("step")), snapshot))
    for name, step, snapshot in jobs:
        record = evaluated / f"{name}-step{step:03d}.json"
        if record.exists():
            continue
        print(f"evaluating {name} at step {step}", flush=True)
        documents = evaluated / f"{name}-step{step:03d}-passages.parquet"
        result = evaluate_model(model if snapshot is None else str(snapshot), inputs, documents, accuracy_passages,
                                bootstrap)
        seconds = 0.0
        if snapshot is not None:
            log = pd.read_parquet(out / "runs" / name / "steps.parquet")
            seconds = float(log.loc[log["step"] <= step, "seconds"].sum())
        record.write_text(json.dumps({"setting": name, "step": step, "train_seconds": seconds, **result}, indent=1))


def tabulate(out: Path, settings: dict, bootstrap: int) -> "pd.DataFrame":
    """One row per (setting, snapshot), the pretrained model as every setting's step 0, with the paired accuracy
    difference from the full loss's last snapshot."""
    import pandas as pd

    from hsconv.paired import paired_differences

    records = [json.loads(path.read_text()) for path in sorted((out / "evaluated").glob("*.json"))]
    pretrained = next(record for record in records if record["setting"] == "pretrained")
    rows = []
    for name, (samples, scheme, _, top_k) in settings.items():
        own = [record for record in records if record["setting"] == name]
        for record in [{**pretrained, "setting": name}, *own]:
            rows.append({**record, "exit_samples": "all" if samples is None else str(samples), "exit_sampling": scheme,
                         "teacher": "recomputed" if top_k is None else f"top-{top_k} cache"})
    table = pd.DataFrame(rows).sort_values(["setting", "step"], ignore_index=True)
    reference_step = table.loc[table["setting"] == REFERENCE, "step"].max()

    def passages(setting: str, step: int) -> pd.DataFrame:
        source = "pretrained" if step == 0 else setting
        frame = pd.read_parquet(out / "evaluated" / f"{source}-step{step:03d}-passages.parquet")
        return frame.assign(variant=f"{setting}@{step}")

    documents = pd.concat([passages(row.setting, row.step) for row in table.itertuples()]
                          + [passages(REFERENCE, reference_step).assign(variant="reference")], ignore_index=True)
    differences = paired_differences(documents.assign(model="smollm2"), baseline="reference", samples=bootstrap)
    differences = differences.set_index("variant")
    keys = [f"{row.setting}@{row.step}" for row in table.itertuples()]
    table["accuracy_minus_reference"] = differences.loc[keys, "difference"].to_numpy()
    table["accuracy_minus_reference_low"] = differences.loc[keys, "lower"].to_numpy()
    table["accuracy_minus_reference_high"] = differences.loc[keys, "upper"].to_numpy()
    # Seconds per step of each setting (median over its logged steps), for the speed-up per step.
    for name in settings:
        log = pd.read_parquet(out / "runs" / name / "steps.parquet")
        table.loc[table["setting"] == name, "median_step_seconds"] = float(log["seconds"].median())
    return table


def time_to_target(table, convention: str = "pre_norm") -> list[dict]:
    """For each setting, the first snapshot whose S_model reaches the full loss's last one, and its wall-clock."""
    column = f"s_model_{convention}"
    reference = table[table["setting"] == REFERENCE].sort_values("step").iloc[-1]
    rows = []
    for name, frame in table.groupby("setting", sort=False):
        reached = frame[(frame["step"] > 0) & (frame[column] >= reference[column])].sort_values("step")
        first = reached.iloc[0] if len(reached) else None
        rows.append({"setting": name, "target": float(reference[column]),
                     "step": None if first is None else int(first["step"]),
                     "seconds": None if first is None else float(first["train_seconds"]),
                     "accuracy": None if first is None else float(first["accuracy"]),
                     "accuracy_minus_reference": None if first is None else float(first["accuracy_minus_reference"]),
                     "low": None if first is None else float(first["accuracy_minus_reference_low"]),
                     "high": None if first is None else float(first["accuracy_minus_reference_high"])})
    return rows


def plot(table, pdf: Path, png: Path, passages: int, convention: str = "pre_norm") -> None:
    import matplotlib.pyplot as plt

    from hsconv.figures.style import apply_style, model_colour, save_figure

    apply_style()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    reference = table[table["setting"] == REFERENCE].sort_values("step").iloc[-1]
    markers = ["o", "s", "^", "D", "v"]
    for index, (name, frame) in enumerate(table.groupby("setting", sort=False)):
        frame = frame.sort_values("step")
        label = f"{name} ({frame['median_step_seconds'].iloc[0]:.0f} s/step)"
        style = dict(color=model_colour(index), marker=markers[index % len(markers)], label=label)
        column = f"s_model_{convention}"
        axes[0].errorbar(frame["train_seconds"], frame[column],
                         yerr=[frame[column] - frame[f"{column}_low"], frame[f"{column}_high"] - frame[column]],
                         capsize=2, **style)
        axes[1].plot(frame["train_seconds"], 100 * frame["accuracy"], **style)
    axes[0].axhline(reference[f"s_model_{convention}"], color="grey", linestyle=":", linewidth=1,
                    label=f"target: {REFERENCE} after {int(reference['step'])} steps")
    axes[0].set_ylabel(f"S_model on held-out LAMBADA (h_L {convention.replace('_', '-')})")
    axes[1].set_ylabel("last-layer LAMBADA accuracy (%)")
    for axis in axes:
        axis.set_xlabel("training wall-clock (s, 2 CPU cores)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    figure.suptitle("SmolLM2-135M-Instruct self-distilled, every exit vs sampled exits: S_model and accuracy "
                    f"({passages} LAMBADA passages) against training wall-clock", fontsize=10)
    figure.tight_layout()
    save_figure(figure, pdf, png)
    plt.close(figure)


def markdown(table, targets: list[dict], environment_record: dict, caches: list[dict]) -> str:
    from hsconv.io import markdown_table

    shown = table[["setting", "teacher", "step", "train_seconds", "s_model_pre_norm", "s_model_pre_norm_low",
                   "s_model_pre_norm_high", "s_model_hf", "last_movement_pre_norm", "accuracy",
                   "accuracy_minus_reference", "accuracy_minus_reference_low", "accuracy_minus_reference_high"]]
    lines = ["# Time to target: every exit vs sampled exits (SmolLM2-135M-Instruct, CPU)", "",
             __doc__.split("\n\n", 2)[2].strip(), "",
             f"Machine: {environment_record['cpu']}, {environment_record['threads']} threads, torch "
             f"{environment_record['torch']}.", "", "## Reaching the full loss's S_model (pre-norm h_L)", "",
             "| setting | median s/step | target S | first step at or above | wall-clock (s) | LAMBADA acc there | "
             "− full loss's last (points) [95% paired] |", "|---|---|---|---|---|---|---|"]
    for row in targets:
        step_seconds = table.loc[table["setting"] == row["setting"], "median_step_seconds"].iloc[0]
        if row["step"] is None:
            lines.append(f"| {row['setting']} | {step_seconds:.1f} | {row['target']:.4f} | not reached | — | — | — |")
        else:
            lines.append(f"| {row['setting']} | {step_seconds:.1f} | {row['target']:.4f} | {row['step']} | "
                         f"{row['seconds']:.0f} | {100 * row['accuracy']:.1f}% | "
                         f"{100 * row['accuracy_minus_reference']:+.1f} [{100 * row['low']:+.1f}, "
                         f"{100 * row['high']:+.1f}] |")
    for cache in caches:
        lines += ["", f"The top-{cache['top_k']} teacher cache of the {cache['tokens']:,} training tokens took "
                  f"{cache['seconds']:.0f} s to write (a fresh process: model load, one teacher pass, top-k, disk) and "
                  f"holds {cache['bytes'] / 1e6:,.1f} MB ({cache['bytes'] / cache['tokens'] * 1e6 / 1e9:.2f} GB per "
                  "million tokens); it is not in the settings' wall-clock, as it is paid once for every run on these "
                  "rows."]
    lines += ["", "## Every snapshot", "", markdown_table(shown)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=("all", "train", "evaluate", "report"), default="all")
    parser.add_argument("--setting", action="append", type=parse_setting, metavar="NAME=M:SCHEME:STEPS[:TOPK]",
                        help=f"a setting (M 'all' for every exit; TOPK a teacher cache); default: {SETTINGS}")
    parser.add_argument("--eval-every", type=int, default=4, help="optimizer steps between snapshots")
    parser.add_argument("--accuracy-passages", type=int, default=200)
    parser.add_argument("--movement-passages", type=int, default=50)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--model-dir", default=None, help="a prepared model (default: the embedded default's)")
    parser.add_argument("--report-dir", default=None, help="also copy the table, figure and Markdown here")
    args = parser.parse_args()
    from bench.report import model_dir
    from hsconv.variants import trainer_settings

    settings = dict(args.setting) if args.setting else SETTINGS
    out = Path(args.out)
    model = args.model_dir or model_dir()
    defaults = __import__("yaml").safe_load((ROOT / "config.yaml").read_text())["distill"]
    base_settings = trainer_settings(defaults)  # less what only the workflow reads (resources, seeds)
    # snapshots are read from the checkpoints by DeepSpeed's zero_to_fp32, which reads ZeRO-1/2 checkpoints, not those
    # of the bf16 optimizer that `zero_stage: auto` takes in bf16
    base_settings["zero_stage"] = 2
    batch, seq = base_settings["batch_size"], 128
    inputs = prepare_inputs(model, out, max(setting[2] for setting in settings.values()), batch, seq,
                            args.accuracy_passages, args.movement_passages)
    if args.phase in ("all", "train"):
        for name, setting in settings.items():
            train(model, name, setting, inputs, out, args.eval_every, base_settings)
    if args.phase in ("all", "evaluate"):
        evaluate(model, settings, inputs, out, args.accuracy_passages, args.bootstrap)
        for name in settings:  # the snapshots are large and no longer needed
            shutil.rmtree(out / "runs" / name / "snapshots", ignore_errors=True)
    if args.phase in ("all", "report"):
        from hsconv.io import write_table

        table = tabulate(out, settings, args.bootstrap)
        targets = time_to_target(table)
        write_table(table, out / "time_to_target", {"time_to_target": {"settings": {k: list(v) for k, v in
                                                                                     settings.items()}}})
        plot(table, out / "time_to_target.pdf", out / "time_to_target.png", args.accuracy_passages)
        record = environment()
        (out / "targets.json").write_text(json.dumps({"environment": record, "targets": targets}, indent=1))
        caches = [json.loads(path.read_text()) for path in sorted((out / "inputs").glob("teacher-top*.json"))]
        (out / "time_to_target.md").write_text(markdown(table, targets, record, caches))
        if args.report_dir:
            target = Path(args.report_dir)
            target.mkdir(parents=True, exist_ok=True)
            for name in ("time_to_target.md", "time_to_target.png", "time_to_target.csv", "targets.json"):
                shutil.copy(out / name, target / name)
        print((out / "time_to_target.md").read_text())


if __name__ == "__main__":
    main()
