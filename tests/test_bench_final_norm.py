"""studies.final_norm_account on a tiny model: its decomposition of the norm floor against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studies.final_norm_account import account, cosine_terms
from hsconv.hidden_states import token_movement
from hsconv.models import load_model, prepare_model

from conftest import TINY_SOURCE

TEXTS = ["The river rose all night and the town slept.", "A small bird sat quietly at the top of the tree."]


def test_the_terms_sum_to_the_cosine():
    generator = torch.Generator().manual_seed(0)
    h, gain = torch.randn(7, 16, generator=generator, dtype=torch.float64), torch.randn(16, generator=generator,
                                                                                          dtype=torch.float64)
    normed = gain * h / h.square().mean(-1, keepdim=True).sqrt()
    expected = torch.nn.functional.cosine_similarity(h, normed, dim=-1)
    torch.testing.assert_close(cosine_terms(h, gain).sum(-1), expected, rtol=0, atol=1e-12)


def test_the_floor_is_the_dumps_norm_floor_and_the_flipped_gain_is_folded(tmp_path):
    model_dir = prepare_model("tiny", TINY_SOURCE, tmp_path / "tiny")
    row, dimensions, layers = account("tiny", str(model_dir), TEXTS, None)
    loaded = load_model(model_dir)
    frame, _ = token_movement(loaded, list(range(len(TEXTS))), TEXTS, batch_size=1)
    last = frame[(frame["layer"] == loaded.num_layers) & (frame["position"] >= 1)]  # each text's first is left out
    assert row["tokens"] == len(last)
    assert row["norm_floor"] == pytest.approx(last["norm_floor"].mean(), abs=1e-6)
    assert row["last_layer_movement_hf"] == pytest.approx(last["movement_hf"].mean(), abs=1e-6)
    assert row["last_layer_movement_pre_norm"] == pytest.approx(last["movement_pre_norm"].mean(), abs=1e-6)
    assert dimensions["cosine_term"].sum() == pytest.approx(row["cosine"], abs=1e-12)
    assert row["dimension"] == int(dimensions["share_of_squared_norm"].idxmax())
    assert len(layers) == loaded.num_layers and layers["share_of_squared_norm"].between(0, 1).all()
    # holding the chosen dimension of the normalised state at its mean changes the logits: a KL above zero
    assert 0 <= row["top1_unchanged_when_held"] <= 1 and row["kl_when_held"] > 0
    if row["gain"] > 0:  # making a positive gain positive changes nothing
        assert row["norm_floor_gain_made_positive"] == pytest.approx(row["norm_floor"], abs=1e-12)
    assert np.isfinite(row["norm_floor_without_dimension"])
