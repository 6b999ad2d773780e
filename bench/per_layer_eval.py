"""Benchmark of per-layer lm-eval evaluation: all exits through the memoised logit lens vs stock lm-eval.

    python -m bench.per_layer_eval --model-dir results/models/smollm2-135m/base [--lambada 300 --wikitext 1]

For each task, in one process: stock lm-eval's HFLM at the last layer (one evaluation), then ``LogitLensLM``
evaluating every exit 0..L as the evaluation stage does (``evaluate_exits``: lm-eval's requests built once, one
forward pass per batch for all exits, each exit's responses through the task's own ``process_results`` and
aggregation; before 2026-12-03 each exit was a full ``lm_eval.evaluate`` that rebuilt the requests; since then the head
is scored by ``Readout.score_targets``, 1,024 rows × 2,048 vocabulary entries at a time with an online logsumexp, so
the vocabulary-sized logits are never written to memory and read back: WikiText went from 1.72× its counted floor
to 1.30×, same day, same machine). Looping
stock lm-eval over the exits (a truncated model per exit) would cost about (L+1) × the stock evaluation. For WikiText, which needs
every exit's head at every token, the arithmetic floor is counted: the decoder's FLOPs plus L+1 head products per
scored token, at the matmul limit measured in the same process; and, as a second reference, timed: one decoder
pass over lm-eval's rolling windows plus one head with its log-normaliser per exit.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import SHARED, decoder_flops, head_flops, matmul_limit, model_shape, spread


def timed(function):
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def rolling_windows(lens, task_dict) -> list[list[int]]:
    """The model inputs lm-eval's rolling log-likelihood makes of every document (as ``LogitLensLM`` runs them)."""
    from lm_eval import utils

    task = next(iter(task_dict["tasks"].values()))
    windows = []
    for doc in task.test_docs():
        tokens = lens.tok_encode(task.doc_to_target(doc))
        for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=lens.prefix_token_id, max_seq_len=lens.max_length, context_len=1)):
            windows.append((context + continuation)[-(lens.max_length + 1):][:-1])
    return windows


def timed_floor(lens, windows, batch_size: int) -> tuple[float, float, int, dict]:
    """Seconds for one decoder pass over the windows, and for one exit's head with its logsumexp over them; and
    the float32 error of log p(next token) at the last exit against float64, HFLM's way and the lens's way."""
    import torch
    import torch.nn.functional as F

    from hsconv.readout import decoder_states

    forward = head = 0.0
    tokens = 0
    errors = {"log_softmax": [], "logsumexp": []}
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size]
            width = max(len(w) for w in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            for row, window in enumerate(batch):
                ids[row, :len(window)] = torch.tensor(window)
            seconds, states = timed(lambda: decoder_states(lens.model, ids, None))
            forward += seconds
            last = states["pre_norm_last"].reshape(-1, states["pre_norm_last"].shape[-1])
            tokens += last.shape[0]
            for begin in range(0, last.shape[0], lens.head_chunk_tokens):
                chunk = last[begin:begin + lens.head_chunk_tokens]
                seconds, _ = timed(lambda: torch.logsumexp(lens.readout(chunk), dim=-1))
                head += seconds
            logits = lens.readout(states["pre_norm_last"][:, :-1])
            following = ids[:, 1:, None]
            exact = F.log_softmax(logits.double(), dim=-1).gather(-1, following)
            hflm = F.log_softmax(logits, dim=-1).gather(-1, following).double()
            ours = (logits.gather(-1, following) - torch.logsumexp(logits, -1, keepdim=True)).double()
            errors["log_softmax"].append((hflm - exact).flatten())
            errors["logsumexp"].append((ours - exact).flatten())
    errors = {name: {"mean": torch.cat(values).mean().item(), "max_abs": torch.cat(values).abs().max().item()}
              for name, values in errors.items()}
    return forward, head, tokens, errors


def measure(model_dir: str, lambada: int = 300, wikitext: int = 1, batch_size: int = 8, repeats: int = 3) -> dict:
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    from hsconv.evaluation.lens_model import LogitLensLM
    from hsconv.evaluation.per_layer import evaluate_exits, stock_tasks, write_task_data
    from hsconv.models import weights_dir
    from hsconv.texts import prepare_texts

    limit = matmul_limit()
    weights = str(weights_dir(Path(model_dir)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare_texts("lambada", "lambada", tmp / "lambada.parquet", path=str(SHARED / "lambada_test.jsonl"),
                      subset_size=lambada)
        prepare_texts("wikitext", "wikitext", tmp / "wikitext.parquet", path=str(SHARED / "wiki.test.raw"),
                      subset_size=wikitext)
        for kind in ("lambada", "wikitext"):
            task_dict, task_names = stock_tasks({kind: (kind, write_task_data(tmp / f"{kind}.parquet", kind,
                                                                              tmp / f"{kind}.jsonl"))}, tmp)
            task = task_names[kind]
            metric = "acc,none" if kind == "lambada" else "word_perplexity,none"
            stock_seconds, lens_seconds, values = [], [], {}
            for _ in range(repeats):  # fresh models each time: the lens's memo must not carry over
                stock = HFLM(pretrained=weights, dtype="float32", device="cpu", batch_size=batch_size)
                seconds, stock_result = timed(lambda: lm_eval.evaluate(
                    lm=stock, task_dict=task_dict, bootstrap_iters=0, log_samples=False, verbosity="WARNING"))
                stock_seconds.append(seconds)
                lens = LogitLensLM(pretrained=weights, dtype="float32", device="cpu", batch_size=batch_size)
                exits = lens.num_layers + 1

                def all_exits():  # as the evaluation stage runs them
                    for layer, result in evaluate_exits(lens, task_dict, list(range(exits)), bootstrap_iters=0,
                                                        log_samples=False):
                        values[layer] = result["results"][task][metric]

                lens_seconds.append(timed(all_exits)[0])
            row = {"task": kind, "exits": exits, "stock": stock_seconds, "lens": lens_seconds,
                   "stock_value": stock_result["results"][task][metric], "lens_last": values[exits - 1],
                   "passes": lens.forward_passes}
            if kind == "wikitext":
                windows = rolling_windows(lens, task_dict)
                forward, head, tokens, errors = timed_floor(lens, windows, batch_size)
                row.update(forward=forward, head=head, tokens=tokens, float32_errors=errors,
                           mean_window=sum(len(w) for w in windows) / len(windows))
            rows.append(row)
            del stock, lens
    return {"model_dir": model_dir, "lambada": lambada, "wikitext": wikitext, "batch_size": batch_size,
            "repeats": repeats,
            "rows": rows, "matmul": limit, "shape": model_shape(_config(model_dir)),
            "threads": torch.get_num_threads()}


def _config(model_dir: str):
    from transformers import AutoConfig

    from hsconv.models import weights_dir

    return AutoConfig.from_pretrained(weights_dir(Path(model_dir)))


def markdown(result: dict) -> str:
    shape, best = result["shape"], result["matmul"]["best_gflops"]
    lines = ["| task | exits | stock lm-eval, last layer (s) | all exits, logit lens (s) | ratio | looping stock over "
             "exits (≈ exits × stock, s) | metric at last exit: stock / lens |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        ratios = [lens / stock for lens, stock in zip(row["lens"], row["stock"])]
        lines.append(f"| {row['task']} | {row['exits']} | {spread(row['stock'])} | {spread(row['lens'])} | "
                     f"{spread(ratios, '{:.2f}×')} | {row['exits'] * min(row['stock']):,.0f} | "
                     f"{row['stock_value']:.6g} / {row['lens_last']:.6g} |")
    for row in result["rows"]:
        if "forward" not in row:
            continue
        per_token = decoder_flops(shape, row["mean_window"] / 2) + row["exits"] * head_flops(shape)
        counted = row["tokens"] * per_token / (best * 1e9)
        timed_floor = row["forward"] + row["exits"] * row["head"]
        fastest = min(row["lens"])
        lines.append("")
        lines.append(
            f"WikiText floor over {row['tokens']:,} window tokens (mean window {row['mean_window']:,.0f}): counted, "
            f"{per_token / 1e9:.2f} GFLOP per token (decoder + {row['exits']} heads) at the matmul limit "
            f"{best:.1f} GFLOP/s = **{counted:.1f} s**, so all exits took **{fastest / counted:.2f}×** the "
            f"counted floor (best run; {100 * counted / fastest:.0f}% of the limit). Timed: decoder pass "
            f"{row['forward']:.1f} s plus {row['exits']} × one head with its logsumexp {row['head']:.2f} s = "
            f"{timed_floor:.1f} s; all exits took {fastest / timed_floor:.2f}× that.")
        errors = row["float32_errors"]
        lines.append("")
        lines.append(
            "Last-exit metric, lens vs stock: they differ in float32 rounding only. Against a float64 "
            "log-softmax of the same logits, log p(next token) from float32 `log_softmax` (HFLM's) is off by "
            f"{errors['log_softmax']['mean']:.1e} nats per token on average (max {errors['log_softmax']['max_abs']:.1e}), "
            f"the lens's z − logsumexp(z) by {errors['logsumexp']['mean']:.1e} (max "
            f"{errors['logsumexp']['max_abs']:.1e}): the lens is the closer of the two to the exact value.")
    lines.append("")
    lines.append(f"{result['lambada']} LAMBADA passages (`lambada_openai`), {result['wikitext']} WikiText-2 test "
                 f"article(s) (`wikitext`); lm-eval batch {result['batch_size']}, float32, {result['threads']} "
                 f"threads; {result['repeats']} repeats (min / median / max), each with fresh models; the ratio is "
                 "per repeat and the loop estimate uses the fastest stock run.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--lambada", type=int, default=300, help="LAMBADA passages")
    parser.add_argument("--wikitext", type=int, default=1, help="WikiText articles")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args()
    result = measure(args.model_dir, args.lambada, args.wikitext, args.batch_size, args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
