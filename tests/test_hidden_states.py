"""The dump stage against an independent float64 recomputation from raw hidden states."""

import numpy as np
import pytest
import pandas as pd
import torch

from hsconv.hidden_states import ContextLengthError, segment_documents, token_movement
from hsconv.metrics import convergence_score, summarise_movement

TEXTS = ["The curious cat climbed up the tall tree.",
         "A much longer neighbour sentence, which forces padding on the short ones in its batch, and then some.",
         "Short."]


def reference_movement(loaded, text: str) -> dict[str, np.ndarray]:
    """Raw hidden states of one text alone, straight from HF, and numpy float64 cosines (tokens × layers)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    captured = {}
    hook = model.model.layers[-1].register_forward_hook(lambda m, i, o: captured.update(last=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        states = [s[0].double().numpy() for s in model(ids, output_hidden_states=True).hidden_states]
    hook.remove()
    pre_norm_last = captured["last"][0].double().numpy()

    def d(a, b):
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        return (1 - cos) / 2

    hf = np.stack([d(states[l - 1], states[l]) for l in range(1, len(states))], axis=-1)
    pre = hf.copy()
    pre[:, -1] = d(states[-2], pre_norm_last)
    return {"hf": hf, "pre_norm": pre}


def _per_token(frame, document, column):
    rows = frame[frame.document == document].sort_values(["position", "layer"])
    return rows[column].to_numpy().reshape(-1, rows.layer.nunique())


def test_matches_float64_reference_and_ignores_padding(tiny_model):
    frame, stats = token_movement(tiny_model, [0, 1, 2], TEXTS, batch_size=3)
    assert stats["num_layers"] == tiny_model.num_layers
    for document, text in enumerate(TEXTS):
        reference = reference_movement(tiny_model, text)
        for convention in ("hf", "pre_norm"):
            np.testing.assert_allclose(_per_token(frame, document, f"movement_{convention}"), reference[convention],
                                       atol=1e-6, rtol=0)
    # the conventions agree below the last layer and differ at it (the tiny model has random norm gains)
    below = frame.layer < tiny_model.num_layers
    assert np.array_equal(frame.loc[below, "movement_hf"], frame.loc[below, "movement_pre_norm"])
    assert not np.allclose(frame.loc[~below, "movement_hf"], frame.loc[~below, "movement_pre_norm"])


def test_padding_does_not_change_any_number(tiny_model):
    together, _ = token_movement(tiny_model, [0, 1, 2], TEXTS, batch_size=3)
    for document, text in enumerate(TEXTS):
        alone, _ = token_movement(tiny_model, [document], [text], batch_size=1)
        mine = together[together.document == document].reset_index(drop=True)
        assert mine[["position", "layer", "token_id"]].equals(alone[["position", "layer", "token_id"]])
        np.testing.assert_allclose(mine.movement_hf, alone.movement_hf, atol=1e-6, rtol=0)
        np.testing.assert_allclose(mine.movement_pre_norm, alone.movement_pre_norm, atol=1e-6, rtol=0)


def test_s_model_matches_reference(tiny_model):
    frame, _ = token_movement(tiny_model, [0, 1, 2], TEXTS, batch_size=2)
    _, scores = summarise_movement(frame, bootstrap_samples=50)
    all_tokens = np.concatenate([reference_movement(tiny_model, t)["hf"] for t in TEXTS])
    expected = convergence_score(all_tokens.mean(axis=0))
    assert scores.set_index("final_norm").loc["hf", "s_model"] == pytest.approx(expected, abs=1e-6)


def test_overflow_policies(tiny_model):
    tokenizer = tiny_model.tokenizer
    text = "x" * 50  # 50 byte-level tokens
    with pytest.raises(ContextLengthError, match="document 7 has 50 tokens"):
        segment_documents(tokenizer, [7], [text], max_tokens=20, overflow="error")
    truncated, stats = segment_documents(tokenizer, [7], [text], max_tokens=20, overflow="truncate")
    assert [len(s.token_ids) for s in truncated] == [20] and stats["tokens_dropped_by_truncation"] == 30
    split, _ = segment_documents(tokenizer, [7], [text], max_tokens=20, overflow="split")
    assert [len(s.token_ids) for s in split] == [20, 20, 10] and [s.segment for s in split] == [0, 1, 2]


def test_max_tokens_beyond_context_is_refused(tiny_model):
    with pytest.raises(ContextLengthError, match="exceeds the context length"):
        token_movement(tiny_model, [0], ["hello"], max_tokens=tiny_model.context_length + 1)


def test_text_longer_than_context_is_refused_by_default(tiny_model):
    with pytest.raises(ContextLengthError, match="more than max_tokens=128"):
        token_movement(tiny_model, [0], ["y" * 200])


def test_non_finite_hidden_state_stops_the_stage(tiny_model):
    import copy

    broken = copy.deepcopy(tiny_model)
    with torch.no_grad():
        broken.model.model.layers[1].mlp.down_proj.weight.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite hidden state at layer 2 in batch 1 .*float32.*weights"):
        token_movement(broken, [0], ["hello there"])


def test_float16_overflow_is_named_with_the_layer_and_a_wider_type(tiny_model_dir):
    """A residual stream that grows past float16's range (as in large models' late layers) becomes inf in float16
    but stays finite in float32: the float16 run stops at the first overflowing layer and suggests bfloat16."""
    from hsconv.models import load_model

    results = {}
    for dtype in ("float32", "float16"):
        loaded = load_model(tiny_model_dir, dtype=dtype)
        mlp = loaded.model.model.layers[1].mlp
        with torch.no_grad():
            # The MLP's output grows as the product: about 4e5 here, past float16's 65,504, while every weight
            # (|w| < 1e3) stays representable in float16.
            mlp.up_proj.weight.mul_(1e4)
            mlp.down_proj.weight.mul_(1e4)
        try:
            results[dtype] = token_movement(loaded, [0], ["hello there, a longer text"])[0]
        except FloatingPointError as error:
            results[dtype] = str(error)
    assert isinstance(results["float32"], pd.DataFrame) and results["float32"]["movement_hf"].notna().all()
    assert "layer 2" in results["float16"] and "(float16)" in results["float16"]
    assert "bfloat16 or float32" in results["float16"]
