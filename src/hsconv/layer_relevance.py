"""Does a block that moves the hidden state little also matter little? Removal effects beside movement. Torch-free.

Reads what ``hsconv layer-relevance`` wrote per model and variant (each document's outcome with every block removed
alone and under the greedy prunings; the intact model's per-layer movement and norm sums per document) and writes:

- ``layer_relevance``: per block l, its movement D_l (= BI_l / 2, ShortGPT's block influence BI = 1 − cos), D_l
  without each window's first position (the attention sink), the state's norm ‖h_l‖ and growth ‖h_l‖/‖h_{l−1}‖;
  beside them the removal effect: KL(intact ‖ block removed) at the scored tokens and the task metric's change,
  each with a bootstrap interval over documents (paired with the intact model for the metric);
- ``layer_relevance_agreement``: Spearman's ρ across blocks between a movement measure and the removal KL, with an
  interval from resampling documents (both sides recomputed from each resample);
- ``layer_pruning``: the n blocks of smallest block influence (ShortGPT) against the n of smallest removal KL,
  removed together; both orders ranked on the even-numbered documents, scored on the odd-numbered ones.

Corpus values are ratios of sums over documents (D: over tokens; KL: over scored tokens; perplexity as lm-eval
aggregates it), and every resample recomputes them so.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from hsconv.errors import InputError
from hsconv.flags import flag, flags, table_stem
from hsconv.io import read_input_table, read_provenance, write_table
from hsconv.paired import paired_differences
from hsconv.settings import MetricsSettings

RANKED_HALF, EVALUATED_HALF = 0, 1  # doc_id % 2: the documents that order the prunings, and those that score them
ORDERS = ("block_influence", "removal_kl")
MOVEMENT_MEASURES = ("movement", "movement_without_first")
INTACT = "intact"


def single_removals(outcomes: pd.DataFrame) -> pd.DataFrame:
    """The rows of the intact model and of each block removed alone, with the block as ``layer`` (0: intact)."""
    single = outcomes[outcomes["n_removed"] <= 1].copy()
    single["layer"] = pd.to_numeric(single["removed"].replace("", "0")).astype(int)
    return single


def _ratio_by_layer(frame: pd.DataFrame, numerator: str, denominator: str) -> pd.Series:
    sums = frame.groupby("layer")[[numerator, denominator]].sum()
    return sums[numerator] / sums[denominator]


def pruning_orders(outcomes: pd.DataFrame, layers: pd.DataFrame, num_layers: int) -> dict[str, list[int]]:
    """Blocks 1..L from the least to the most relevant by each criterion, measured on the ranked half of every data
    set and averaged over data sets with equal weight: block influence 2·D_l (ShortGPT), and the removal KL."""
    layers = layers[(layers["doc_id"] % 2 == RANKED_HALF) & (layers["layer"] >= 1)]
    single = single_removals(outcomes)
    single = single[(single["doc_id"] % 2 == RANKED_HALF) & (single["layer"] >= 1)]
    if layers.empty or single.empty:
        raise InputError("no documents in the ranked half (even doc_id) to order the prunings by; give each data "
                         "set at least one document")
    influence = pd.concat([2 * _ratio_by_layer(frame, "movement_sum", "tokens")
                           for _, frame in layers.groupby("task")], axis=1).mean(axis=1)
    removal = pd.concat([_ratio_by_layer(frame, "kl_sum", "kl_tokens")
                         for _, frame in single.groupby("task")], axis=1).mean(axis=1)
    blocks = np.arange(1, num_layers + 1)
    # a stable sort: equal scores keep the shallower block first
    return {name: [int(blocks[i]) for i in np.argsort(score.reindex(blocks).to_numpy(), kind="stable")]
            for name, score in (("block_influence", influence), ("removal_kl", removal))}


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation along the last axis (ties get their average rank), for one pair of vectors or
    a stack of them."""
    rx, ry = rankdata(x, axis=-1), rankdata(y, axis=-1)
    rx = rx - rx.mean(axis=-1, keepdims=True)
    ry = ry - ry.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis=-1) / np.sqrt((rx ** 2).sum(axis=-1) * (ry ** 2).sum(axis=-1))


def _per_document(frame: pd.DataFrame, column: str, doc_ids: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """documents × blocks matrix of a per-document sum."""
    return frame.pivot(index="doc_id", columns="layer", values=column).reindex(index=doc_ids, columns=blocks) \
        .to_numpy(dtype=float)


def _interval(replicates: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    low, high = np.nanquantile(replicates, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    return low, high


def relevance_tables(outcomes: pd.DataFrame, layers: pd.DataFrame, samples: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The per-block, agreement and pruning tables (see the module's docstring) for every model and variant."""
    per_layer, agreement, pruning = [], [], []
    for (model, variant), frame in outcomes.groupby(["model", "variant"], sort=True):
        states = layers[(layers["model"] == model) & (layers["variant"] == variant)]
        num_layers = int(states["layer"].max())
        blocks = np.arange(1, num_layers + 1)
        single = single_removals(frame)
        paired = _paired(single, "layer", model, variant, samples, confidence, seed)
        for task, task_states in states.groupby("task", sort=True):
            kind = task_states["kind"].iloc[0]
            removals = single[(single["task"] == task) & (single["layer"] >= 1)]
            doc_ids = np.sort(task_states["doc_id"].unique())
            draws = np.random.default_rng(seed).integers(0, len(doc_ids), size=(samples, len(doc_ids)))
            sums = {column: _per_document(task_states, column, doc_ids, np.arange(num_layers + 1))
                    for column in ("movement_sum", "tokens", "movement_without_first_sum", "tokens_without_first",
                                   "norm_sum")}
            kl_sum, kl_tokens = (_per_document(removals, column, doc_ids, blocks) for column in ("kl_sum", "kl_tokens"))

            def pooled(numerator, denominator, rows=slice(None)):
                with np.errstate(invalid="ignore", divide="ignore"):  # NaN where a resample has no such token
                    return numerator[rows].sum(axis=-2) / denominator[rows].sum(axis=-2)

            movement = pooled(sums["movement_sum"], sums["tokens"])[1:]
            without_first = pooled(sums["movement_without_first_sum"], sums["tokens_without_first"])[1:]
            norm = pooled(sums["norm_sum"], sums["tokens"])
            kl = pooled(kl_sum, kl_tokens)
            kl_low, kl_high = _interval(pooled(kl_sum, kl_tokens, draws), confidence)
            for index, block in enumerate(blocks):
                change = paired[(paired["task"] == task) & (paired["configuration"] == str(block))].iloc[0]
                per_layer.append({
                    "model": model, "variant": variant, "task": task, "kind": kind, "layer": int(block),
                    "movement": movement[index], "movement_without_first": without_first[index],
                    "block_influence": 2 * movement[index], "norm": norm[block],
                    "norm_growth": norm[block] / norm[block - 1], "removal_kl": kl[index],
                    "removal_kl_low": kl_low[index], "removal_kl_high": kl_high[index],
                    "metric": change["metric"], "intact_value": change["baseline_value"],
                    "removed_value": change["variant_value"], "difference": change["difference"],
                    "difference_low": change["lower"], "difference_high": change["upper"],
                    "n_documents": len(doc_ids)})
            resampled_kl = pooled(kl_sum, kl_tokens, draws)
            for measure, numerator, denominator, value in (
                    ("movement", "movement_sum", "tokens", movement),
                    ("movement_without_first", "movement_without_first_sum", "tokens_without_first", without_first)):
                resampled = pooled(sums[numerator], sums[denominator], draws)[:, 1:]
                low, high = _interval(spearman(resampled, resampled_kl), confidence)
                agreement.append({"model": model, "variant": variant, "task": task, "kind": kind,
                                  "measure": measure, "against": "removal_kl", "spearman": float(spearman(value, kl)),
                                  "spearman_low": float(low), "spearman_high": float(high),
                                  "blocks": num_layers, "n_documents": len(doc_ids)})
        pruning.extend(_pruning_rows(frame, states, model, variant, num_layers, samples, confidence, seed))
    return pd.DataFrame(per_layer), pd.DataFrame(agreement), pd.DataFrame(pruning)


def _paired(frame: pd.DataFrame, label: str, model: str, variant: str, samples: int, confidence: float,
            seed: int) -> pd.DataFrame:
    """Each configuration's task metric against the intact model's on the same documents (hsconv.paired); the
    result's ``configuration`` is the configuration's ``label`` as text."""
    names = frame[label].astype(str).where(frame["n_removed"] > 0, INTACT)
    paired = paired_differences(frame.assign(variant=names, layer=0), baseline=INTACT, samples=samples,
                                confidence=confidence, seed=seed)
    return paired.rename(columns={"variant": "configuration"}).assign(model=model, variant=variant)


def _pruning_rows(frame: pd.DataFrame, states: pd.DataFrame, model: str, variant: str, num_layers: int,
                  samples: int, confidence: float, seed: int) -> list[dict]:
    """For each order and n = 1 .. the deepest pruning measured: the task metric with the first n blocks of the
    order removed, paired with the intact model on the evaluated half."""
    orders = pruning_orders(frame, states, num_layers)
    evaluated = frame[frame["doc_id"] % 2 == EVALUATED_HALF]
    measured = set(evaluated["removed"])
    paired = _paired(evaluated, "removed", model, variant, samples, confidence, seed)
    rows = []
    for order_name in ORDERS:
        order = orders[order_name]
        for n in range(1, num_layers):
            removed = ",".join(map(str, sorted(order[:n])))
            if removed not in measured:
                break
            for change in paired[paired["configuration"] == removed].itertuples():
                rows.append({"model": model, "variant": variant, "order": order_name, "n_removed": n,
                             "removed": removed, "task": change.task, "kind": change.kind, "metric": change.metric,
                             "intact_value": change.baseline_value, "pruned_value": change.variant_value,
                             "difference": change.difference, "difference_low": change.lower,
                             "difference_high": change.upper, "n_documents": change.n_documents})
    return rows


@flags("metrics", documents_paths=flag("layer-relevance outcomes per model and variant", name="--documents"),
       layers_paths=flag("their per-layer sums", name="--layers"),
       out_stem=flag("Parquet; .csv and .md are written beside it", name="--out", type=table_stem),
       agreement_stem=flag("Parquet; .csv and .md are written beside it", name="--agreement-out", type=table_stem),
       pruning_stem=flag("Parquet; .csv and .md are written beside it", name="--pruning-out", type=table_stem))
def tabulate_layer_relevance(documents_paths: list[str], layers_paths: list[str], out_stem: str | os.PathLike,
                             agreement_stem: str | os.PathLike, pruning_stem: str | os.PathLike, config_hash: str,
                             bootstrap_samples: int = MetricsSettings.bootstrap_samples,
                             confidence: float = MetricsSettings.confidence,
                             seed: int = MetricsSettings.seed) -> pd.DataFrame:
    """Read every model's and variant's outcomes and per-layer sums; write the three tables (Parquet, CSV, Markdown)."""
    made_by = "layer-relevance"
    outcomes = pd.concat([read_input_table(path, "layer-relevance outcomes", ["model", "variant", "removed", "doc_id"],
                                           made_by=made_by) for path in documents_paths], ignore_index=True)
    layers = pd.concat([read_input_table(path, "layer-relevance movement sums", ["model", "variant", "layer"],
                                         made_by=made_by) for path in layers_paths], ignore_index=True)
    per_layer, agreement, pruning = relevance_tables(outcomes, layers, bootstrap_samples, confidence, seed)
    measured = {f"{record['model']}/{record['variant']}": {key: record[key] for key in ("dtype", "device", "orders")}
                for record in (read_provenance(path)["layer_relevance"] for path in documents_paths)}
    metadata = {"layer_relevance": {"samples": bootstrap_samples, "confidence": confidence, "seed": seed,
                                    "config_hash": config_hash, "measured": measured}}
    write_table(per_layer, out_stem, metadata)
    write_table(agreement, agreement_stem, metadata)
    write_table(pruning, pruning_stem, metadata)
    return per_layer
