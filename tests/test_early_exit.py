"""Early-exit tables and paired base-vs-distilled differences, against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from hsconv.early_exit import kept_layers, shallowest_exits
from hsconv.paired import paired_differences


def curve(model, variant, task, metric, values):
    return pd.DataFrame({"model": model, "variant": variant, "task": task, "metric": metric,
                         "layer": range(len(values)), "value": values})


def test_shallowest_exit_within_each_tolerance_by_hand():
    evaluation = pd.concat([
        curve("m", "base", "lambada", "acc", [0.1, 0.5, 0.86, 0.95, 0.9]),
        curve("m", "base", "wikitext", "word_perplexity", [1e5, 40, 21, 20.1, 20]),
        curve("m", "base", "lambada", "perplexity", [9, 8, 7, 6, 5]),  # not a quality metric of early exit
    ])
    table = shallowest_exits(evaluation, (0.01, 0.05)).set_index(["task", "tolerance"])
    # accuracy 0.9: within 5% means >= 0.855 (layer 2, 0.86), within 1% >= 0.891 (layer 3, 0.95)
    assert table.loc[("lambada", 0.05), "layer"] == 2 and table.loc[("lambada", 0.01), "layer"] == 3
    # perplexity 20: within 5% means <= 21 (layer 2), within 1% <= 20.2 (layer 3)
    assert table.loc[("wikitext", 0.05), "layer"] == 2 and table.loc[("wikitext", 0.01), "layer"] == 3
    assert table.loc[("wikitext", 0.05), "fraction_of_layers"] == 0.5
    assert table.loc[("lambada", 0.01), "value"] == 0.95 and table.loc[("lambada", 0.01), "full_value"] == 0.9
    assert set(table.reset_index()["metric"]) == {"acc", "word_perplexity"}


def test_kept_layers_rounds_and_keeps_at_least_one():
    assert kept_layers(30, 0.75) == 22 and kept_layers(30, 1.0) == 30 and kept_layers(4, 0.01) == 1
    with pytest.raises(ValueError, match="keep_fraction=0 must be in"):
        kept_layers(4, 0)


def documents(variant, acc, loglikelihood, words):
    lambada = pd.DataFrame({"model": "m", "variant": variant, "task": "lambada", "layer": 1,
                            "doc_id": range(len(acc)), "acc": acc, "loglikelihood": -1.0})
    wikitext = pd.DataFrame({"model": "m", "variant": variant, "task": "wikitext", "layer": 1,
                             "doc_id": range(len(words)), "loglikelihood": loglikelihood, "words": words})
    return pd.concat([lambada, wikitext], ignore_index=True)


def test_paired_differences_by_hand():
    base = documents("base", [1, 0, 1, 0, 0], [-30.0, -50.0, -20.0], [10, 12, 8])
    distilled = documents("distilled", [1, 1, 1, 0, 0], [-28.0, -52.0, -19.0], [10, 12, 8])
    table = paired_differences(pd.concat([base, distilled]), samples=500, seed=7).set_index("metric")
    accuracy, perplexity = table.loc["acc"], table.loc["word_perplexity"]
    assert accuracy["baseline_value"] == 0.4 and accuracy["variant_value"] == 0.6
    assert accuracy["difference"] == pytest.approx(0.2)
    assert perplexity["baseline_value"] == pytest.approx(math.exp(100 / 30))
    assert perplexity["variant_value"] == pytest.approx(math.exp(99 / 30))
    # the replicates by an explicit loop over the same draws (one draw per model and task, as documented)
    rng = np.random.default_rng(7)
    draws = rng.integers(0, 5, size=(500, 5))
    gains = [np.mean(np.array([0, 1, 0, 0, 0])[draw]) for draw in draws]
    assert accuracy["lower"] == pytest.approx(np.quantile(gains, 0.025))
    assert accuracy["upper"] == pytest.approx(np.quantile(gains, 0.975))
    assert accuracy["lower"] >= 0  # the only changed document improved: no resample can show a loss
    assert perplexity["lower"] <= perplexity["difference"] <= perplexity["upper"]


def test_identical_variants_differ_by_exactly_zero_and_mismatched_documents_are_refused():
    base = documents("base", [1, 0, 1], [-3.0, -5.0], [2, 3])
    same = documents("distilled", [1, 0, 1], [-3.0, -5.0], [2, 3])
    table = paired_differences(pd.concat([base, same]), samples=100)
    assert (table[["difference", "lower", "upper"]] == 0).all().all()
    fewer = same[~((same["task"] == "lambada") & (same["doc_id"] == 2))]
    with pytest.raises(ValueError, match="m distilled exit 1 on lambada was scored on other documents than base"):
        paired_differences(pd.concat([base, fewer]), samples=10)
