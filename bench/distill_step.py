"""Benchmark of one self-distillation training step: the fused per-layer loss against the naive one, side by side.

    python bench/distill_step.py --model-dir results/models/smollm2-135m/base \
        --tokens results/data/tokens/smollm2-135m.parquet [--batch 4 --seq 256 --steps 2]

A step is: the frozen target's forward, the student's forward with all L+1 states, ζ = ζ1 + α ζ2 over all L+1 exits
(α=1, k=0.25, the paper's KL direction), backward, AdamW. Each implementation runs in a fresh process so that its
peak resident memory (ru_maxrss) is its own; "step peak" is that peak minus the resident memory just before the
first step (models, optimizer not yet allocated). The first step is a warm-up and is not timed. Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

STEP = r"""
import json, resource, sys, time
import pandas as pd, torch
from hsconv.distill.objective import LossSettings, SelfDistillation
from hsconv.models import load_model
args = json.loads(sys.argv[1])
torch.manual_seed(0)
student = load_model(args["model_dir"]).model.train()
target = load_model(args["model_dir"]).model
module = SelfDistillation(student, target, LossSettings(implementation=args["implementation"],
                                                        chunk_tokens=args["chunk_tokens"]))
rows = pd.read_parquet(args["tokens"])["input_ids"].head(args["batch"])
input_ids = torch.tensor([list(row[:args["seq"]]) for row in rows], dtype=torch.long)
mask = torch.ones_like(input_ids)
optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
def rss_mb():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20
before = rss_mb()
times = []
for step in range(args["steps"] + 1):
    started = time.perf_counter()
    terms = module(input_ids, mask)
    terms.total.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step:
        times.append(time.perf_counter() - started)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": times, "tokens": input_ids.numel(), "before_mb": before, "peak_mb": peak,
                  "zeta": terms.total.item(), "threads": torch.get_num_threads(),
                  "exits": len(terms.kl)}))
"""


def run(implementation: str, args) -> dict:
    config = dict(implementation=implementation, model_dir=args.model_dir, tokens=args.tokens, batch=args.batch,
                  seq=args.seq, steps=args.steps, chunk_tokens=args.chunk_tokens)
    out = subprocess.run([sys.executable, "-c", STEP, json.dumps(config)], capture_output=True, text=True)
    if out.returncode != 0:
        reason = "killed by the kernel (out of memory)" if out.returncode == -9 else \
            (out.stderr.strip().splitlines() or ["no message"])[-1]
        return {"error": f"exit {out.returncode}: {reason}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--tokens", required=True, help="packed tokens (Parquet) from the data stage")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--implementations", nargs="+", default=["fused", "reference"])
    parser.add_argument("--reference-batches", type=int, nargs="*", default=[1],
                        help="extra, smaller batches for the naive loss, measured where B itself does not fit")
    args = parser.parse_args()
    runs = [(name, args.batch) for name in args.implementations]
    if "reference" in args.implementations:
        runs += [("reference", batch) for batch in args.reference_batches if batch != args.batch]
    results = {(name, batch): run(name, argparse.Namespace(**{**vars(args), "batch": batch})) for name, batch in runs}
    print(f"T={args.seq}, float32, CPU; chunk_tokens={args.chunk_tokens}\n")
    print("| loss | B | exits | step seconds (each) | tokens/s | RSS before step (MB) | peak RSS (MB) | step peak (MB) "
          "| ζ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, batch), result in results.items():
        if "error" in result:
            print(f"| {name} | {batch} | | {result['error']} | | | | | |")
            continue
        seconds = result["seconds"]
        rate = result["tokens"] * len(seconds) / sum(seconds)
        print(f"| {name} | {batch} | {result['exits']} | {', '.join(f'{s:.1f}' for s in seconds)} | {rate:.1f} | "
              f"{result['before_mb']:.0f} | {result['peak_mb']:.0f} | {result['peak_mb'] - result['before_mb']:.0f} | "
              f"{result['zeta']:.5f} |")


if __name__ == "__main__":
    main()
