"""Corpus sampling and token packing, from local files and through the streaming `datasets` path."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import shared_file
from hsconv.corpus import CorpusError, iter_documents, pack_tokens, read_corpus, sample_corpus, shuffled
from hsconv.io import read_provenance


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "int_score": i % 4}) + "\n" for i, t in enumerate(texts)))
    return {"kind": "jsonl", "path": str(path)}


def test_same_seed_same_bytes_other_seed_other_documents(tmp_path):
    source = {"kind": "jsonl", "path": str(shared_file("fineweb_edu_10BT_150docs.jsonl"))}
    one = sample_corpus(source, tmp_path / "one", documents=40, seed=0, shuffle_buffer=50, shard_documents=16)
    sample_corpus(source, tmp_path / "two", documents=40, seed=0, shuffle_buffer=50, shard_documents=16)
    sample_corpus(source, tmp_path / "other", documents=40, seed=1, shuffle_buffer=50, shard_documents=16)
    assert [s["documents"] for s in one["shards"]] == [16, 16, 8]
    for shard in one["shards"]:
        assert (tmp_path / "one" / shard["file"]).read_bytes() == (tmp_path / "two" / shard["file"]).read_bytes()
    assert (tmp_path / "one/manifest.json").read_bytes() == (tmp_path / "two/manifest.json").read_bytes()
    indices = lambda d: [i for i, _ in read_corpus(tmp_path / d)]
    assert indices("one") != indices("other")
    assert len(set(indices("one"))) == 40  # drawn without replacement


def test_shuffle_is_a_permutation():
    items = list(range(1000))
    out = list(shuffled(items, buffer_size=64, seed=3))
    assert sorted(out) == items and out != items


def test_quality_filter(tmp_path):
    source = _jsonl(tmp_path / "c.jsonl", [f"document {i}" for i in range(20)])
    manifest = sample_corpus(source, tmp_path / "out", min_int_score=3, shuffle_buffer=5)
    texts = [t for _, t in read_corpus(tmp_path / "out")]
    assert manifest["documents"] == 5 and sorted(texts) == sorted(f"document {i}" for i in range(3, 20, 4))


def test_streaming_hub_path_with_a_local_datasets_fixture(tmp_path):
    """The hub code path (datasets, streaming=True), pointed at a local json file instead of the network."""
    path = tmp_path / "fixture.jsonl"
    _jsonl(path, [f"streamed document number {i}" for i in range(30)])
    source = {"kind": "hub", "id": "json", "data_files": str(path), "split": "train"}
    first = [d["text"] for d in iter_documents(source)]
    assert first[:2] == ["streamed document number 0", "streamed document number 1"] and len(first) == 30
    manifest = sample_corpus(source, tmp_path / "out", documents=10, seed=0, shuffle_buffer=8)
    assert manifest["documents"] == 10 and manifest["source"]["id"] == "json"


def test_hub_unreachable_fails_at_once_naming_the_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    source = {"kind": "hub", "id": "HuggingFaceFW/fineweb-edu", "config": "sample-10BT"}
    with pytest.raises(CorpusError, match="cannot stream 'HuggingFaceFW/fineweb-edu'.*local copy"):
        sample_corpus(source, tmp_path / "out", documents=5)
    assert not (tmp_path / "out").exists()


def test_plain_text_is_streamed_in_pieces(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("".join(f"line {i} of a long file\n" for i in range(1000)))
    pieces = [d["text"] for d in iter_documents({"kind": "text", "path": str(path), "chunk_chars": 500})]
    assert "".join(pieces) == path.read_text() and all(len(p) < 530 for p in pieces)


@pytest.mark.parametrize("make_source, kwargs, message", [
    (lambda p: _jsonl(p / "e.jsonl", ["", "   "]), {}, "gave no documents"),
    (lambda p: {"kind": "jsonl", "path": str(p / "missing.jsonl")}, {}, "corpus file not found"),
    (lambda p: (p / "x.jsonl").write_text('{"body": 1}\n') and {"kind": "jsonl", "path": str(p / "x.jsonl")}, {},
     r"no 'text' field where a string is needed \(.*x\.jsonl:1\)"),
    (lambda p: _jsonl(p / "s.jsonl", ["a", "b"]), {"documents": 5}, "has only 2 documents; 5 were requested"),
])
def test_bad_corpus_sources(tmp_path, make_source, kwargs, message):
    with pytest.raises(CorpusError, match=message):
        sample_corpus(make_source(tmp_path), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_packing_is_exact_and_decodes_to_the_source(tmp_path, tiny_model_dir, tiny_model):
    texts = [f"Document {i}: " + "word " * (i % 7 + 3) for i in range(60)]
    sample_corpus(_jsonl(tmp_path / "c.jsonl", texts), tmp_path / "corpus", shuffle_buffer=1)
    stats = pack_tokens(tmp_path / "corpus", tiny_model_dir, tmp_path / "p.parquet", sequence_length=64,
                        token_budget=1000)
    packed = pd.read_parquet(tmp_path / "p.parquet")
    assert stats["tokens"] == 960 == packed["n_tokens"].sum() and len(packed) == 15  # rounded down to 15 × 64
    assert all(len(row) == 64 for row in packed["input_ids"]) and stats["last_document_cut"]
    stream = np.concatenate(packed["input_ids"].to_list())
    eos = tiny_model.tokenizer.eos_token_id
    decoded = tiny_model.tokenizer.decode(stream).split(tiny_model.tokenizer.eos_token)
    order = [t for _, t in read_corpus(tmp_path / "corpus")]
    assert decoded[:-1] == order[:len(decoded) - 1]  # whole documents, in corpus order, EOS between them
    assert order[len(decoded) - 1].startswith(decoded[-1])  # the last one cut
    assert (stream == eos).sum() == len(decoded) - 1
    assert read_provenance(tmp_path / "p.parquet")["packing"]["sequence_length"] == 64


def test_packing_at_document_boundaries(tmp_path, tiny_model_dir):
    sample_corpus(_jsonl(tmp_path / "c.jsonl", ["abcdefghi"] * 30), tmp_path / "corpus")  # 10 tokens with EOS
    stats = pack_tokens(tmp_path / "corpus", tiny_model_dir, tmp_path / "p.parquet", sequence_length=16,
                        token_budget=100, boundary="document")
    packed = pd.read_parquet(tmp_path / "p.parquet")
    assert stats["tokens"] == 90 and not stats["last_document_cut"]  # 9 whole documents fit in 96
    assert packed["n_tokens"].tolist() == [16] * 5 + [10]


def test_budget_beyond_the_corpus(tmp_path, tiny_model_dir):
    sample_corpus(_jsonl(tmp_path / "c.jsonl", ["short text"] * 3), tmp_path / "corpus")
    with pytest.raises(CorpusError, match="gives only 33 tokens \\(3 documents\\).*asks for 1,024"):
        pack_tokens(tmp_path / "corpus", tiny_model_dir, tmp_path / "p.parquet", 64, 1024)
    assert not (tmp_path / "p.parquet").exists()


def test_corrupted_shard_is_named(tmp_path):
    sample_corpus(_jsonl(tmp_path / "c.jsonl", ["some text"] * 4), tmp_path / "corpus")
    shard = tmp_path / "corpus" / "shard-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-20])
    with pytest.raises(CorpusError, match="shard-00000.parquet does not match the sha256"):
        list(read_corpus(tmp_path / "corpus"))


def _hub_documents(count):
    def stream(source, missing=None):
        assert source["id"] == "org/corpus" and source["config"] == "small" and "documents" not in source
        yield from ({"text": f"hub document {index} " * 5} for index in range(count))
    return stream


def test_a_missing_local_file_is_replaced_by_its_hub_source(tmp_path, monkeypatch):
    import hsconv.corpus as corpus

    monkeypatch.setattr(corpus, "_iter_hub", _hub_documents(100))
    source = {"kind": "text", "path": str(tmp_path / "absent.txt"),
              "hub": {"id": "org/corpus", "config": "small", "split": "train", "documents": 30}}
    manifest = sample_corpus(source, tmp_path / "out", seed=0)
    assert manifest["documents"] == 30  # the hub block's cap, not the whole stream
    assert {text for _, text in read_corpus(tmp_path / "out")} == {f"hub document {index} " * 5 for index in range(30)}


def test_a_present_local_file_is_read_and_the_hub_is_not_touched(tmp_path, monkeypatch):
    import hsconv.corpus as corpus

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked although the file is there")
    monkeypatch.setattr(corpus, "_iter_hub", no_hub)
    (tmp_path / "local.txt").write_text("a local line\n" * 20)
    source = {"kind": "text", "path": str(tmp_path / "local.txt"), "chunk_chars": 40, "hub": {"id": "org/corpus"}}
    assert sample_corpus(source, tmp_path / "out", seed=0)["documents"] > 1


def test_offline_without_the_file_one_message_names_the_file_and_the_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    source = {"kind": "text", "path": str(tmp_path / "absent.txt"),
              "hub": {"id": "HuggingFaceFW/fineweb-edu", "config": "sample-10BT", "split": "train", "documents": 10}}
    with pytest.raises(CorpusError, match="corpus file not found, and its hub source 'HuggingFaceFW/fineweb-edu'") \
            as error:
        sample_corpus(source, tmp_path / "out", seed=0)
    assert str(tmp_path / "absent.txt") in str(error.value) and "HF_HUB_OFFLINE" in str(error.value)
    assert not (tmp_path / "out").exists()
