"""Benchmark of the hidden-state stage: per-token, per-layer movement vs a bare forward pass, same batches.

    python -m bench.extraction --model-dir results/models/smollm2-135m/base [--lambada 200 --repeats 3]

Three ways over the same LAMBADA passages, batched as the stage batches them (longest first, 8 per batch), in one
process, alternating within each repeat: the stage's own ``token_movement`` (forward with every hidden state,
D_l under both final-norm conventions in float64, the tidy table), a bare ``model(...)`` (decoder and LM head,
no hidden states kept; what "run the model" costs), and a bare decoder forward (no head, no hidden states: the
stage's arithmetic floor, as it needs no vocabulary).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import SHARED, decoder_flops, head_flops, matmul_limit, model_shape, spread


def measure(model_dir: str, lambada: int = 200, repeats: int = 3, batch_size: int = 8) -> dict:
    import torch

    from hsconv.hidden_states import segment_documents, token_movement
    from hsconv.models import load_model
    from hsconv.texts import prepare_texts

    torch.set_grad_enabled(False)
    limit = matmul_limit()
    loaded = load_model(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        texts = prepare_texts("lambada", "lambada", Path(tmp) / "lambada.parquet",
                              path=str(SHARED / "lambada_test.jsonl"), subset_size=lambada)
    documents, bodies = texts["document"].tolist(), texts["text"].tolist()
    segments, _ = segment_documents(loaded.tokenizer, documents, bodies, loaded.context_length, "error")
    order = sorted(segments, key=lambda segment: -len(segment.token_ids))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(segment.token_ids) for segment in chunk)
        ids = torch.full((len(chunk), width), loaded.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, segment in enumerate(chunk):
            ids[row, :len(segment.token_ids)] = torch.tensor(segment.token_ids)
            mask[row, :len(segment.token_ids)] = 1
        batches.append((ids, mask))
    tokens = sum(int(mask.sum()) for _, mask in batches)
    mean_length = tokens / len(segments)

    def stage():
        token_movement(loaded, documents, bodies, batch_size=batch_size)

    def bare_model():
        for ids, mask in batches:
            loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)

    def bare_decoder():
        for ids, mask in batches:
            loaded.model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)

    ways = {"stage": stage, "model": bare_model, "decoder": bare_decoder}
    stage()  # warm-up
    seconds = {name: [] for name in ways}
    for _ in range(repeats):
        for name, function in ways.items():
            started = time.perf_counter()
            function()
            seconds[name].append(time.perf_counter() - started)
    return {"model_dir": model_dir, "passages": lambada, "segments": len(segments), "tokens": tokens,
            "mean_length": mean_length, "batch_size": batch_size, "repeats": repeats, "seconds": seconds,
            "matmul": limit, "shape": model_shape(loaded.model.config), "threads": torch.get_num_threads()}


def markdown(result: dict) -> str:
    shape, tokens = result["shape"], result["tokens"]
    decoder = decoder_flops(shape, result["mean_length"] / 2)  # causal attention over half a passage on average
    flops = {"stage": decoder, "model": decoder + head_flops(shape), "decoder": decoder}
    labels = {"stage": "hidden-state stage (`token_movement`: all states, D_l both conventions, table)",
              "model": "bare `model(...)` (decoder + LM head, no states kept)",
              "decoder": "bare decoder forward (no head, no states kept)"}
    lines = ["| way | seconds | tokens/s | GFLOP/token | GFLOP/s | % of matmul limit | stage's rate / this rate |",
             "|---|---|---|---|---|---|---|"]
    stage_best = tokens / min(result["seconds"]["stage"])
    for name, seconds in result["seconds"].items():
        rates = [tokens / s for s in seconds]
        gflops = [rate * flops[name] / 1e9 for rate in rates]
        lines.append(f"| {labels[name]} | {spread(seconds)} | {spread(rates, '{:,.0f}')} | {flops[name] / 1e9:.3f} | "
                     f"{spread(gflops)} | {spread([100 * g / result['matmul']['best_gflops'] for g in gflops], '{:.0f}%')} "
                     f"| {stage_best / max(rates):.2f} |")
    lines.append("")
    lines.append(f"{result['passages']} LAMBADA passages ({tokens:,} tokens, {result['mean_length']:.0f} per passage), "
                 f"batches of {result['batch_size']}, {result['repeats']} repeats (min / median / max) after a "
                 f"warm-up, {result['threads']} threads; matmul limit {result['matmul']['best_gflops']:.1f} GFLOP/s. "
                 "The last column compares best runs.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--lambada", type=int, default=200, help="LAMBADA passages")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args()
    result = measure(args.model_dir, args.lambada, args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
