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
from hsconv.flags import flag, flags
from hsconv.io import read_input_table, read_provenance, write_parquet
from hsconv.settings import MetricsSettings

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


def document_resamples(documents: int, samples: int, seed: int) -> np.ndarray:
    """How often each document is drawn in each of ``samples`` bootstrap resamples (samples × documents)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(documents, np.full(documents, 1.0 / documents), size=samples).astype(np.float64)


def bootstrap_layer_means(counts: np.ndarray, sums: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Token-weighted mean D per layer for ``samples`` resamples of the documents (samples × layers)."""
    weights = document_resamples(len(counts), samples, seed)
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
        # the largest increase of D from one layer to the next: a ratio D_L / D_{L-1} that improves because D_{L-1}
        # grew, or a jump moved elsewhere, shows here
        rises = np.diff(means)
        rise_at = int(np.argmax(rises)) if len(rises) else None
        score_rows.append({
            "final_norm": convention,
            "s_model": float(convergence_score(means)),
            "s_model_ci_low": float(score_low), "s_model_ci_high": float(score_high),
            "last_layer_movement": float(means[-1]),
            "previous_layer_movement": float(means[-2]) if len(means) > 1 else float("nan"),
            "last_layer_ratio": float(means[-1] / means[-2]) if len(means) > 1 else float("nan"),
            "largest_rise": float(rises[rise_at]) if rise_at is not None else float("nan"),
            "largest_rise_layer": int(layers[rise_at + 1]) if rise_at is not None else -1,
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


@flags("metrics", hidden_path=flag("the per-token table of dump-hidden-states", name="--hidden"))
def compute_convergence(hidden_path: str, layers_out: str | os.PathLike, scores_out: str | os.PathLike,
                        model: str, variant: str, dataset: str, quantiles=MetricsSettings.quantiles,
                        bootstrap_samples: int = MetricsSettings.bootstrap_samples,
                        confidence: float = MetricsSettings.confidence, seed: int = MetricsSettings.seed) -> None:
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


def _paired_document_sums(base: pd.DataFrame, variant: pd.DataFrame, column: str, names: tuple[str, str]):
    """Per-document token counts and movement sums of both variants, refused unless they measured the same tokens."""
    (base_documents, base_counts, base_sums), (documents, counts, sums) = (per_document_sums(frame, column)
                                                                          for frame in (base, variant))
    if not (np.array_equal(base_documents, documents) and np.array_equal(base_counts, counts)):
        raise InputError(f"{names[1]} and {names[0]} were measured on different documents or tokens; a paired "
                         f"comparison needs the same ones (dump both from the same texts)")
    return documents, counts, base_sums, sums


def paired_convergence_differences(base: pd.DataFrame, variant: pd.DataFrame, samples: int = 1000,
                                   confidence: float = 0.95, seed: int = 0,
                                   names: tuple[str, str] = ("base", "variant")) -> pd.DataFrame:
    """Variant − base S_model and last-layer ratio D_L / D_{L−1}, per last-state convention, with percentile
    intervals over resamples of the documents drawn once for both variants.

    Both dumps hold the same documents, so one draw weights the same documents in both: what the two have in common
    (a hard passage moves every layer more, whatever the weights) cancels from the difference, and the interval is
    the one a claim "distillation raised S" needs, not two separate intervals that happen not to overlap."""
    rows = []
    tail = (1.0 - confidence) / 2.0
    conventions = [column.removeprefix("movement_") for column in base.columns if column.startswith("movement_")]
    missing = [name for name in conventions if f"movement_{name}" not in variant.columns]
    if missing:
        raise InputError(f"{names[1]} has no movement under the {', '.join(missing)} convention(s) that {names[0]} has")
    for convention in conventions:
        documents, counts, base_sums, sums = _paired_document_sums(base, variant, f"movement_{convention}", names)
        weights = document_resamples(len(documents), samples, seed)  # one draw for both: the pairing
        row = {"final_norm": convention}
        for name, function in (("s_model", convergence_score), ("last_layer_ratio", _last_layer_ratio)):
            base_value, value = (float(function(frame.sum(axis=0) / counts.sum())) for frame in (base_sums, sums))
            replicates = (function((weights @ sums) / (weights @ counts)[:, None])
                          - function((weights @ base_sums) / (weights @ counts)[:, None]))
            low, high = np.quantile(replicates, [tail, 1.0 - tail])
            row.update({f"{name}_base": base_value, f"{name}_variant": value, f"{name}_difference": value - base_value,
                        f"{name}_difference_low": float(low), f"{name}_difference_high": float(high)})
        row.update(confidence=confidence, n_documents=len(documents), n_tokens=int(counts.sum()),
                   bootstrap_samples=samples)
        rows.append(row)
    return pd.DataFrame(rows)


def _last_layer_ratio(movement_by_layer) -> np.ndarray:
    movement = np.asarray(movement_by_layer, dtype=np.float64)
    return movement[..., -1] / movement[..., -2]


@flags("metrics", base_path=flag("the base model's per-token table", name="--base"),
       variant_path=flag("the variant's per-token table", name="--hidden"))
def compare_convergence(base_path: str, variant_path: str, out: str | os.PathLike, model: str, variant: str,
                        dataset: str, bootstrap_samples: int = MetricsSettings.bootstrap_samples,
                        confidence: float = MetricsSettings.confidence, seed: int = MetricsSettings.seed) -> None:
    """Stage entry point: the base and one variant's per-token tables of one model and data set → their paired
    differences in S_model and in the last-layer ratio."""
    base, other = (read_hidden_state_dump(path, model) for path in (base_path, variant_path))
    table = paired_convergence_differences(base, other, bootstrap_samples, confidence, seed, ("base", variant))
    for position, (key, value) in enumerate({"model": model, "baseline": "base", "variant": variant,
                                             "dataset": dataset}.items()):
        table.insert(position, key, value)
    settings = {"bootstrap_samples": bootstrap_samples, "confidence": confidence, "seed": seed,
                "hidden_states": {name: read_provenance(path).get("hidden_states")
                                  for name, path in (("base", base_path), (variant, variant_path))}}
    write_parquet(table, out, {"metrics": {"model": model, "variant": variant, "dataset": dataset, **settings}})
    for row in table.itertuples():
        log.info("%s %s − base on %s (%s): S_model %+.4f [%+.4f, %+.4f]", model, variant, dataset, row.final_norm,
                 row.s_model_difference, row.s_model_difference_low, row.s_model_difference_high)
