"""Benchmark of cheaper teacher targets: what a top-k cache of the frozen model's distribution costs in accuracy,
disk and time, against recomputing the teacher in every step.

    python -m bench.teacher_cache --model-dir results/models/smollm2-135m/base --tokens TOKENS.parquet

On B × T real tokens, the student is the pretrained model itself after a few plain gradient steps of ζ on another
batch (so that every exit, the last included, has a KL to the teacher, as during training). For each k, the teacher's
log-distribution is replaced by its top-k entries plus the log of the left-over mass
(``hsconv.distill.loss.top_k_target``), and ζ1 and each exit's KL are computed in float64 against the exact ones, in
both KL directions, two ways: *folded*, both distributions folded onto the k tokens and one bucket for the rest (what
training with ``teacher_top_k`` computes, ``hsconv.distill.loss.folded_kl``), and *spread*, the left-over mass spread
evenly over the other V − k tokens (``dense_from_top_k``). The cache's size is the trainer's format, k · (4-byte id +
4-byte float32 value) + 4 bytes per token (``hsconv.distill.teacher``). The teacher's cost per token is timed (its
forward pass with the head and log-softmax), and so is reading the same tokens' rows back from a written cache, so
the two can be set against each other and against a whole training step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import spread


def measure(model_dir: str, tokens: str, ks=(16, 64, 256, 1024), batch: int = 4, seq: int = 256,
            warm_steps: int = 3, chunk: int = 128, repeats: int = 3) -> dict:
    import pandas as pd
    import torch
    import torch.nn.functional as F

    from hsconv.distill.loss import TopKTarget, dense_from_top_k, folded_kl, layer_weights, top_k_target
    from hsconv.distill.teacher import TeacherCache, write_teacher_cache
    from hsconv.distill.objective import LossSettings, SelfDistillation
    from hsconv.readout import decoder_states, final_norm_module, lens_states
    from hsconv.models import load_model

    torch.manual_seed(0)
    rows = pd.read_parquet(tokens)["input_ids"]
    if len(rows) < 2 * batch or len(rows.iloc[0]) < seq:
        raise SystemExit(f"{tokens} needs {2 * batch} rows of {seq} tokens")
    ids = torch.tensor(np.stack([row[:seq] for row in rows.head(2 * batch)]), dtype=torch.long)
    train_ids, test_ids = ids[:batch], ids[batch:]
    student = load_model(model_dir).model
    teacher = load_model(model_dir).model.eval()
    module = SelfDistillation(student.train(), teacher, LossSettings())
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    for _ in range(warm_steps):
        terms = module(train_ids, torch.ones_like(train_ids))
        terms.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    student.eval()
    head, norm = student.get_output_embeddings(), final_norm_module(student)
    num_layers = student.config.num_hidden_layers
    weights = layer_weights(num_layers, 0.25)

    with torch.no_grad():
        teacher_seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            teacher_hidden = decoder_states(teacher, test_ids, None)["states"][-1].reshape(-1, student.config.hidden_size)
            teacher_log_probs = torch.log_softmax(teacher.get_output_embeddings()(teacher_hidden), -1)
            teacher_seconds.append(time.perf_counter() - started)
        states = [state.reshape(-1, state.shape[-1]) for state in lens_states(decoder_states(student, test_ids, None))]
        vocab = teacher_log_probs.shape[-1]
        count = teacher_log_probs.shape[0]
        kl = {direction: {"exact": torch.zeros(num_layers + 1, dtype=torch.float64),
                          **{k: torch.zeros(num_layers + 1, dtype=torch.float64) for k in ks},
                          **{("folded", k): torch.zeros(num_layers + 1, dtype=torch.float64) for k in ks}}
              for direction in ("student_target", "target_student")}
        kept_mass = {k: 0.0 for k in ks}
        for start in range(0, count, chunk):
            exact = teacher_log_probs[start:start + chunk].double()
            approximations, folded = {}, {}
            for k in ks:
                values, top_ids, rest = top_k_target(exact, k)
                approximations[k] = dense_from_top_k(values, top_ids, rest, vocab)
                folded[k] = TopKTarget(values, top_ids, rest)
                kept_mass[k] += values.exp().sum().item()
            for layer, state in enumerate(states):
                log_q = F.log_softmax(head(norm(state[start:start + chunk])).double(), -1)
                q = log_q.exp()
                for name, log_p in [("exact", exact), *approximations.items()]:
                    kl["student_target"][name][layer] += (q * (log_q - log_p)).sum()
                    kl["target_student"][name][layer] += (exact.exp() * (log_p - log_q)).sum() if name == "exact" \
                        else (log_p.exp() * (log_p - log_q)).sum()
                for k, target in folded.items():
                    for direction in ("student_target", "target_student"):
                        kl[direction][("folded", k)][layer] += folded_kl(log_q, target, direction).sum()
    results = {}
    for direction, values in kl.items():
        exact_kl = values["exact"] / count
        exact_zeta1 = float((weights * exact_kl).sum())
        results[direction] = {"exact_zeta1": exact_zeta1, "exact_kl": exact_kl.tolist(), "k": {}}
        for k in ks:
            for key, label in ((k, "k"), (("folded", k), "folded")):
                approx_kl = values[key] / count
                zeta1 = float((weights * approx_kl).sum())
                results[direction].setdefault(label, {})[str(k)] = {
                    "zeta1": zeta1, "relative_error": (zeta1 - exact_zeta1) / exact_zeta1,
                    "max_layer_relative_error": float(((approx_kl - exact_kl).abs() /
                                                       exact_kl.clamp_min(1e-12)).max())}

    # The trainer's cache (hsconv.distill.teacher) of the same rows, written and read back as a training step does.
    read_seconds, bytes_per_token, write_seconds = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "tokens.parquet"
        table = pd.read_parquet(tokens).iloc[batch:2 * batch].reset_index(drop=True)
        table["input_ids"] = [row[:seq] for row in table["input_ids"]]
        table["n_tokens"] = np.minimum(table["n_tokens"], seq)
        table.to_parquet(token_file)
        for k in ks:
            started = time.perf_counter()
            write_teacher_cache(model_dir, token_file, Path(tmp) / f"cache{k}", k, batch_size=batch)
            write_seconds[str(k)] = time.perf_counter() - started
            bytes_per_token[str(k)] = sum(path.stat().st_size for path in (Path(tmp) / f"cache{k}").glob("*.npy")) \
                / count
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                cache = TeacherCache(Path(tmp) / f"cache{k}")
                cache.rows(np.arange(batch))
                times.append(time.perf_counter() - started)
            read_seconds[str(k)] = times
    return {"model_dir": model_dir, "tokens": count, "batch": batch, "seq": seq, "warm_steps": warm_steps,
            "vocab": vocab, "ks": list(ks), "kl": results, "kept_mass": {str(k): m / count for k, m in kept_mass.items()},
            "teacher_seconds": teacher_seconds, "read_seconds": read_seconds, "bytes_per_token": bytes_per_token,
            "write_seconds": write_seconds,
            "threads": torch.get_num_threads()}


def markdown(result: dict) -> str:
    count = result["tokens"]
    lines = ["| k | mass kept (mean) | ζ1 rel. error, KL(q_l‖p): folded / spread | worst exit, folded | "
             "ζ1 rel. error, KL(p‖q_l): folded / spread | worst exit, folded | cache per 1M tokens | "
             "read a batch's rows, µs/token |", "|---|---|---|---|---|---|---|---|"]
    for k in map(str, result["ks"]):
        st, ts = (result["kl"][direction] for direction in ("student_target", "target_student"))
        folded = "folded" in st
        lines.append(
            f"| {k} | {result['kept_mass'][k]:.4f} | "
            f"{st['folded'][k]['relative_error']:+.2e} / {st['k'][k]['relative_error']:+.2e} | "
            f"{st['folded'][k]['max_layer_relative_error']:.2e} | "
            f"{ts['folded'][k]['relative_error']:+.2e} / {ts['k'][k]['relative_error']:+.2e} | "
            f"{ts['folded'][k]['max_layer_relative_error']:.2e} | "
            f"{result['bytes_per_token'][k] * 1e6 / 1e9:.2f} GB | "
            f"{spread([1e6 * s / count for s in result['read_seconds'][k]])} |" if folded else
            f"| {k} | {result['kept_mass'][k]:.4f} | — / {st['k'][k]['relative_error']:+.2e} | — | "
            f"— / {ts['k'][k]['relative_error']:+.2e} | — | {result['bytes_per_token'][k] * 1e6 / 1e9:.2f} GB | "
            f"{spread([1e6 * s / count for s in result['read_seconds'][k]])} |")
    teacher = [1e6 * s / count for s in result["teacher_seconds"]]
    lines.append("")
    lines.append(f"{count:,} tokens ({result['batch']} × {result['seq']}), V = {result['vocab']:,}; the student had "
                 f"{result['warm_steps']} steps of ζ; exact ζ1 {result['kl']['student_target']['exact_zeta1']:.4f} "
                 f"(KL(q_l‖p)) and {result['kl']['target_student']['exact_zeta1']:.4f} (KL(p‖q_l)). The teacher "
                 f"recomputed (forward, head, log-softmax) costs {spread(teacher)} µs per token; a dense float32 "
                 f"cache would be {result['vocab'] * 4 / 1e3:,.0f} GB per million tokens.")
    if "write_seconds" in result:
        lines.append("Writing the cache (one teacher pass, top-k, to disk) took "
                     + ", ".join(f"{1e6 * seconds / count:,.0f} µs/token at k = {k}"
                                 for k, seconds in result["write_seconds"].items()) + ".")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--tokens", required=True, help="packed tokens with at least 2·B rows of T tokens")
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args()
    result = measure(args.model_dir, args.tokens, tuple(args.ks))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
