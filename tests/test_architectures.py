"""Every supported model family on a tiny random model: the hidden-state dump with its pre-norm capture, the logit
lens at every exit (the last one equal to the model's own logits, softcap and all, and to stock lm-eval), one
distillation step and one tuned-lens step. docs/guide.md's table of families is what these tests check.

Each reference here is computed independently of hsconv's readout: the last block's output from a hook on the block
itself, the model's own ``forward`` logits, and Gemma's softcap written out from the config.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_SOURCE, shared_file
from hsconv.architectures import FAMILIES, UnsupportedArchitectureError, family_of, model_type_of_gguf
from hsconv.distill.objective import LossSettings, SelfDistillation
from hsconv.hidden_states import token_movement
from hsconv.models import load_model, prepare_model
from hsconv.tuned_lens import train_tuned_lens

# A cap small enough to bend the tiny models' logits (|z| ≈ 0.5), so that a lens without it would fail the tests.
SOFTCAP = 0.5
# Untied heads, so that the head's own gradient is checked (the tied case is the default tiny model's, elsewhere).
SOURCE = {**TINY_SOURCE, "max_position_embeddings": 256, "tie_word_embeddings": False,
          "final_logit_softcapping": SOFTCAP}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tmp_path_factory):
    architecture = request.param
    return architecture, prepare_model(architecture, {**SOURCE, "architecture": architecture},
                                       tmp_path_factory.mktemp("families") / architecture)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """Packed rows of real text, as byte tokens (every tiny model shares the byte-level tokenizer)."""
    text = shared_file("wiki.test.raw").read_bytes()[:12 * 64]
    path = tmp_path_factory.mktemp("tokens") / "tokens.parquet"
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.int64).reshape(12, 64)
    pd.DataFrame({"input_ids": list(ids), "n_tokens": 64}).to_parquet(path)
    return path


def own_forward(model, input_ids):
    """The model's own logits (its forward, softcap included) and its hidden states."""
    with torch.no_grad():
        outputs = model(input_ids, output_hidden_states=True)
    return outputs.logits.double(), outputs.hidden_states


@torch.no_grad()
def lens_logits_by_hand(model, hidden: torch.Tensor) -> torch.Tensor:
    """softcap(head(norm(h))), the cap written out from the config."""
    decoder = model.get_decoder()
    norm = getattr(decoder, FAMILIES[model.config.model_type].final_norm)
    logits = model.get_output_embeddings()(norm(hidden)).double()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


def test_dump_captures_the_last_blocks_output_before_the_final_norm(family_model):
    architecture, model_dir = family_model
    loaded = load_model(model_dir)
    texts = ["The river rose all night.", "Rain fell, and the town slept under its roofs."]
    frame, _ = token_movement(loaded, [0, 1], texts, batch_size=2)
    model, decoder = loaded.model, loaded.model.get_decoder()
    blocks = getattr(decoder, FAMILIES[architecture].layers)
    for document, text in enumerate(texts):
        ids = torch.tensor([loaded.tokenizer(text)["input_ids"]])
        captured = {}
        hook = blocks[-1].register_forward_hook(lambda module, args, output: captured.update(
            last=output[0] if isinstance(output, tuple) else output))
        try:
            _, hidden = own_forward(model, ids)
        finally:
            hook.remove()
        last, previous = captured["last"][0].double(), hidden[-2][0].double()
        cosine = torch.nn.functional.cosine_similarity(previous, last, dim=-1)
        rows = frame[(frame["document"] == document) & (frame["layer"] == loaded.num_layers)]
        np.testing.assert_allclose(rows["movement_pre_norm"], ((1 - cosine) / 2).numpy(), rtol=1e-5, atol=1e-7)
        with torch.no_grad():
            normed = getattr(decoder, FAMILIES[architecture].final_norm)(captured["last"])[0].double()
        cosine = torch.nn.functional.cosine_similarity(previous, normed, dim=-1)
        np.testing.assert_allclose(rows["movement_hf"], ((1 - cosine) / 2).numpy(), rtol=1e-5, atol=1e-7)
        # The norm floor: D(h_{L−1}, FinalNorm(h_{L−1})), at layer L only.
        with torch.no_grad():
            normed_previous = getattr(decoder, FAMILIES[architecture].final_norm)(hidden[-2])[0].double()
        cosine = torch.nn.functional.cosine_similarity(previous, normed_previous, dim=-1)
        np.testing.assert_allclose(rows["norm_floor"], ((1 - cosine) / 2).numpy(), rtol=1e-5, atol=1e-7)
        assert frame.loc[frame["layer"] < loaded.num_layers, "norm_floor"].isna().all()


def test_every_exit_of_the_logit_lens_and_the_last_equals_the_models_own_logits(family_model):
    from hsconv.evaluation.lens_model import LogitLensLM

    architecture, model_dir = family_model
    lens = LogitLensLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=2)
    model, tokenizer = lens.model, lens.tokenizer
    pairs = [("The river rose all", " night"), ("Rain fell on the", " town")]
    requests = [((context, target), tokenizer.encode(context), tokenizer.encode(target)) for context, target in pairs]
    for layer in range(lens.num_layers + 1):
        lens.exit_layer = layer
        for (_, context, target), (logprob, greedy) in zip(requests, lens._loglikelihood_tokens(requests)):
            window = torch.tensor([(context + target)[:-1]])
            own, hidden = own_forward(model, window)
            logits = own if layer == lens.num_layers else lens_logits_by_hand(model, hidden[layer])
            log_probs = logits.log_softmax(-1)[0]
            positions = range(len(context) - 1, len(context) + len(target) - 1)
            expected = sum(log_probs[position, token].item() for position, token in zip(positions, target))
            assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-5), (architecture, layer)
            assert greedy == all(log_probs[p].argmax().item() == t for p, t in zip(positions, target))
    if FAMILIES[architecture].softcap:  # the cap binds: the uncapped head would give other numbers
        with torch.no_grad():
            raw = model.get_output_embeddings()(lens.readout.final_norm(torch.randn(4, model.config.hidden_size)))
        assert lens.readout.softcap == SOFTCAP and raw.abs().max() > 0.3
        assert not torch.allclose(raw, SOFTCAP * torch.tanh(raw / SOFTCAP), atol=1e-3)


def test_one_distillation_step_matches_autograd_and_moves_the_student(family_model):
    """The fused loss (softcap's slope included) equals the autograd reference in float64, gradients too."""
    architecture, model_dir = family_model
    # Without dropout (GPT-2's configs have 0.1), so that both implementations see the same forward pass.
    student = load_model(model_dir, dtype="float64").model.eval()
    target = load_model(model_dir, dtype="float64").model
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    # Perturb the student so that KL and its gradient are not zero at the start.
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    results = {}
    for implementation in ("fused", "reference"):
        student.zero_grad()
        settings = LossSettings(alpha=0.5, k=0.4, implementation=implementation, chunk_tokens=7)
        terms = SelfDistillation(student, target, settings)(ids, mask)
        terms.total.backward()
        results[implementation] = (terms, {name: p.grad.clone() for name, p in student.named_parameters()
                                           if p.grad is not None})
    (fused, fused_grads), (reference, reference_grads) = results["fused"], results["reference"]
    torch.testing.assert_close(fused.total, reference.total.to(fused.total.dtype), rtol=1e-9, atol=1e-12)
    assert fused_grads.keys() == reference_grads.keys() and len(fused_grads) > 0
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], reference_grads[name], rtol=1e-7, atol=1e-10, msg=name)
    # A short step along the gradient (its length fixed, as ζ2's scale differs by orders across families).
    norm = torch.sqrt(sum(grad.square().sum() for grad in fused_grads.values()))
    torch.optim.SGD(student.parameters(), lr=float(1e-3 / norm)).step()
    after = SelfDistillation(student, target, LossSettings(alpha=0.5, k=0.4))(ids, mask)
    assert torch.isfinite(after.total) and after.total < fused.total


def test_one_tuned_lens_step(family_model, tokens, tmp_path):
    architecture, model_dir = family_model
    table = train_tuned_lens(model_dir, tokens, tmp_path / "lens", tmp_path / "log.parquet", steps=1, batch_size=4,
                             holdout_sequences=4)
    held_out = table[table["stage"] == "held_out"]
    assert len(held_out) == 2 * TINY_SOURCE["num_layers"] and np.isfinite(held_out["kl"]).all()
    assert (tmp_path / "lens").is_dir()


@pytest.mark.heavy
def test_last_exit_equals_stock_lm_eval_in_every_family(family_model, tmp_path):
    """Stock HFLM and the logit lens's last exit through lm-eval's own tasks: the same numbers, request by request."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from hsconv.evaluation.lens_model import LogitLensLM
    from hsconv.evaluation.per_layer import stock_tasks, write_task_data
    from hsconv.texts import prepare_texts

    _, model_dir = family_model
    prepare_texts("lambada", "lambada", tmp_path / "lambada.parquet", path=str(shared_file("lambada_test.jsonl")),
                  subset_size=12)
    prepare_texts("wikitext", "wikitext", tmp_path / "wikitext.parquet", path=str(shared_file("wiki.test.raw")),
                  subset_size=1)
    files = {kind: (kind, write_task_data(tmp_path / f"{kind}.parquet", kind, tmp_path / f"{kind}.jsonl"))
             for kind in ("lambada", "wikitext")}
    task_dict = stock_tasks(files, tmp_path)[0]

    def run(lm):
        return lm_eval.evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=0, log_samples=True,
                                verbosity="WARNING")

    stock = run(HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4))
    ours = run(LogitLensLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4))
    assert sorted(ours["samples"]) == ["lambada_openai", "wikitext"] and all(ours["samples"].values())
    for task in ours["samples"]:
        for mine, theirs in zip(ours["samples"][task], stock["samples"][task], strict=True):
            for (a, *flag_a), (b, *flag_b) in zip(mine["resps"], theirs["resps"]):
                a, b = (a[0], b[0]) if isinstance(a, (tuple, list)) else (a, b)
                assert a == pytest.approx(b, rel=1e-6, abs=1e-6), task
                assert flag_a == flag_b, task


@pytest.mark.heavy
@pytest.mark.parametrize("tied", [False, True])
def test_folding_the_final_norm_gain_keeps_every_exits_logits(family_model, tmp_path, tied):
    """The folded model (gain in the head, untied) gives every exit the same logits; with an RMSNorm its hf h_L is
    a positive multiple of the pre-norm h_L, so the two conventions' D_L coincide."""
    from hsconv.readout import decoder_states, lens_states, readout

    architecture, model_dir = family_model
    source = {**SOURCE, "architecture": architecture, "tie_word_embeddings": tied}
    original = load_model(prepare_model(architecture, source, tmp_path / "original"))
    folded = load_model(prepare_model(architecture, source, tmp_path / "folded", fold_final_norm_gain=True))
    record = folded.manifest["reparametrisation"]
    assert record["untied_head"] is tied and folded.model.config.tie_word_embeddings is False
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before, after = (decoder_states(loaded.model, ids, None) for loaded in (original, folded))
        for state_before, state_after in zip(lens_states(before), lens_states(after), strict=True):
            torch.testing.assert_close(readout(folded.model)(state_after), readout(original.model)(state_before),
                                       rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded.model(ids).logits, original.model(ids).logits, rtol=1e-5, atol=1e-5)
    norm_weight = readout(original.model).final_norm.weight
    assert not torch.allclose(norm_weight, torch.full_like(norm_weight, norm_weight[0].item()))  # a real gain
    frame, _ = token_movement(folded, [0], ["The river rose all night."], batch_size=1)
    last = frame[frame["layer"] == folded.num_layers]
    if getattr(readout(folded.model).final_norm, "bias", None) is None:  # RMSNorm: a pure rescaling now
        np.testing.assert_allclose(last["movement_hf"], last["movement_pre_norm"], rtol=1e-5, atol=1e-7)
    else:  # LayerNorm still centres its input
        assert not np.allclose(last["movement_hf"], last["movement_pre_norm"])


@pytest.mark.heavy
def test_one_deepspeed_distillation_step_in_every_family(family_model, tokens, tmp_path):
    architecture, model_dir = family_model
    settings = {"batch_size": 4, "micro_batch_size": 4, "max_steps": 1, "warmup_steps": 0, "zero_stage": 2}
    outputs = {"out": tmp_path / "model", "log-out": tmp_path / "steps.parquet",
               "layers-out": tmp_path / "layers.parquet", "checkpoints": tmp_path / "checkpoints"}
    command = [sys.executable, "-m", "hsconv.cli", "distill", "--model-dir", str(model_dir), "--tokens",
               str(tokens), "--settings", json.dumps(settings), "--name", architecture]
    for key, path in outputs.items():
        command += [f"--{key}", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = pd.read_parquet(outputs["log-out"])
    assert steps["step"].tolist() == [1] and np.isfinite(steps[["zeta", "zeta1", "zeta2"]].to_numpy()).all()
    assert load_model(outputs["out"]).model.config.model_type == architecture


def test_an_unsupported_architecture_is_refused_by_name(tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match="'mamba' is not supported.*llama, qwen2"):
        family_of("mamba")
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "cohere"}))
    from hsconv.models import check_source

    with pytest.raises(UnsupportedArchitectureError, match="'cohere' is not supported") as error:
        check_source("m", {"kind": "local", "path": str(model_dir)})
    assert str(model_dir / "config.json") in str(error.value)
    with pytest.raises(UnsupportedArchitectureError, match="'cohere'"):
        load_model(model_dir)


def test_the_gguf_architecture_is_read_from_its_header(tmp_path):
    """A GGUF file written by the gguf package (the format's own writer): the architecture is found after other keys
    and an array, and mapped to the HF model_type."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), arch="gptneox")
    writer.add_uint32("aaa.first", 7)
    writer.add_array("aaa.list", ["x", "yy"])
    writer.add_array("aaa.numbers", [1, 2, 3])
    keys = writer.kv_data[0]
    keys["general.architecture"] = keys.pop("general.architecture")  # written last
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert model_type_of_gguf(path) == "gpt_neox"


def test_the_schema_lists_every_supported_family():
    import yaml

    from conftest import REPO

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    tiny = next(branch["then"] for branch in schema["$defs"]["source"]["allOf"]
                if branch["if"]["properties"]["kind"]["const"] == "tiny")
    assert tiny["properties"]["architecture"]["enum"] == list(FAMILIES)
