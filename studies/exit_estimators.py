"""How much each exit-sampling scheme's ζ1 estimate spreads, computed exactly over every possible draw.

    python -m studies.exit_estimators --layers RUN/results/training/smollm2-135m/layers.parquet \
        --out docs/findings/recipe/estimators

For a per-exit KL profile (the mean over a training log's steps of each exit's logged KL, the output exit's included)
and the layer weights w_l = softmax(k·l), every draw a scheme of :func:`hsconv.distill.loss.sample_exits` can make is
enumerated with its probability, so the estimate Σ coefficient_l KL_l has an exact mean (which must be the full
ζ1 = Σ w_l KL_l: the schemes are unbiased) and an exact standard deviation: the noise the draw alone adds to one
step's loss, for the same batch. No sampling, so two schemes' spreads are compared without a Monte Carlo error.
The output anchor β KL_L is computed in every step under every scheme and adds no spread, so it is left out.
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import pandas as pd
import torch

from hsconv.distill.loss import exit_strata, layer_weights

SCHEMES = ["uniform", "weighted", "uniform_keep_last", "stratified_keep_last"]


def draw_distribution(scheme: str, weights: torch.Tensor, samples: int) -> list[tuple[float, dict[int, float]]]:
    """Every draw of ``scheme`` as (probability, {exit: coefficient}), written from the schemes' definitions (the
    README's and ``sample_exits``' docstring), not from the sampler's code."""
    w = weights.double().tolist()
    exits = len(w)
    if scheme == "uniform":
        draws = list(itertools.combinations(range(exits), samples))
        return [(1 / len(draws), {l: w[l] * exits / samples for l in draw}) for draw in draws]
    if scheme == "weighted":
        outcomes = []
        for draw in itertools.combinations_with_replacement(range(exits), samples):
            counts = {l: draw.count(l) for l in set(draw)}
            arrangements = math.factorial(samples) / math.prod(math.factorial(c) for c in counts.values())
            probability = arrangements * math.prod(w[l] ** c for l, c in counts.items())
            outcomes.append((probability, {l: c / samples for l, c in counts.items()}))
        return outcomes
    if scheme == "uniform_keep_last":
        draws = list(itertools.combinations(range(exits - 1), samples - 1))
        return [(1 / len(draws), {**{l: w[l] * (exits - 1) / (samples - 1) for l in draw}, exits - 1: w[-1]})
                for draw in draws]
    if scheme == "stratified_keep_last":
        strata = [band.tolist() for band in exit_strata(weights[:-1], samples - 1)]
        masses = [sum(w[l] for l in band) for band in strata]
        outcomes = []
        for picks in itertools.product(*strata):
            probability = math.prod(w[l] / mass for l, mass in zip(picks, masses))
            outcomes.append((probability, {**{l: mass for l, mass in zip(picks, masses)}, exits - 1: w[-1]}))
        return outcomes
    raise ValueError(f"unknown scheme {scheme!r}; one of {', '.join(SCHEMES)}")


def estimate_moments(scheme: str, weights: torch.Tensor, kl: torch.Tensor, samples: int) -> dict[str, float]:
    """The exact mean and standard deviation of Σ coefficient_l KL_l over ``scheme``'s draws, the total probability
    (1 up to rounding: a check on the enumeration) and the full ζ1 they should average to."""
    kl = kl.double().tolist()
    outcomes = draw_distribution(scheme, weights, samples)
    values = [(p, sum(c * kl[l] for l, c in coefficients.items())) for p, coefficients in outcomes]
    mean = sum(p * value for p, value in values)
    variance = sum(p * (value - mean) ** 2 for p, value in values)
    return {"mean": mean, "std": math.sqrt(variance), "total_probability": sum(p for p, _ in values),
            "full_zeta1": float((weights.double() * torch.tensor(kl, dtype=torch.float64)).sum()), "draws": len(outcomes)}


def kl_profile(layers: pd.DataFrame) -> torch.Tensor:
    """Each exit's KL averaged over the steps that computed it (a sampled run logs NaN at the others)."""
    profile = layers.groupby("layer")["kl"].mean()  # pandas skips NaN
    if profile.isna().any():
        raise ValueError(f"exits never computed in this log: {profile.index[profile.isna()].tolist()}")
    return torch.tensor(profile.sort_index().to_numpy(), dtype=torch.float64)


def estimator_table(kl: torch.Tensor, k: float, samples: list[int]) -> pd.DataFrame:
    weights = layer_weights(len(kl) - 1, k)
    rows = []
    for m in samples:
        for scheme in SCHEMES:
            moments = estimate_moments(scheme, weights, kl, m)
            rows.append({"scheme": scheme, "exit_samples": m, "k": k, **moments,
                         "relative_std": moments["std"] / moments["full_zeta1"]})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=Path, required=True, help="a training run's layers.parquet")
    parser.add_argument("--k", type=float, default=0.25, help="the layer weights' k (config.yaml: distill.k)")
    parser.add_argument("--samples", type=int, nargs="+", default=[2, 4],
                        help="exit_samples m (enumerating m = 8 of 31 exits takes millions of draws)")
    parser.add_argument("--out", type=Path, help="write OUT.csv and OUT.md")
    args = parser.parse_args()
    table = estimator_table(kl_profile(pd.read_parquet(args.layers)), args.k, args.samples)
    from hsconv.io import markdown_table

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out.with_suffix(".csv"), index=False, float_format="%.6g")
        args.out.with_suffix(".md").write_text(markdown_table(table) + "\n")
    print(markdown_table(table))


if __name__ == "__main__":
    main()
