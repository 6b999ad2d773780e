"""Benchmark of per-layer lm-eval evaluation: all exits through the memoised logit lens vs stock lm-eval, one run.

    python bench/per_layer_eval.py --model-dir results/models/smollm2-135m/base \
        [--lambada 500 --wikitext 2 --batch-size 8]

For each task it times, in this order and in one process: stock lm-eval's HFLM at the last layer (one evaluation);
``LogitLensLM`` evaluating every exit 0..L (L+1 lm-eval evaluations sharing one forward pass per batch); and, for
WikiText, the arithmetic floor of scoring every token at every exit: one decoder forward pass over lm-eval's rolling
windows plus L+1 head products with log-softmax (each timed once here). Looping stock lm-eval over the exits would
cost about (L+1) times the stock evaluation. Prints Markdown.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def timed(function):
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def wikitext_floor(lens, task_dict) -> tuple[float, float, int]:
    """Seconds for one decoder pass over the task's rolling windows, and for one head + log-softmax over them."""
    from lm_eval import utils

    from hsconv.hidden_states import decoder_states

    task = next(iter(task_dict["tasks"].values()))
    windows = []
    for doc in task.test_docs():
        tokens = lens.tok_encode(task.doc_to_target(doc))
        for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=lens.prefix_token_id, max_seq_len=lens.max_length, context_len=1)):
            windows.append((context + continuation)[-(lens.max_length + 1):][:-1])
    forward = head = 0.0
    tokens = 0
    with torch.no_grad():
        for start in range(0, len(windows), lens.batch_size):
            batch = windows[start:start + lens.batch_size]
            width = max(map(len, batch))
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            for row, window in enumerate(batch):
                ids[row, :len(window)] = torch.tensor(window)
            seconds, states = timed(lambda: decoder_states(lens.model, ids, None))
            forward += seconds
            last = states["pre_norm_last"].reshape(-1, states["pre_norm_last"].shape[-1])
            tokens += last.shape[0]
            for start_row in range(0, last.shape[0], lens.head_chunk_tokens):
                chunk = last[start_row:start_row + lens.head_chunk_tokens]
                seconds, _ = timed(lambda: torch.log_softmax(lens.head(lens.final_norm(chunk)), dim=-1))
                head += seconds
    return forward, head, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--lambada", type=int, default=500, help="LAMBADA passages")
    parser.add_argument("--wikitext", type=int, default=2, help="WikiText articles")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from hsconv.evaluation.lens_model import LogitLensLM
    from hsconv.evaluation.per_layer import stock_task_config, write_task_data
    from hsconv.models import weights_dir
    from hsconv.texts import prepare_texts

    manager = TaskManager()
    weights = str(weights_dir(Path(args.model_dir)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare_texts("lambada", "lambada", tmp / "lambada.parquet", path=str(SHARED / "lambada_test.jsonl"),
                      subset_size=args.lambada)
        prepare_texts("wikitext", "wikitext", tmp / "wikitext.parquet", path=str(SHARED / "wiki.test.raw"),
                      subset_size=args.wikitext)
        for kind in ("lambada", "wikitext"):
            config = stock_task_config(kind, write_task_data(tmp / f"{kind}.parquet", kind, tmp / f"{kind}.jsonl"),
                                       manager)
            task_dict = manager.load([config])
            metric = "acc,none" if kind == "lambada" else "word_perplexity,none"
            stock = HFLM(pretrained=weights, dtype="float32", device="cpu", batch_size=args.batch_size)
            stock_seconds, stock_result = timed(lambda: lm_eval.evaluate(
                lm=stock, task_dict=task_dict, bootstrap_iters=0, log_samples=False, verbosity="WARNING"))
            lens = LogitLensLM(pretrained=weights, dtype="float32", device="cpu", batch_size=args.batch_size)
            exits = lens.num_layers + 1
            values = {}

            def all_exits():
                for layer in range(exits):
                    lens.exit_layer = layer
                    result = lm_eval.evaluate(lm=lens, task_dict=task_dict, bootstrap_iters=0, log_samples=False,
                                              verbosity="WARNING")
                    values[layer] = result["results"][config["task"]][metric]

            lens_seconds, _ = timed(all_exits)
            stock_value = stock_result["results"][config["task"]][metric]
            row = {"task": kind, "exits": exits, "stock": stock_seconds, "lens": lens_seconds,
                   "stock_value": stock_value, "lens_last": values[exits - 1], "passes": lens.forward_passes}
            if kind == "wikitext":
                forward, head, tokens = wikitext_floor(lens, task_dict)
                row.update(floor=forward + exits * head, one_exit=forward + head, forward=forward, head=head,
                           tokens=tokens)
            rows.append(row)

    print(f"Model {args.model_dir}; {args.lambada} LAMBADA passages, {args.wikitext} WikiText articles; batch "
          f"{args.batch_size}; float32, CPU, {torch.get_num_threads()} threads.\n")
    print("| task | exits | stock lm-eval, last layer (s) | all exits, logit lens (s) | ratio | looping stock "
          "over exits (≈ exits × stock, s) | metric at last exit: stock / lens |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['task']} | {row['exits']} | {row['stock']:.1f} | {row['lens']:.1f} | "
              f"{row['lens'] / row['stock']:.2f}× | {row['exits'] * row['stock']:.0f} | "
              f"{row['stock_value']:.6g} / {row['lens_last']:.6g} |")
    for row in rows:
        if "floor" in row:
            print(f"\nWikiText floor over {row['tokens']:,} window tokens: forward {row['forward']:.1f} s, one head + "
                  f"log-softmax {row['head']:.2f} s; forward + {row['exits']} heads = {row['floor']:.1f} s "
                  f"(floor ratio to forward + 1 head: {row['floor'] / row['one_exit']:.2f}×). All exits took "
                  f"{row['lens']:.1f} s = {row['lens'] / row['floor']:.2f}× the floor.")


if __name__ == "__main__":
    main()
