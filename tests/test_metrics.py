"""D_l and S_model against hand computations on constructed examples."""

import numpy as np
import pandas as pd
import pytest
import torch

from hsconv.hidden_states import movement
from hsconv.metrics import bootstrap_layer_means, convergence_score, summarise_movement


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
