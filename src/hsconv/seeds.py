"""How much of a distillation's effect is the seed's: the main run repeated from further seeds (``distill.seeds``).

Every bootstrap interval in the convergence table resamples documents of *one* training run; it says how sure we
are of that run's S_model, not how much another run would differ. The seeds study trains the same settings from
seeds seed, seed + 1, … (a different order of the packed sequences; everything else equal), measures each on the
same texts, and sets the spread over seeds (standard deviation, n − 1 in the denominator, and the range) beside the
first run's bootstrap interval. A difference between recipes smaller than this spread is not a finding.
"""

from __future__ import annotations

import os

import pandas as pd

from hsconv.errors import InputError
from hsconv.io import read_input_table, write_table

SEED_PREFIX = "distilled-seed-"
# What is compared across seeds, from the convergence table.
SPREAD_COLUMNS = ("s_model", "last_layer_ratio", "last_layer_movement")


def seed_variants(first_seed: int, count: int) -> dict[str, int]:
    """{variant: seed} of the main distillation's ``count`` seeds: ``distilled`` from ``first_seed`` (distill.seed),
    then ``distilled-seed-<s>`` for s = first_seed + 1, …"""
    seeds = range(first_seed, first_seed + count)
    return {"distilled": seeds[0], **{f"{SEED_PREFIX}{seed}": seed for seed in seeds[1:]}}


def seed_spread(scores: pd.DataFrame, seeds: dict[str, int]) -> pd.DataFrame:
    """One row per model, data set and last-state convention: each compared quantity's mean, standard deviation
    (ddof = 1) and range over the seeds, and the first seed's own value with its bootstrap interval.

    ``scores``: convergence-table rows of the seeds' variants; ``seeds``: {variant: seed}, the first seed first."""
    missing = sorted(set(seeds) - set(scores["variant"]))
    if missing:
        raise InputError(f"no convergence scores for the seed variant(s) {', '.join(missing)}")
    if len(seeds) < 2:
        raise InputError(f"a spread over seeds needs at least 2 seeds, got {len(seeds)}")
    first = next(iter(seeds))
    scores = scores[scores["variant"].isin(list(seeds))]
    rows = []
    for (model, dataset, convention), frame in scores.groupby(["model", "dataset", "final_norm"], sort=True):
        absent = sorted(set(seeds) - set(frame["variant"]))
        if absent:
            raise InputError(f"{model} on {dataset} ({convention}) has no scores for {', '.join(absent)}")
        frame = frame.set_index("variant").loc[list(seeds)]
        row = {"model": model, "dataset": dataset, "final_norm": convention, "n_seeds": len(seeds),
               "seeds": " ".join(str(seed) for seed in seeds.values())}
        for column in SPREAD_COLUMNS:
            values = frame[column].astype(float)
            row.update({f"{column}_mean": values.mean(), f"{column}_std": values.std(ddof=1),
                        f"{column}_min": values.min(), f"{column}_max": values.max()})
        main = frame.loc[first]
        row.update(first_seed=seeds[first], s_model_first=main["s_model"], s_model_first_ci_low=main["s_model_ci_low"],
                   s_model_first_ci_high=main["s_model_ci_high"])
        rows.append(row)
    return pd.DataFrame(rows)


def tabulate_seeds(paths: list[str], first_seed: int, count: int, out_stem: str | os.PathLike,
                   config_hash: str) -> pd.DataFrame:
    """Read the seeds' convergence scores and write the spread table (Parquet, CSV, Markdown)."""
    seeds = seed_variants(first_seed, count)
    scores = pd.concat([read_input_table(path, "convergence scores", ["model", "variant", "dataset", "s_model"],
                                         made_by="compute-convergence") for path in paths], ignore_index=True)
    table = seed_spread(scores, seeds)
    write_table(table, out_stem, {"seeds": {"variants": seeds, "config_hash": config_hash}})
    return table
