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
from hsconv.flags import flag, flags, table_stem
from hsconv.io import read_input_table, write_table

# What is compared across seeds, from the convergence table.
SPREAD_COLUMNS = ("s_model", "last_layer_ratio", "last_layer_movement")


def seed_variants(first_seed: int, count: int, name: str = "distilled") -> dict[str, int]:
    """{variant: seed} of a distillation's ``count`` seeds: ``name`` (the main run: ``distilled``) from ``first_seed``
    (distill.seed), then ``<name>-seed-<s>`` for s = first_seed + 1, …"""
    seeds = range(first_seed, first_seed + count)
    return {name: seeds[0], **{f"{name}-seed-{seed}": seed for seed in seeds[1:]}}


def _require_seeds(variants, seeds: dict[str, int], what: str) -> None:
    missing = sorted(set(seeds) - set(variants))
    if missing:
        raise InputError(f"no {what} for the seed variant(s) {', '.join(missing)}")
    if len(seeds) < 2:
        raise InputError(f"a spread over seeds needs at least 2 seeds, got {len(seeds)}")


def spread(values: pd.Series, column: str) -> dict[str, float]:
    """Mean, standard deviation (ddof = 1), minimum and maximum of one quantity over the seeds."""
    values = values.astype(float)
    return {f"{column}_mean": values.mean(), f"{column}_std": values.std(ddof=1), f"{column}_min": values.min(),
            f"{column}_max": values.max()}


def _per_group(table: pd.DataFrame, seeds: dict[str, int], keys: list[str], what: str):
    """(key values, that group's rows indexed by variant in seed order) for each group; a group that lacks a seed
    is refused, so a partly missing run is not averaged over fewer seeds without a word."""
    table = table[table["variant"].isin(list(seeds))]
    for values, frame in table.groupby(keys, sort=True):
        absent = sorted(set(seeds) - set(frame["variant"]))
        if absent:
            raise InputError(f"{' '.join(map(str, values))} has no {what} for {', '.join(absent)}")
        yield dict(zip(keys, values)), frame.set_index("variant").loc[list(seeds)]


def seed_spread(scores: pd.DataFrame, seeds: dict[str, int]) -> pd.DataFrame:
    """One row per model, data set and last-state convention: each compared quantity's mean, standard deviation
    (ddof = 1) and range over the seeds, and the first seed's own value with its bootstrap interval.

    ``scores``: convergence-table rows of the seeds' variants; ``seeds``: {variant: seed}, the first seed first."""
    _require_seeds(scores["variant"], seeds, "convergence scores")
    first = next(iter(seeds))
    rows = []
    for keys, frame in _per_group(scores, seeds, ["model", "dataset", "final_norm"], "scores"):
        row = {**keys, "n_seeds": len(seeds), "seeds": " ".join(str(seed) for seed in seeds.values())}
        for column in SPREAD_COLUMNS:
            row.update(spread(frame[column], column))
        main = frame.loc[first]
        row.update(first_seed=seeds[first], s_model_first=main["s_model"], s_model_first_ci_low=main["s_model_ci_low"],
                   s_model_first_ci_high=main["s_model_ci_high"])
        rows.append(row)
    return pd.DataFrame(rows)


def difference_spread(paired: pd.DataFrame, seeds: dict[str, int]) -> pd.DataFrame:
    """One row per model, data set, metric and exit of a paired-differences table (:mod:`hsconv.paired`): the
    variant's value and its difference from the baseline, each as mean, standard deviation (ddof = 1) and range over
    the seeds, beside the first seed's paired bootstrap interval. Each seed's difference is paired on the same
    documents; the spread says how much of it another training run would keep."""
    _require_seeds(paired["variant"], seeds, "paired differences")
    first = next(iter(seeds))
    rows = []
    for keys, frame in _per_group(paired, seeds, ["model", "task", "kind", "metric", "layer"], "paired differences"):
        row = {**keys, "baseline": frame["baseline"].iloc[0], "baseline_value": frame["baseline_value"].iloc[0],
               "n_documents": int(frame["n_documents"].iloc[0]), "n_seeds": len(seeds),
               "seeds": " ".join(str(seed) for seed in seeds.values())}
        for column in ("variant_value", "difference"):
            row.update(spread(frame[column], column))
        main = frame.loc[first]
        row.update(first_seed=seeds[first], difference_first=main["difference"], difference_first_low=main["lower"],
                   difference_first_high=main["upper"], confidence=main["confidence"])
        rows.append(row)
    return pd.DataFrame(rows)


@flags(paths=flag("compute-convergence scores, or paired-differences tables, of every seed", name="--tables"),
       first_seed=flag("distill.seed", minimum=0), count=flag("distill.seeds", name="--seeds", minimum=2),
       out_stem=flag("the Parquet table; .csv and .md are written beside it", name="--out", type=table_stem),
       paired="the tables are paired differences from base (else convergence scores)",
       names=flag("the trained settings to spread, each a variant name of its first seed (its others: NAME-seed-S)",
                  name="--variants"))
def tabulate_seeds(paths: list[str], first_seed: int, count: int, out_stem: str | os.PathLike,
                   config_hash: str, paired: bool = False, names: list[str] = ("distilled",)) -> pd.DataFrame:
    """Read the seeds' convergence scores (or, with ``paired``, one paired-differences table holding every seed) and
    write the spread table (Parquet, CSV, Markdown): one block of rows per name in ``names`` (the main run
    ``distilled``, a departure ``departure-<name>``), its ``variant`` column that name."""
    groups = {name: seed_variants(first_seed, count, name) for name in names}
    if paired:
        differences = pd.concat([read_input_table(path, "paired differences", ["model", "variant", "difference"])
                                 for path in paths], ignore_index=True)
        spreads = [difference_spread(differences, seeds) for seeds in groups.values()]
    else:
        scores = pd.concat([read_input_table(path, "convergence scores", ["model", "variant", "dataset", "s_model"],
                                             made_by="compute-convergence") for path in paths], ignore_index=True)
        spreads = [seed_spread(scores, seeds) for seeds in groups.values()]
    table = pd.concat([spread_table.assign(variant=name)[["variant", *spread_table.columns]]
                       for name, spread_table in zip(groups, spreads)], ignore_index=True)
    write_table(table, out_stem, {"seeds": {"variants": {name: seeds for name, seeds in groups.items()},
                                            "config_hash": config_hash}})
    return table
