"""Base vs distilled, paired by document: the difference of a corpus metric at every exit with a bootstrap interval.

Both variants are scored on the same documents, so resampling documents (the same draw for both) keeps the pairing
and gives a much tighter interval on the difference than two independent intervals would. Each resample recomputes
the corpus metric as lm-eval aggregates it: LAMBADA accuracy is a mean over documents; WikiText word perplexity is
exp(−Σ loglikelihood / Σ words), a ratio of sums, not a mean of per-document perplexities.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from hsconv.errors import InputError
from hsconv.flags import flag, flags, table_stem
from hsconv.io import read_input_table, write_table
from hsconv.settings import MetricsSettings
from hsconv.tables import with_kind


def accuracy(documents: pd.DataFrame, draws: np.ndarray) -> np.ndarray:
    return documents["acc"].to_numpy()[draws].mean(axis=-1)


def word_perplexity(documents: pd.DataFrame, draws: np.ndarray) -> np.ndarray:
    loglikelihood, words = documents["loglikelihood"].to_numpy(), documents["words"].to_numpy()
    return np.exp(-loglikelihood[draws].sum(axis=-1) / words[draws].sum(axis=-1))


CORPUS_METRICS = {("lambada", "acc"): accuracy, ("wikitext", "word_perplexity"): word_perplexity}


def paired_differences(documents: pd.DataFrame, baseline: str = "base", samples: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per model, task metric, exit and non-baseline variant: both corpus values, their difference
    (variant − baseline) and its percentile interval over ``samples`` paired document resamples. One draw of
    documents per model and task serves every exit, so the intervals of neighbouring exits are comparable."""
    rows = []
    documents = with_kind(documents)
    for (model, task, kind), frame in documents.groupby(["model", "task", "kind"], sort=True):
        # the data set's name is any name; its kind says which corpus metric it has
        metrics = [(metric, function) for (name, metric), function in CORPUS_METRICS.items() if name == kind]
        if not metrics:
            raise InputError(f"no paired corpus metric for data set {task!r} of kind {kind!r}; "
                             f"supported kinds: {sorted({name for name, _ in CORPUS_METRICS})}")
        base = frame[frame["variant"] == baseline]
        if base.empty:
            raise InputError(f"no {baseline!r} documents for model {model!r}, task {task!r}")
        doc_ids = np.sort(base["doc_id"].unique())
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, len(doc_ids), size=(samples, len(doc_ids)))
        everything = np.arange(len(doc_ids))
        for variant in sorted(set(frame["variant"]) - {baseline}):
            for layer in sorted(set(base["layer"]) & set(frame.loc[frame["variant"] == variant, "layer"])):
                pair = [frame[(frame["variant"] == name) & (frame["layer"] == layer)].set_index("doc_id")
                        .sort_index() for name in (baseline, variant)]
                for side, name in zip(pair, (baseline, variant)):
                    if not np.array_equal(side.index.to_numpy(), doc_ids):
                        raise InputError(f"{model} {name} exit {layer} on {task} was scored on other documents "
                                         f"than {baseline}: a paired comparison needs the same ones")
                for metric, function in metrics:
                    values = [float(function(side, everything)) for side in pair]
                    replicates = function(pair[1], draws) - function(pair[0], draws)
                    lower, upper = np.quantile(replicates, [(1 - confidence) / 2, (1 + confidence) / 2])
                    rows.append({"model": model, "task": task, "kind": kind, "metric": metric, "layer": layer,
                                 "baseline": baseline, "variant": variant, "baseline_value": values[0],
                                 "variant_value": values[1], "difference": values[1] - values[0],
                                 "lower": float(lower), "upper": float(upper), "confidence": confidence,
                                 "n_documents": len(doc_ids), "bootstrap_samples": samples})
    return pd.DataFrame(rows)


@flags("metrics", paths=flag("per-document outcomes of evaluate-layers", name="--documents"),
       out_stem=flag("Parquet; .csv and .md are written beside it", name="--out", type=table_stem))
def tabulate_paired_differences(paths: list[str], out_stem: str | os.PathLike, config_hash: str,
                                bootstrap_samples: int = MetricsSettings.bootstrap_samples,
                                confidence: float = MetricsSettings.confidence,
                                seed: int = MetricsSettings.seed) -> pd.DataFrame:
    """Read every model's and variant's per-document outcomes and write the paired table (Parquet, CSV, Markdown)."""
    documents = pd.concat([read_input_table(path, "per-document outcomes", ["model", "variant", "doc_id", "layer"],
                                            made_by="evaluate-layers") for path in paths], ignore_index=True)
    table = paired_differences(documents, samples=bootstrap_samples, confidence=confidence, seed=seed)
    settings = {"samples": bootstrap_samples, "confidence": confidence, "seed": seed,
                "config_hash": config_hash}
    write_table(table, out_stem, {"paired_bootstrap": settings})
    return table
