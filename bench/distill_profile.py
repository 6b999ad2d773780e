"""Where the default distillation step's time goes, phase by phase, against the matmul limit of its precision.

    python -m bench.distill_profile --model-dir results/models/smollm2-135m/base \
        --tokens results/data/tokens/smollm2-135m.parquet [--config config.yaml] [--steps 6] [--precision float32] \
        [--before]

``--before`` profiles, first and in the same process, the step as the trainer took it before its optimizer was fused,
ZeRO's stage chosen by ``zero_stage: auto`` and its layers and the loss's vocabulary-sized arithmetic compiled
(ZeRO-2, AdamW's per-tensor loop, ``compile: never``), and prints the two side by side.

The step is the trainer's own (``hsconv.distill.train``: the DeepSpeed engine, the config's loss, exits, frozen parts
and precision); each phase is timed by wrapping the function that does it, in one process, after one warm-up step:

- teacher forward: the frozen model's decoder (no gradient);
- student forward: the student's decoder, all L+1 states kept for backward;
- exit heads: ``FusedLogitLensKL``, which forms each sampled exit's logits chunk by chunk, the teacher's logits for
  the chunk, the KL and the gradient with respect to the exit's state (the head products and their backward; one
  d × V product each for the logits, the state's gradient and, where the head trains, the weight's);
- loss, rest: the forward's remainder (final norm, ζ2, exit draw, DeepSpeed's forward wrapper);
- decoder backward: ``engine.backward`` (autograd through the student);
- optimizer: ``engine.step`` (ZeRO's gradient reduction and partition copies, AdamW, the bf16 copies of the masters);
- data and the rest: the step's time outside all of these.

Each phase's arithmetic is counted as in ``bench.common`` (a multiply-add is 2; backward is twice the forward) and
set against the best rate of a 2048² ``torch.matmul`` in the step's precision, measured in the same process before
the step. The LM head's own shape (256 tokens × d × V) is measured too: it is the product the exit heads run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from bench.common import (ROOT, compiled_note, decoder_flops, environment, head_flops, matmul_limit, model_shape,
                          spread)

PHASES = ("teacher forward", "student forward", "exit heads", "loss, rest", "decoder backward", "optimizer",
          "data and the rest")


def head_shape_limit(shape: dict, dtype: str, tokens: int = 256, repeats: int = 5) -> float:
    """Best GFLOP/s of the exit head's product (tokens × d by d × V) in ``dtype``."""
    import torch

    dtype = getattr(torch, dtype)
    x = torch.randn(tokens, shape["d"], dtype=dtype)
    weight = torch.randn(shape["vocab"], shape["d"], dtype=dtype)
    torch.nn.functional.linear(x, weight)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        torch.nn.functional.linear(x, weight)
        best = max(best, 2 * tokens * shape["d"] * shape["vocab"] / (time.perf_counter() - started) / 1e9)
    return best


class PhaseClock:
    """Seconds spent in each phase during the current step (wall clock; phases do not overlap)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            with self.phase(name):
                return function(*args, **kwargs)
        return timed


def instrument(engine, clock: PhaseClock, inner: dict):
    """Wrap the functions that do each phase (see the module's docstring); ``inner`` collects the seconds of phases
    nested in the engine's forward and backward, subtracted to give the remainders. Returns the function that puts
    the modules' own functions back."""
    import hsconv.distill.loss as loss
    import hsconv.distill.objective as objective

    module = engine.module
    states = objective.decoder_states

    def decoder_states(model, *args, **kwargs):
        name = "teacher forward" if model is module.target else "student forward"
        with clock.phase(name):
            return states(model, *args, **kwargs)

    objective.decoder_states = decoder_states
    fused_forward, fused_backward = loss.FusedLogitLensKL.forward, loss.FusedLogitLensKL.backward
    loss.FusedLogitLensKL.forward = staticmethod(clock.wrap("exit heads", fused_forward))

    def backward_of_heads(ctx, *grads):
        started = time.perf_counter()
        result = fused_backward(ctx, *grads)
        inner["heads backward"] += time.perf_counter() - started
        return result

    loss.FusedLogitLensKL.backward = staticmethod(backward_of_heads)
    forward, backward, step = engine.forward, engine.backward, engine.step

    def timed_forward(*args, **kwargs):
        started = time.perf_counter()
        before = sum(clock.seconds[name] for name in ("teacher forward", "student forward", "exit heads"))
        result = forward(*args, **kwargs)
        nested = sum(clock.seconds[name] for name in ("teacher forward", "student forward", "exit heads")) - before
        clock.seconds["loss, rest"] += time.perf_counter() - started - nested
        return result

    def timed_backward(*args, **kwargs):
        with clock.phase("decoder backward"):
            return backward(*args, **kwargs)

    engine.forward = timed_forward
    engine.backward = timed_backward
    engine.step = clock.wrap("optimizer", step)

    def restore():
        objective.decoder_states = states
        loss.FusedLogitLensKL.forward, loss.FusedLogitLensKL.backward = (staticmethod(fused_forward),
                                                                        staticmethod(fused_backward))
    return restore


def phase_flops(shape: dict, seq: int, tokens: int, exits: int, head_trains: bool) -> dict:
    """Floating-point operations of each phase in one step of ``tokens`` tokens."""
    decoder, head = decoder_flops(shape, seq), head_flops(shape)
    # per exit: its logits, the gradient to its state, and the head weight's gradient when the head trains, one
    # d × V product each; once: the teacher's logits. (Before 2026-12-08 this counted the state's gradient twice and
    # the weight's twice, which overstated the exit heads' rate by 3/2 with a frozen head.)
    heads = head + exits * (2 * head + (head if head_trains else 0))
    return {"teacher forward": decoder * tokens, "student forward": decoder * tokens, "exit heads": heads * tokens,
            "decoder backward": 2 * decoder * tokens}


@contextmanager
def unfused_adamw():
    """torch.optim.AdamW as the trainer built it before (no ``fused``): the baseline of ``--before``. Its
    ``__init__`` is wrapped rather than subclassed: DeepSpeed's ZeRO accepts AdamW by its exact type."""
    import torch

    init = torch.optim.AdamW.__init__

    def loop_init(self, *args, **kwargs):
        kwargs.pop("fused", None)
        init(self, *args, **kwargs)

    torch.optim.AdamW.__init__ = loop_init
    try:
        yield
    finally:
        torch.optim.AdamW.__init__ = init


def profile(model_dir: str, tokens_path: str, distill_section: dict, steps: int) -> dict:
    from hsconv.distill import train
    from hsconv.precision import resolve_precision
    from hsconv.settings import DistillSettings

    settings = DistillSettings.from_dict({**distill_section, "max_steps": steps + 1, "checkpoint_every": 10**6})
    precision = resolve_precision(settings.train.precision, "cpu")
    limits = {dtype: matmul_limit(dtype=dtype) for dtype in ("float32", "bfloat16")}
    plan = train._plan(model_dir, tokens_path, settings, "cpu", None, None)
    # the caller's process group serves every profile of the run (DeepSpeed keeps its groups for the process)
    engine, _, bf16, _ = train._engine(plan, model_dir, settings, "cpu", 0)
    shape = model_shape(plan.base.model.config)
    head_limits = {dtype: head_shape_limit(shape, dtype) for dtype in ("float32", "bfloat16")}
    clock, inner = PhaseClock(), {"heads backward": 0.0}
    restore = instrument(engine, clock, inner)
    rows = []
    for step in range(steps + 1):
        clock.seconds = dict.fromkeys(PHASES, 0.0)
        inner["heads backward"] = 0.0
        started = time.perf_counter()
        stats = train._step(engine, plan, settings.train, step, 0, 1)
        total = time.perf_counter() - started
        # the heads' backward ran inside engine.backward: it belongs to the exit heads
        clock.seconds["decoder backward"] -= inner["heads backward"]
        clock.seconds["exit heads"] += inner["heads backward"]
        clock.seconds["data and the rest"] = total - sum(clock.seconds.values())
        rows.append({"step": step, "seconds": total, "tokens": int(stats.tokens.item()), **clock.seconds})
    restore()
    loss_settings = settings.loss
    exits = loss_settings.exit_samples or shape["layers"] + 1
    head_trains = "embeddings" not in settings.train.frozen
    timed = rows[1:]  # the first step warms up
    flops = phase_flops(shape, plan.ids.shape[1], timed[0]["tokens"], exits, head_trains)
    return {"rows": rows, "flops": flops, "precision": "bfloat16" if bf16 else "float32", "resolved": precision,
            "zero_stage": engine.zero_optimization_stage(), "optimizer": type(engine.optimizer).__name__,
            "compiled": engine.module.compile_kernels,
            "compiled_layers": engine.module.compiled_layers,
            "limits": limits, "head_limits": head_limits, "shape": shape, "exits": exits,
            "batch": settings.train.batch_size, "micro_batch": settings.train.micro_batch_size,
            "sequence": int(plan.ids.shape[1]), "environment": environment(), "settings": settings.to_dict()}


def markdown(result: dict, limit: float | None = None) -> str:
    """The profile's table; percentages of ``limit`` (default: the matmul limit measured in the same process)."""
    timed = result["rows"][1:]
    precision = result["precision"]
    limit = limit or result["limits"][precision]["best_gflops"]
    total_flops = sum(result["flops"].values())
    lines = [f"| phase | seconds per step (min / median / max) | share of the step | GFLOP per step | GFLOP/s | "
             f"% of the {precision} matmul limit |", "|---|---|---|---|---|---|"]
    step_seconds = [row["seconds"] for row in timed]
    for name in PHASES:
        seconds = [row[name] for row in timed]
        share = spread([100 * s / row["seconds"] for s, row in zip(seconds, timed)], "{:.0f}%")
        flops = result["flops"].get(name)
        if flops:
            rates = [flops / s / 1e9 for s in seconds]
            rate, percent = spread(rates), spread([100 * r / limit for r in rates], "{:.0f}%")
            gflop = f"{flops / 1e9:,.1f}"
        else:
            rate = percent = gflop = "(no matmul counted)"
        lines.append(f"| {name} | {spread(seconds, '{:.3f}')} | {share} | {gflop} | {rate} | {percent} |")
    rates = [total_flops / s / 1e9 for s in step_seconds]
    tokens = timed[0]["tokens"]
    lines.append(f"| **the step** | {spread(step_seconds, '{:.3f}')} | 100% | {total_flops / 1e9:,.1f} | "
                 f"{spread(rates)} | {spread([100 * r / limit for r in rates], '{:.0f}%')} |")
    env = result["environment"]
    lines += ["", f"{len(timed)} timed steps after one warm-up; {tokens:,} tokens a step (batch {result['batch']} × "
                  f"{result['sequence']} tokens, micro-batch {result['micro_batch']}), "
                  f"{spread([tokens / s for s in step_seconds])} tokens/s; {result['exits']} exits a step; "
                  f"precision {precision}, ZeRO stage {result['zero_stage']} ({result['optimizer']})"
                  f"{compiled_note(result)}. Matmul limits in this process (2048², best of 7): float32 "
                  f"{result['limits']['float32']['best_gflops']:.1f}, bfloat16 "
                  f"{result['limits']['bfloat16']['best_gflops']:.1f} GFLOP/s; the exit head's shape (256 × "
                  f"{result['shape']['d']} by {result['shape']['d']} × {result['shape']['vocab']:,}): float32 "
                  f"{result['head_limits']['float32']:.1f}, bfloat16 {result['head_limits']['bfloat16']:.1f} GFLOP/s. "
                  f"{env['cpu']}, {env['threads']} threads, torch {env['torch']}."]
    return "\n".join(lines)


def default_section(config: str | Path = ROOT / "config.yaml") -> dict:
    """The config's distill section as the trainer reads it (without the workflow's keys)."""
    section = yaml.safe_load(Path(config).read_text())["distill"]
    return {key: value for key, value in section.items() if key not in ("seeds", "resources")}


def measure(model_dir: str, tokens: str, section: dict, steps: int, precisions=(None,), before: bool = True) -> dict:
    """For each precision (None: the section's own), the step as it was (``before``) and as it is now, one process
    group for all of them. Keyed ``"<precision>/<before|now>"``."""
    from hsconv.distill.train import _init_distributed

    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    _init_distributed("cpu")
    results = {}
    for precision in precisions:
        settings = {**section, **({"precision": precision} if precision else {})}
        name = precision or settings.get("precision", "auto")
        if before:
            with unfused_adamw():
                results[f"{name}/before"] = profile(model_dir, tokens, {**settings, "zero_stage": 2,
                                                                        "compile": "never"}, steps)
        results[f"{name}/now"] = profile(model_dir, tokens, settings, steps)
    return results


def best_limits(results: dict) -> dict[str, float]:
    """Per precision, the best matmul rate measured in any of the runs: a shared machine's slower moments would
    otherwise flatter the phases measured during them."""
    return {dtype: max(result["limits"][dtype]["best_gflops"] for result in results.values())
            for dtype in ("float32", "bfloat16")}


def report(results: dict) -> str:
    """The tables of :func:`measure`'s runs, each pair with its before/now line; every percentage is of the best
    matmul rate of its precision measured in the whole run."""
    limits = best_limits(results)
    parts = []
    for key, result in results.items():
        name, when = key.split("/")
        label = ("before: ZeRO-2, AdamW per tensor, nothing compiled" if when == "before"
                 else "now: the trainer as it is")
        parts += [f"**precision {name} (ran in {result['precision']}), {label}**", "",
                  markdown(result, limits[result["precision"]]), ""]
        if when == "now" and f"{name}/before" in results:
            parts += [comparison(results[f"{name}/before"], result, limits[result["precision"]]), ""]
    spans = ", ".join(f"{dtype} {min(r['limits'][dtype]['best_gflops'] for r in results.values()):.1f}–"
                      f"{limits[dtype]:.1f}" for dtype in limits)
    parts.append(f"Percentages are of the best matmul rate of each precision measured in this run; between the runs "
                 f"it ranged {spans} GFLOP/s.")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--tokens", required=True, help="the packed tokens the default trains on (Parquet)")
    parser.add_argument("--config", default=str(ROOT / "config.yaml"), help="whose distill section to profile")
    parser.add_argument("--steps", type=int, default=6, help="timed steps after one warm-up step")
    parser.add_argument("--precision", nargs="+", choices=["auto", "float32", "bfloat16"],
                        help="override distill.precision (several: one profile each)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=YAML", help="override distill settings")
    parser.add_argument("--before", action="store_true",
                        help="first profile the step as it was (ZeRO-2, AdamW per tensor, nothing compiled), "
                             "in the same process")
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args()
    section = default_section(args.config)
    for item in args.set:
        key, value = item.split("=", 1)
        section[key] = yaml.safe_load(value)
    results = measure(args.model_dir, args.tokens, section, args.steps, args.precision or (None,), args.before)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print(report(results))


def comparison(before: dict, now: dict, limit: float | None = None) -> str:
    """One line: the step's median seconds, tokens/s and share of the matmul limit, before and now (default limit:
    the better of the two runs' measurements, so that a slower moment of the machine does not flatter either)."""
    limit = limit or max(result["limits"][now["precision"]]["best_gflops"] for result in (before, now))

    def summary(result):
        timed = result["rows"][1:]
        seconds = statistics.median(row["seconds"] for row in timed)
        rate = sum(result["flops"].values()) / seconds / 1e9
        return seconds, timed[0]["tokens"] / seconds, rate, 100 * rate / limit
    (s0, t0, r0, p0), (s1, t1, r1, p1) = summary(before), summary(now)
    return (f"median step {s0:.2f} s → {s1:.2f} s; {t0:.1f} → {t1:.1f} tokens/s ({t1 / t0:.2f}×); "
            f"{r0:.1f} → {r1:.1f} GFLOP/s, {p0:.0f}% → {p1:.0f}% of the {now['precision']} matmul limit "
            f"({limit:.1f} GFLOP/s).")


if __name__ == "__main__":
    main()
