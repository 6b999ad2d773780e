"""The tuned-lens baseline: training lowers held-out KL, and the lens model reads exits through the translators."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_SOURCE, shared_file
from hsconv.models import prepare_model
from hsconv.tuned_lens import TunedLens, train_tuned_lens

lm_eval = pytest.importorskip("lm_eval")

from hsconv.evaluation.lens_model import LogitLensLM  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return prepare_model("tiny", TINY_SOURCE, tmp_path_factory.mktemp("tuned") / "tiny")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """Packed sequences of real text (byte tokens of the tiny model's tokenizer)."""
    text = shared_file("wiki.test.raw").read_bytes()[:20 * 64]
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.int64).reshape(20, 64)
    path = tmp_path_factory.mktemp("tokens") / "tokens.parquet"
    pd.DataFrame({"input_ids": list(ids), "n_tokens": 64}).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def trained(model_dir, tokens, tmp_path_factory):
    root = tmp_path_factory.mktemp("lens")
    table = train_tuned_lens(model_dir, tokens, root / "lens", root / "log.parquet", steps=40, batch_size=4,
                             learning_rate=3e-3, holdout_sequences=4)
    return root / "lens", table


def test_training_lowers_every_layers_held_out_kl_from_the_logit_lens(trained):
    directory, table = trained
    held_out = table[table["stage"] == "held_out"].pivot(index="layer", columns="step", values="kl")
    before, after = held_out[0], held_out[40]
    assert len(held_out) == TINY_SOURCE["num_layers"]  # one translator per layer below the output
    assert (after < 0.9 * before).all(), held_out
    lens = TunedLens.load(directory)
    assert lens.num_layers == TINY_SOURCE["num_layers"]
    assert any(translator.weight.abs().max() > 0 for translator in lens.translators)


def test_exits_read_through_the_translators_as_computed_by_hand(model_dir, trained):
    """Exit l of the tuned lens: log-softmax(head(norm(h_l + A_l h_l + b_l))), here in float64 by hand; the last
    exit stays the model's output, and zero translators give the plain logit lens."""
    directory, _ = trained
    lens_lm = LogitLensLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4,
                          tuned_lens=str(directory))
    plain = LogitLensLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4)
    model, translators = lens_lm.model, TunedLens.load(directory)
    text = shared_file("lambada_test.jsonl").read_text().splitlines()[0][:300]
    context, target = lens_lm.tokenizer.encode(text[:-20]), lens_lm.tokenizer.encode(text[-20:])
    requests = [((text[:-20], text[-20:]), context, target)]
    window = (context + target)[-(lens_lm.max_length + 1):][:-1]
    with torch.no_grad():
        hidden = model(torch.tensor([window]), output_hidden_states=True).hidden_states
    positions = range(len(window) - len(target), len(window))
    for layer in range(lens_lm.num_layers + 1):
        lens_lm.exit_layer = plain.exit_layer = layer
        (got, _), = lens_lm._loglikelihood_tokens(requests)
        (lens_value, _), = plain._loglikelihood_tokens(requests)
        if layer == lens_lm.num_layers:
            assert got == lens_value  # the output has no translator
            continue
        state = hidden[layer][0].double()
        translator = translators.translators[layer]
        translated = state + state @ translator.weight.double().T + translator.bias.double()
        norm = model.model.norm
        variance = translated.pow(2).mean(-1, keepdim=True)
        normed = translated * torch.rsqrt(variance + norm.variance_epsilon) * norm.weight.double()
        logprob = (normed @ model.lm_head.weight.double().T).log_softmax(-1)
        expected = sum(logprob[p, t].item() for p, t in zip(positions, target))
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert got != pytest.approx(lens_value, rel=1e-6)  # the trained translators change the reading


def test_a_tuned_lens_for_another_depth_is_refused(model_dir, tmp_path):
    TunedLens(TINY_SOURCE["num_layers"] + 1, TINY_SOURCE["hidden_size"]).save(tmp_path / "lens", {})
    with pytest.raises(ValueError, match="has 4 translators; the model has 3 layers"):
        LogitLensLM(pretrained=str(model_dir), dtype="float32", device="cpu", tuned_lens=str(tmp_path / "lens"))
