"""Benchmark of the data stage: sample ~10M tokens' worth from a local 100 MB text file, then pack them.

    python bench/data_stage.py --model-dir results/models/smollm2-135m/base [--megabytes 100] [--repeats 3]

Builds the text file in a temporary folder from ../shared/data/fineweb_edu_10BT_first1M.txt (repeated), and runs
each step in a fresh process so that its peak resident memory (ru_maxrss) is its own. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fineweb_edu_10BT_first1M.txt"

STEP = r"""
import json, resource, sys, time
from hsconv.corpus import pack_tokens, sample_corpus
args = json.loads(sys.argv[1])
started = time.perf_counter()
if args["step"] == "sample":
    manifest = sample_corpus({"kind": "text", "path": args["text"], "chunk_chars": 4000}, args["corpus"], seed=0)
    result = {"documents": manifest["documents"]}
else:
    stats = pack_tokens(args["corpus"], args["model_dir"], args["out"], 1024, args["budget"])
    result = {"tokens": stats["tokens"]}
result["seconds"] = time.perf_counter() - started
result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(result))
"""


def run_step(**kwargs) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP, json.dumps(kwargs)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="a prepared model directory (its tokenizer is used)")
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--budget", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "big.txt"
        chunk = SOURCE.read_text(encoding="utf-8")
        with open(text, "w", encoding="utf-8") as handle:
            for _ in range(args.megabytes * 1_000_000 // len(chunk.encode()) + 1):
                handle.write(chunk)
        size_mb = text.stat().st_size / 1e6
        samples, packs = [], []
        for repeat in range(args.repeats):
            corpus = Path(tmp) / f"corpus{repeat}"
            samples.append(run_step(step="sample", text=str(text), corpus=str(corpus)))
            packs.append(run_step(step="pack", corpus=str(corpus), model_dir=args.model_dir,
                                  out=str(Path(tmp) / f"p{repeat}.parquet"), budget=args.budget))

    def spread(values, fmt="{:,.0f}"):
        return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))

    print(f"source: {size_mb:.0f} MB of text; tokenizer from {args.model_dir}; {args.repeats} repeats (min / median / max)\n")
    print("| step | work | seconds | throughput | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    print(f"| sample_corpus (read, shuffle, write shards) | {samples[0]['documents']:,} documents | "
          f"{spread([s['seconds'] for s in samples], '{:.1f}')} | "
          f"{spread([size_mb / s['seconds'] for s in samples], '{:.1f}')} MB/s | "
          f"{spread([s['peak_rss_mb'] for s in samples])} |")
    print(f"| pack_tokens (tokenise, pack {args.budget:,} tokens) | {packs[0]['tokens']:,} tokens | "
          f"{spread([p['seconds'] for p in packs], '{:.1f}')} | "
          f"{spread([p['tokens'] / p['seconds'] for p in packs])} tokens/s | "
          f"{spread([p['peak_rss_mb'] for p in packs])} |")


if __name__ == "__main__":
    main()
