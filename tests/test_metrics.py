"""D_l and S_model against hand computations on constructed examples."""

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from hsconv.errors import InputError
from hsconv.hidden_states import movement
from hsconv.metrics import (
    bootstrap_layer_means,
    convergence_score,
    paired_convergence_differences,
    summarise_movement,
)


def test_movement_of_hand_picked_vectors():
    a = torch.tensor([1.0, 0.0])
    assert movement(a, torch.tensor([2.0, 0.0])).item() == pytest.approx(0.0)  # same direction
    assert movement(a, torch.tensor([0.0, 3.0])).item() == pytest.approx(0.5)  # orthogonal
    assert movement(a, torch.tensor([-1.0, 0.0])).item() == pytest.approx(1.0)  # opposite
    assert movement(a, torch.tensor([1.0, 1.0])).item() == pytest.approx((1 - 2 ** -0.5) / 2)


def test_convergence_score_by_hand():
    # steps +0.2, -0.1, +0.2: rises 0.4 of total change 0.5
    assert convergence_score([0.1, 0.3, 0.2, 0.4]) == pytest.approx(1 - 0.4 / 0.5)
    assert convergence_score([0.5, 0.4, 0.1, 0.05]) == pytest.approx(1.0)
    assert convergence_score([0.1, 0.2, 0.3]) == pytest.approx(0.0)
    assert convergence_score([0.2, 0.2, 0.2]) == pytest.approx(1.0)
    # the paper's pathology: flat, then a jump at the last layer
    assert convergence_score([0.3, 0.1, 0.1, 0.1, 0.5]) == pytest.approx(1 - 0.4 / 0.6)


def test_convergence_score_is_vectorised_over_rows():
    rows = np.array([[0.1, 0.3, 0.2, 0.4], [0.5, 0.4, 0.1, 0.05]])
    assert np.allclose(convergence_score(rows), [0.2, 1.0])


def _token_table(values_by_document: dict[int, list[list[float]]]) -> pd.DataFrame:
    rows = []
    for document, tokens in values_by_document.items():
        for position, per_layer in enumerate(tokens):
            for layer, value in enumerate(per_layer, start=1):
                last = layer == len(per_layer)
                rows.append(dict(document=document, segment=0, position=position, token_id=0, layer=layer,
                                 movement_hf=value, movement_pre_norm=value * (2 if last else 1),
                                 norm_floor=value / 4 if last else float("nan")))
    return pd.DataFrame(rows)


def test_summary_is_the_token_weighted_mean():
    # document 0 has two tokens, document 1 one: the mean is over tokens, not over documents
    tokens = _token_table({0: [[0.4, 0.1, 0.3], [0.2, 0.1, 0.1]], 1: [[0.6, 0.4, 0.2]]})
    layers, scores = summarise_movement(tokens, quantiles=(0.5,), bootstrap_samples=200, seed=1)
    hf = layers[layers.final_norm == "hf"].set_index("layer")
    assert hf.loc[[1, 2, 3], "movement_mean"].tolist() == pytest.approx([0.4, 0.2, 0.2])
    assert hf["n_tokens"].unique().tolist() == [3] and hf["n_documents"].unique().tolist() == [2]
    assert hf.loc[1, "q50"] == pytest.approx(0.4)
    assert (hf["ci_low"] <= hf["movement_mean"] + 1e-12).all() and (hf["movement_mean"] <= hf["ci_high"] + 1e-12).all()
    pre = layers[layers.final_norm == "pre_norm"].set_index("layer")
    assert pre.loc[3, "movement_mean"] == pytest.approx(0.4)
    score = scores.set_index("final_norm")
    # hf: D = 0.4, 0.2, 0.2 never rises
    assert score.loc["hf", "s_model"] == pytest.approx(1.0)
    assert score.loc["hf", "last_layer_ratio"] == pytest.approx(1.0)
    # pre_norm: D = 0.4, 0.2, 0.4: rises 0.2 of total 0.4
    assert score.loc["pre_norm", "s_model"] == pytest.approx(0.5)
    assert score.loc["pre_norm", "last_layer_ratio"] == pytest.approx(2.0)
    # the largest rise of D between adjacent layers, and where: none in hf (−0.2, 0: the larger is 0 at layer 3),
    # 0.2 at layer 3 in pre_norm
    assert (score.loc["hf", "largest_rise"], score.loc["hf", "largest_rise_layer"]) == (pytest.approx(0.0), 3)
    assert (score.loc["pre_norm", "largest_rise"], score.loc["pre_norm", "largest_rise_layer"]) == \
        (pytest.approx(0.2), 3)
    # The norm floor beside D_L: the token mean of layer L's floor ((0.3 + 0.1 + 0.2) / 4 / 3), in both tables.
    assert score["norm_floor"].tolist() == pytest.approx([0.05, 0.05])
    assert hf.loc[3, "norm_floor"] == pytest.approx(0.05) and hf.loc[[1, 2], "norm_floor"].isna().all()


def test_bootstrap_resamples_whole_documents():
    counts = np.array([1.0, 3.0])
    sums = np.array([[1.0], [0.0]])  # document 0 mean 1, document 1 mean 0
    replicates = bootstrap_layer_means(counts, sums, samples=2000, seed=0)
    # only three outcomes are possible: both doc 0 (1.0), both doc 1 (0.0), one each (1/4)
    assert set(np.round(np.unique(replicates), 6)) <= {0.0, 0.25, 1.0}
    assert np.mean(replicates == 0.25) == pytest.approx(0.5, abs=0.05)


def _score_by_hand(movement):  # the paper's Definition 2 written out again, for the paired test
    steps = [b - a for a, b in itertools.pairwise(movement)]
    return 1 - sum(max(step, 0) for step in steps) / sum(abs(step) for step in steps)


def test_paired_score_difference_resamples_the_same_documents_for_both():
    """Two one-token documents: a paired draw is {0, 0}, {1, 1} (¼ each) or one of each (½), the same documents for
    base and variant, so S(variant) − S(base) takes three values, and the 95% interval runs from the least to the
    greatest of them. An unpaired draw would mix e.g. base {0, 0} with variant {1, 1}, a fourth value."""
    base = {0: [[0.4, 0.2, 0.3]], 1: [[0.5, 0.3, 0.1]]}
    variant = {0: [[0.4, 0.2, 0.1]], 1: [[0.5, 0.3, 0.2]]}
    table = paired_convergence_differences(_token_table(base), _token_table(variant), samples=1000, seed=0)
    row = table.set_index("final_norm").loc["hf"]

    def mean(documents, chosen):
        return [sum(documents[d][0][layer] for d in chosen) / len(chosen) for layer in range(3)]

    outcomes = [_score_by_hand(mean(variant, chosen)) - _score_by_hand(mean(base, chosen))
                for chosen in ([0, 0], [1, 1], [0, 1])]
    assert row["s_model_difference"] == pytest.approx(outcomes[2])
    assert row["s_model_base"] == pytest.approx(_score_by_hand(mean(base, [0, 1])))
    assert row["s_model_difference_low"] == pytest.approx(min(outcomes))
    assert row["s_model_difference_high"] == pytest.approx(max(outcomes))
    ratios = [mean(variant, chosen)[2] / mean(variant, chosen)[1] - mean(base, chosen)[2] / mean(base, chosen)[1]
              for chosen in ([0, 0], [1, 1], [0, 1])]
    assert row["last_layer_ratio_difference"] == pytest.approx(ratios[2])
    assert (row["last_layer_ratio_difference_low"], row["last_layer_ratio_difference_high"]) == pytest.approx(
        (min(ratios), max(ratios)))
    assert set(table["final_norm"]) == {"hf", "pre_norm"} and (table["n_documents"] == 2).all()


def test_paired_difference_of_a_table_with_itself_is_exactly_zero_and_other_documents_are_refused():
    tokens = _token_table({0: [[0.4, 0.1, 0.3], [0.2, 0.1, 0.1]], 1: [[0.6, 0.4, 0.2]], 2: [[0.3, 0.2, 0.5]]})
    same = paired_convergence_differences(tokens, tokens.copy(), samples=200)
    for name in ("s_model", "last_layer_ratio"):
        assert (same[[f"{name}_difference", f"{name}_difference_low", f"{name}_difference_high"]] == 0).all().all()
    with pytest.raises(InputError, match="different documents or tokens"):
        paired_convergence_differences(tokens, tokens[tokens["document"] != 2])
    with pytest.raises(InputError, match="no movement under the pre_norm convention"):
        paired_convergence_differences(tokens, tokens.drop(columns="movement_pre_norm"))
