"""Benchmark of the layer-relevance stage's removals: replaying the intact prefix vs running every removal whole.

    python -m bench.layer_skip --model-dir results/models/smollm2-135m/base [--lambada 64 --repeats 3]

Over the same padded batch of LAMBADA passages, in the precision ``auto`` gives this machine, in one process,
alternating within each repeat: one intact forward pass (the unit), every block removed alone with the blocks before
it replayed from the intact pass (what ``hsconv layer-relevance`` runs; block l costs L − l blocks), and every block
removed alone with the whole model run each time (the naive way, L − 1 blocks each). Decoder only: the heads at the
scored positions are the same for both ways. The matmul limit is measured in the same precision and process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import SHARED, decoder_flops, matmul_limit, model_shape, spread


def measure(model_dir: str, lambada: int = 64, repeats: int = 3) -> dict:
    import torch

    from hsconv.evaluation.layer_skip import configuration_pass, intact_pass
    from hsconv.models import load_model
    from hsconv.precision import resolve_precision
    from hsconv.texts import prepare_texts

    torch.set_grad_enabled(False)
    dtype = resolve_precision("auto")
    limit = matmul_limit(dtype=dtype)
    loaded = load_model(model_dir, dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        texts = prepare_texts("lambada", "lambada", Path(tmp) / "lambada.parquet",
                              path=str(SHARED / "lambada_test.jsonl"), subset_size=lambada)
    rows = [loaded.tokenizer(text)["input_ids"] for text in texts["text"]]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), loaded.tokenizer.pad_token_id, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, :len(row)] = torch.tensor(row)
    model, layers = loaded.model, loaded.num_layers

    def intact():
        intact_pass(model, ids)

    def replayed():
        reference = intact_pass(model, ids)
        for block in range(1, layers + 1):
            configuration_pass(model, ids, (block,), reference)

    def whole():
        for block in range(1, layers + 1):
            configuration_pass(model, ids, (block,))

    ways = {"intact": intact, "replayed": replayed, "whole": whole}
    intact()  # warm-up
    seconds = {name: [] for name in ways}
    for _ in range(repeats):
        for name, function in ways.items():
            started = time.perf_counter()
            function()
            seconds[name].append(time.perf_counter() - started)
    return {"model_dir": model_dir, "passages": lambada, "padded_tokens": int(ids.numel()), "width": width,
            "dtype": dtype, "repeats": repeats, "seconds": seconds, "matmul": limit, "layers": layers,
            "shape": model_shape(model.config), "threads": torch.get_num_threads()}


def markdown(result: dict) -> str:
    shape, tokens, layers = result["shape"], result["padded_tokens"], result["layers"]
    per_block = decoder_flops(shape, result["width"] / 2) / layers
    blocks = {"intact": layers, "replayed": layers + layers * (layers - 1) // 2, "whole": layers * (layers - 1)}
    labels = {"intact": "one intact pass (the unit)",
              "replayed": "intact pass + every block removed, prefix replayed (the stage)",
              "whole": "every block removed, whole model each time (naive)"}
    lines = ["| way | block passes | seconds | GFLOP/s | % of matmul limit | time / intact pass |",
             "|---|---|---|---|---|---|"]
    unit = min(result["seconds"]["intact"])
    for name, seconds in result["seconds"].items():
        gflops = [tokens * per_block * blocks[name] / s / 1e9 for s in seconds]
        lines.append(f"| {labels[name]} | {blocks[name]} | {spread(seconds)} | {spread(gflops)} | "
                     f"{spread([100 * g / result['matmul']['best_gflops'] for g in gflops], '{:.0f}%')} | "
                     f"{min(seconds) / unit:.1f} |")
    replayed, whole = min(result["seconds"]["replayed"]), min(result["seconds"]["whole"])
    lines += ["", f"{result['passages']} LAMBADA passages in one padded batch ({tokens:,} tokens, width "
              f"{result['width']}), {result['dtype']}, {result['repeats']} repeats (min / median / max) after a "
              f"warm-up, {result['threads']} threads; matmul limit ({result['matmul']['dtype']}, "
              f"{result['matmul']['size']}²) {result['matmul']['best_gflops']:.1f} GFLOP/s. Replaying the prefix: "
              f"{whole / replayed:.2f}× faster than running every removal whole (block passes "
              f"{blocks['whole'] / blocks['replayed']:.2f}× fewer)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--lambada", type=int, default=64, help="LAMBADA passages")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args()
    result = measure(args.model_dir, args.lambada, args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
