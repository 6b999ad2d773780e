"""The spread of the main distillation over seeds (hsconv.seeds), against values worked out by hand."""

from __future__ import annotations

import pandas as pd
import pytest

from hsconv.errors import InputError
from hsconv.paired import paired_differences
from hsconv.seeds import difference_spread, seed_spread, seed_variants, tabulate_seeds


def _scores(values: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """Convergence-table rows (one model, data set and convention) with S_model and the last-layer ratio given."""
    return pd.DataFrame([{"model": "m", "variant": variant, "dataset": "lambada", "final_norm": "pre_norm",
                          "s_model": s, "s_model_ci_low": s - 0.01, "s_model_ci_high": s + 0.02,
                          "last_layer_ratio": ratio, "last_layer_movement": ratio / 10}
                         for variant, (s, ratio) in values.items()])


def test_seed_variants_name_the_first_seed_distilled():
    assert seed_variants(4, 3) == {"distilled": 4, "distilled-seed-5": 5, "distilled-seed-6": 6}


def test_seed_variants_of_a_departure_carry_its_name():
    assert seed_variants(0, 2, "departure-rise") == {"departure-rise": 0, "departure-rise-seed-1": 1}


def test_the_spread_table_has_a_block_per_trained_setting(tmp_path):
    """tabulate-seeds --variants distilled departure-rise: each setting's own seeds spread, named by its first."""
    from hsconv.io import write_table

    scores = _scores({"distilled": (0.80, 2.0), "distilled-seed-1": (0.84, 3.0),
                      "departure-rise": (0.90, 1.0), "departure-rise-seed-1": (0.86, 1.5)})
    path = tmp_path / "scores"
    write_table(scores, path, {"compute-convergence": {}})
    table = tabulate_seeds([str(path.with_suffix(".parquet"))], 0, 2, tmp_path / "spread", "hash",
                           names=["distilled", "departure-rise"]).set_index("variant")
    assert table.loc["distilled", "s_model_mean"] == pytest.approx(0.82)
    assert table.loc["departure-rise", "s_model_mean"] == pytest.approx(0.88)
    assert table.loc["departure-rise", "s_model_std"] == pytest.approx(0.04 / 2 ** 0.5)
    assert table.loc["departure-rise", "s_model_first"] == 0.90


def test_spread_is_the_sample_standard_deviation_over_seeds_beside_the_first_runs_interval():
    scores = _scores({"distilled": (0.80, 2.0), "distilled-seed-1": (0.84, 3.0), "distilled-seed-2": (0.86, 4.0),
                      "base": (0.70, 5.0)})  # base is not a seed: left out
    row = seed_spread(scores, seed_variants(0, 3)).iloc[0]
    # mean 0.8333…; deviations −0.0333, 0.0067, 0.0267; Σ squares 0.0018667 / (3 − 1) → std 0.030551
    assert row["s_model_mean"] == pytest.approx(2.5 / 3)
    assert row["s_model_std"] == pytest.approx(0.0305505, abs=1e-7)
    assert (row["s_model_min"], row["s_model_max"]) == pytest.approx((0.80, 0.86))
    assert row["last_layer_ratio_std"] == pytest.approx(1.0)  # 2, 3, 4
    assert row["n_seeds"] == 3 and row["seeds"] == "0 1 2"
    assert (row["s_model_first"], row["s_model_first_ci_low"], row["s_model_first_ci_high"]) == pytest.approx(
        (0.80, 0.79, 0.82))


def test_a_missing_seed_is_named():
    with pytest.raises(InputError, match="distilled-seed-2"):
        seed_spread(_scores({"distilled": (0.8, 2.0), "distilled-seed-1": (0.84, 3.0)}), seed_variants(0, 3))


def test_a_partly_missing_seed_is_named():
    scores = pd.concat([_scores({"distilled": (0.8, 2.0), "distilled-seed-1": (0.84, 3.0)}),
                        _scores({"distilled": (0.7, 2.0)}).assign(dataset="wikitext")])
    with pytest.raises(InputError, match="wikitext.*distilled-seed-1"):
        seed_spread(scores, seed_variants(0, 2))


def test_output_difference_spread_over_seeds_from_a_paired_table():
    """Four LAMBADA passages at the output (exit 4); base gets 2 right. Seed 0 gets 3 right (+25 points), seed 1
    gets 1 (−25), seed 2 gets 2 (0): the differences' mean is 0 and their sample standard deviation 0.25."""
    outcomes = {"base": [1, 1, 0, 0], "distilled": [1, 1, 1, 0], "distilled-seed-1": [1, 0, 0, 0],
                "distilled-seed-2": [0, 1, 1, 0]}
    documents = pd.DataFrame([{"model": "m", "variant": variant, "task": "lambada_full", "kind": "lambada",
                               "layer": 4, "doc_id": doc, "acc": float(acc)}
                              for variant, accs in outcomes.items() for doc, acc in enumerate(accs)])
    paired = paired_differences(documents, samples=200, seed=0)
    row = difference_spread(paired, seed_variants(0, 3)).iloc[0]
    assert (row["task"], row["kind"], row["metric"], row["layer"]) == ("lambada_full", "lambada", "acc", 4)
    assert row["baseline_value"] == 0.5 and row["n_documents"] == 4
    assert row["difference_mean"] == pytest.approx(0.0)
    assert row["difference_std"] == pytest.approx(0.25)
    assert (row["difference_min"], row["difference_max"]) == (-0.25, 0.25)
    assert row["variant_value_mean"] == pytest.approx(0.5)
    first = paired[paired["variant"] == "distilled"].iloc[0]
    assert (row["difference_first"], row["difference_first_low"], row["difference_first_high"]) == (
        0.25, first["lower"], first["upper"])
