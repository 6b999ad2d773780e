"""Benchmark of one self-distillation training step: the fused per-layer loss against the naive one.

    python -m bench.distill_step --model-dir results/models/smollm2-135m/base \
        --tokens results/data/tokens/smollm2-135m.parquet [--shapes 4x256 8x512 --exits 8 16 31]

A step is: the frozen target's forward, the student's forward with all L+1 states, ζ = ζ1 + α ζ2 (α=1, k=0.25,
the paper's KL direction), backward, AdamW. ζ1 covers every exit, or m of them (``exit_samples``, uniform) for
the exits sweep. Each run is a fresh process so that its peak resident memory (ru_maxrss) is its own; "step peak"
is that peak minus the resident memory just before the first step (both models loaded, optimizer state not yet
allocated). One warm-up step (on the first ``--warmup-seq`` tokens of each row), then the timed steps. The time
spent inside the fused loss (all exits' head products, forward and gradients) is measured separately, giving the
heads' share of the step.
"""

from __future__ import annotations

import argparse
import json

from bench.common import decoder_flops, head_flops, run_fresh, spread

STEP = r"""
import json, resource, sys, time
import pandas as pd, torch
from bench.common import matmul_limit, model_shape
import hsconv.distill.loss as loss
from hsconv.distill.objective import LossSettings, SelfDistillation
from hsconv.models import load_model
args = json.loads(sys.argv[1])
limit = matmul_limit()
torch.manual_seed(0)
cuda = torch.cuda.is_available()
device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
student = load_model(args["model_dir"], dtype=dtype, device=device).model.train()
target = load_model(args["model_dir"], dtype=dtype, device=device).model
module = SelfDistillation(student, target, LossSettings(implementation=args["implementation"],
                                                        chunk_tokens=args["chunk_tokens"],
                                                        exit_samples=args["exit_samples"]))
rows = pd.read_parquet(args["tokens"])["input_ids"].head(args["batch"])
input_ids = torch.tensor([list(row[:args["seq"]]) for row in rows], dtype=torch.long)
if input_ids.shape != (args["batch"], args["seq"]):
    raise SystemExit(f"{args['tokens']} has no {args['batch']} sequences of {args['seq']} tokens")
input_ids = input_ids.to(device)
mask = torch.ones_like(input_ids)
optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
loss_seconds = [0.0]
fused_apply = loss.FusedLogitLensKL.apply
def timed_apply(*inputs):
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = fused_apply(*inputs)
    if cuda:
        torch.cuda.synchronize()
    loss_seconds[0] += time.perf_counter() - started
    return result
loss.FusedLogitLensKL.apply = timed_apply
def rss_mb():
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20
def step(ids, mask):
    terms = module(ids, mask)
    terms.total.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return terms
before = rss_mb()
step(input_ids[:, :args["warmup_seq"]], mask[:, :args["warmup_seq"]])
times, head_times = [], []
for _ in range(args["steps"]):
    loss_seconds[0] = 0.0
    started = time.perf_counter()
    terms = step(input_ids, mask)
    if cuda:
        torch.cuda.synchronize()
    times.append(time.perf_counter() - started)
    head_times.append(loss_seconds[0])
# CPU: peak resident memory of the process; GPU: peak allocated device memory.
peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": times, "loss_seconds": head_times, "tokens": input_ids.numel(), "before_mb": before,
                  "peak_mb": peak, "zeta": terms.total.item(), "threads": torch.get_num_threads(),
                  "exits": len(terms.exits) if terms.exits is not None else len(terms.kl),
                  "matmul": limit, "shape": model_shape(student.config),
                  "params": sum(p.numel() for p in student.parameters())}))
"""


def step_flops(shape: dict, seq: int, exits: int) -> float:
    """FLOPs per token of one step: target forward with its head, student forward and backward, and per exit the
    head forward plus its two gradient products."""
    decoder, head = decoder_flops(shape, seq), head_flops(shape)
    return (decoder + head) + 3 * decoder + exits * 3 * head


def naive_loss_gb(shape: dict, batch: int, seq: int) -> float:
    """Memory of the naive loss alone: every exit's logits, log-softmax and softmax (float32), kept for backward."""
    return 3 * (shape["layers"] + 1) * batch * seq * shape["vocab"] * 4 / 1e9


def plan(shapes: list[tuple[int, int]], exits: list[int], naive_shapes: list[tuple[int, int]]) -> list[dict]:
    """Fused steps at every shape with all exits, at the first shape with each exit count, naive at its shapes."""
    runs = [{"implementation": "fused", "batch": batch, "seq": seq, "exit_samples": None} for batch, seq in shapes]
    runs += [{"implementation": "fused", "batch": shapes[0][0], "seq": shapes[0][1], "exit_samples": count}
             for count in exits]
    runs += [{"implementation": "reference", "batch": batch, "seq": seq, "exit_samples": None}
             for batch, seq in naive_shapes]
    return runs


def measure(model_dir: str, tokens: str, runs: list[dict], steps: int = 2, chunk_tokens: int = 256,
            warmup_seq: int = 32) -> dict:
    """Each planned run (implementation, batch, seq, exit_samples) in a fresh process."""
    common = dict(model_dir=model_dir, tokens=tokens, steps=steps, chunk_tokens=chunk_tokens, warmup_seq=warmup_seq)
    results = []
    for run in runs:
        results.append({**run, **run_fresh(STEP, {**common, **run})})
        print(json.dumps({key: value for key, value in results[-1].items() if key != "shape"}), flush=True)
    return {"runs": results, "steps": steps, "chunk_tokens": chunk_tokens, "warmup_seq": warmup_seq,
            "model_dir": model_dir}


def markdown(result: dict) -> str:
    runs = [run for run in result["runs"] if "error" not in run]
    shape = runs[0]["shape"]
    all_exits = shape["layers"] + 1
    # Gradients and AdamW's two moments, float32: the same for every loss, allocated in the warm-up step.
    # (Runs stored before the parameter count was recorded: decoder plus tied embedding, within 0.1%.)
    params = runs[0].get("params") or shape["decoder_params"] + shape["vocab"] * shape["d"]
    fixed_mb = 12 * params / 2**20
    lines = ["| loss | B × T | exits | step seconds | tokens/s | GFLOP/token | GFLOP/s | % of matmul limit "
             "| heads' share of the step | step peak (MB) | beyond gradients + AdamW (MB) | ζ |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        label = "fused" if run["implementation"] == "fused" else "naive (all logits, autograd)"
        if run.get("exit_samples"):
            label += f", ζ1 on {run['exit_samples']} sampled exits"
        if "error" in run:
            estimate = naive_loss_gb(shape, run["batch"], run["seq"])
            lines.append(f"| {label} | {run['batch']} × {run['seq']} | {all_exits} | {run['error']} (its logits "
                         f"alone: ~{estimate:.0f} GB) | | | | | | | | |")
            continue
        flops = step_flops(shape, run["seq"], run["exits"])
        rates = [run["tokens"] / seconds for seconds in run["seconds"]]
        gflops = [rate * flops / 1e9 for rate in rates]
        share = spread([100 * h / s for h, s in zip(run["loss_seconds"], run["seconds"])], "{:.0f}%") \
            if run["implementation"] == "fused" else "(not separable)"
        lines.append(
            f"| {label} | {run['batch']} × {run['seq']} | {run['exits']} | {spread(run['seconds'])} | "
            f"{spread(rates)} | {flops / 1e9:.2f} | {spread(gflops)} | "
            f"{spread([100 * g / run['matmul']['best_gflops'] for g in gflops], '{:.0f}%')} | {share} | "
            f"{run['peak_mb'] - run['before_mb']:,.0f} | {run['peak_mb'] - run['before_mb'] - fixed_mb:,.0f} | "
            f"{run['zeta']:.4f} |")
    limits = sorted(run["matmul"]["best_gflops"] for run in runs)
    lines.append("")
    matmul = runs[0]["matmul"]
    lines.append(f"Matmul limit ({matmul.get('dtype', 'float32')} {matmul['size']}² `torch.matmul`, best of 7, measured at the start "
                 f"of each run): {spread(limits)} GFLOP/s over the {len(limits)} runs; each row's percentage uses its "
                 f"own run's limit. {result['steps']} timed step(s) per row after one warm-up step; "
                 f"{runs[0]['threads']} threads; loss chunks of {result['chunk_tokens']} tokens. \"Beyond gradients + "
                 f"AdamW\" subtracts what every loss needs alike, 12 bytes per parameter ({fixed_mb:,.0f} MB): "
                 "what is left is the activations kept for backward and the loss's own buffers.")
    return "\n".join(lines)


def parse_shape(text: str) -> tuple[int, int]:
    batch, seq = text.lower().split("x")
    return int(batch), int(seq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--tokens", required=True, help="packed tokens (Parquet) with sequences at least T long")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[(4, 256), (8, 512)], help="B x T")
    parser.add_argument("--exits", type=int, nargs="*", default=[8, 16], help="exit counts (m) at the first shape")
    parser.add_argument("--naive-shapes", type=parse_shape, nargs="*", default=[(4, 64), (1, 256)],
                        help="B x T for the naive loss (its logits alone take 3·(L+1)·B·T·V floats)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args()
    result = measure(args.model_dir, args.tokens, plan(args.shapes, args.exits, args.naive_shapes), args.steps,
                     args.chunk_tokens)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    print(markdown(result))


if __name__ == "__main__":
    main()
