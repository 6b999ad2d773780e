"""Movement D_l per layer and the convergence score S_model (the paper's Definitions 1 and 2).

Input is the per-token table of :mod:`hsconv.hidden_states`. A layer's D is the mean over all measured tokens;
uncertainty comes from a bootstrap over documents (tokens of one document are not independent).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd

from hsconv.errors import InputError
from hsconv.io import read_input_table, read_provenance, write_parquet

log = logging.getLogger(__name__)


def convergence_score(movement_by_layer) -> float:
    """S_model = 1 − Σ max(0, D_l − D_{l−1}) / Σ |D_l − D_{l−1}| over consecutive layers.

    1 when D never increases with depth; 0 when it never decreases. A flat D (no change at all) counts as never
    increasing, so 1.
    """
    steps = np.diff(np.asarray(movement_by_layer, dtype=np.float64), axis=-1)
    total = np.abs(steps).sum(axis=-1)
    rises = np.clip(steps, 0.0, None).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1.0 - rises / np.where(total > 0, total, 1.0), 1.0)[()]


def per_document_sums(tokens: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document ids, token counts per document, movement sums per document × layer)."""
    grouped = tokens.groupby(["document", "layer"], sort=True)[column].agg(["sum", "count"])
    sums = grouped["sum"].unstack("layer")
    counts = grouped["count"].unstack("layer").iloc[:, 0].to_numpy(dtype=np.float64)
    return sums.index.to_numpy(), counts, sums.to_numpy(dtype=np.float64)


def bootstrap_layer_means(counts: np.ndarray, sums: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Token-weighted mean D per layer for ``samples`` resamples of the documents (samples × layers)."""
    rng = np.random.default_rng(seed)
    documents = len(counts)
    weights = rng.multinomial(documents, np.full(documents, 1.0 / documents), size=samples).astype(np.float64)
    return (weights @ sums) / (weights @ counts)[:, None]


def summarise_movement(tokens: pd.DataFrame, quantiles=(0.1, 0.5, 0.9), bootstrap_samples: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-layer D (mean, quantiles, bootstrap interval) and per-convention S_model with its interval."""
    layer_rows, score_rows = [], []
    tail = (1.0 - confidence) / 2.0
    # One `movement_<convention>` column per last-state convention the dump stage recorded.
    conventions = [column.removeprefix("movement_") for column in tokens.columns if column.startswith("movement_")]
    # D(h_{L−1}, FinalNorm(h_{L−1})) over the same tokens: the floor the final norm alone sets under D_L(hf). Dumps
    # written before it was recorded have no such column.
    last_layer = tokens["layer"].max()
    norm_floor = (float(tokens.loc[tokens["layer"] == last_layer, "norm_floor"].mean())
                  if "norm_floor" in tokens.columns else float("nan"))
    for convention in conventions:
        column = f"movement_{convention}"
        documents, counts, sums = per_document_sums(tokens, column)
        means = sums.sum(axis=0) / counts.sum()
        replicates = bootstrap_layer_means(counts, sums, bootstrap_samples, seed)
        low, high = np.quantile(replicates, [tail, 1.0 - tail], axis=0)
        token_quantiles = tokens.groupby("layer", sort=True)[column].quantile(list(quantiles)).unstack()
        layers = np.sort(tokens["layer"].unique())
        for index, layer in enumerate(layers):
            row = {"final_norm": convention, "layer": int(layer), "movement_mean": means[index],
                   "ci_low": low[index], "ci_high": high[index], "ci_level": confidence}
            row.update({f"q{round(q * 100):02d}": token_quantiles.loc[layer, q] for q in quantiles})
            row.update(norm_floor=norm_floor if layer == last_layer else float("nan"), n_tokens=int(counts.sum()),
                       n_documents=len(documents))
            layer_rows.append(row)
        score_low, score_high = np.quantile(convergence_score(replicates), [tail, 1.0 - tail])
        score_rows.append({
            "final_norm": convention,
            "s_model": float(convergence_score(means)),
            "s_model_ci_low": float(score_low), "s_model_ci_high": float(score_high),
            "last_layer_movement": float(means[-1]),
            "previous_layer_movement": float(means[-2]) if len(means) > 1 else float("nan"),
            "last_layer_ratio": float(means[-1] / means[-2]) if len(means) > 1 else float("nan"),
            "norm_floor": norm_floor,
            "num_layers": len(layers), "n_tokens": int(counts.sum()), "n_documents": len(documents),
        })
    return pd.DataFrame(layer_rows), pd.DataFrame(score_rows)


def read_hidden_state_dump(path: str | os.PathLike, model: str) -> pd.DataFrame:
    """The per-token table of `hsconv dump-hidden-states`, refused when it is another table or another model's."""
    tokens = read_input_table(path, "hidden-state dump", ["document", "layer"], made_by="dump-hidden-states")
    if not any(column.startswith("movement_") for column in tokens.columns):
        raise InputError(f"no movement_<convention> column (it has {list(tokens.columns)})", str(path),
                         "give the table that `hsconv dump-hidden-states` writes")
    dumped = (read_provenance(path).get("hidden_states") or {}).get("model")
    if dumped is not None and dumped != model:
        raise InputError(f"this dump is of model {dumped!r}, not {model!r}", str(path),
                         f"give the dump of {model!r}, or --model {dumped}")
    return tokens


def compute_convergence(hidden_path: str, layers_out: str | os.PathLike, scores_out: str | os.PathLike,
                        model: str, variant: str, dataset: str, quantiles=(0.1, 0.5, 0.9),
                        bootstrap_samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> None:
    """Stage entry point: the per-token table of one model × variant × data set → two tidy tables."""
    tokens = read_hidden_state_dump(hidden_path, model)
    layers, scores = summarise_movement(tokens, quantiles, bootstrap_samples, confidence, seed)
    keys = {"model": model, "variant": variant, "dataset": dataset}
    settings = {"quantiles": list(quantiles), "bootstrap_samples": bootstrap_samples, "confidence": confidence,
                "seed": seed, "hidden_states": read_provenance(hidden_path).get("hidden_states")}
    for frame, out in ((layers, layers_out), (scores, scores_out)):
        frame.insert(0, "dataset", dataset)
        frame.insert(0, "variant", variant)
        frame.insert(0, "model", model)
        write_parquet(frame, out, {"metrics": {**keys, **settings}})
    for row in scores.itertuples():
        log.info("%s/%s on %s (%s): S_model=%.4f, last D=%.4f (%.2fx the layer before)", model, variant, dataset,
                 row.final_norm, row.s_model, row.last_layer_movement, row.last_layer_ratio)
