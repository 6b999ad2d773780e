"""Benchmark of the data stage: sample ~10M tokens' worth from a local 100 MB text file, then pack them.

    python -m bench.data_stage --model-dir results/models/smollm2-135m/base [--megabytes 100] [--repeats 3]

Builds the text file in a temporary folder from ../shared/data/fineweb_edu_10BT_first1M.txt (repeated), and runs
each step in a fresh process so that its peak resident memory (ru_maxrss) is its own. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.common import SHARED, run_fresh, spread

SOURCE = SHARED / "fineweb_edu_10BT_first1M.txt"

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


def measure(model_dir: str, megabytes: int = 100, budget: int = 10_000_000, repeats: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "big.txt"
        chunk = SOURCE.read_text(encoding="utf-8")
        with open(text, "w", encoding="utf-8") as handle:
            for _ in range(megabytes * 1_000_000 // len(chunk.encode()) + 1):
                handle.write(chunk)
        size_mb = text.stat().st_size / 1e6
        samples, packs = [], []
        for repeat in range(repeats):
            corpus = Path(tmp) / f"corpus{repeat}"
            samples.append(run_fresh(STEP, {"step": "sample", "text": str(text), "corpus": str(corpus)}))
            packs.append(run_fresh(STEP, {"step": "pack", "corpus": str(corpus), "model_dir": model_dir,
                                          "out": str(Path(tmp) / f"p{repeat}.parquet"), "budget": budget}))
    for result in samples + packs:
        if "error" in result:
            raise RuntimeError(f"data stage benchmark failed: {result['error']}")
    return {"model_dir": model_dir, "size_mb": size_mb, "budget": budget, "repeats": repeats, "samples": samples,
            "packs": packs}


def markdown(result: dict) -> str:
    samples, packs, size_mb = result["samples"], result["packs"], result["size_mb"]
    return "\n".join([
        "| step | work | seconds | throughput | peak RSS (MB) |", "|---|---|---|---|---|",
        f"| sample_corpus (read, shuffle, write shards) | {samples[0]['documents']:,} documents | "
        f"{spread([s['seconds'] for s in samples])} | {spread([size_mb / s['seconds'] for s in samples])} MB/s | "
        f"{spread([s['peak_rss_mb'] for s in samples], '{:,.0f}')} |",
        f"| pack_tokens (tokenise, pack {result['budget']:,} tokens) | {packs[0]['tokens']:,} tokens | "
        f"{spread([p['seconds'] for p in packs])} | {spread([p['tokens'] / p['seconds'] for p in packs], '{:,.0f}')} "
        f"tokens/s | {spread([p['peak_rss_mb'] for p in packs], '{:,.0f}')} |",
        "",
        f"{size_mb:.0f} MB of FineWeb-Edu text (`fineweb_edu_10BT_first1M.txt` repeated), cut into 4,000-character "
        f"pieces, seed 0; {result['repeats']} repeats (min / median / max), each step in a fresh process. "
        "The data stage does no floating-point arithmetic: its limit is the tokenizer (Rust, `tokenizers`), not the "
        "matmul rate."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="a prepared model directory (its tokenizer is used)")
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--budget", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args()
    result = measure(args.model_dir, args.megabytes, args.budget, args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
