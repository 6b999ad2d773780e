"""Evaluation texts from the local copies in ../shared/data."""

import json

import pandas as pd
import pytest

from conftest import shared_file
from hsconv.texts import TextSourceError, prepare_texts, split_lambada, split_wikitext_articles


def test_wikitext_has_62_articles_in_the_test_split():
    raw = shared_file("wiki.test.raw").read_text(encoding="utf-8")
    articles = split_wikitext_articles(raw)
    assert len(articles) == 62
    assert articles[0].startswith(" = Robert Boulter = \n")
    assert sum(len(a) for a in articles) == len(raw) - len(" \n")  # every byte but the blank first line kept


def test_lambada_has_5153_passages_split_as_lm_eval(tmp_path):
    frame = prepare_texts("lambada", "lambada", tmp_path / "l.parquet", path=str(shared_file("lambada_test.jsonl")))
    assert len(frame) == 5153
    for text, context, target in frame[["text", "context", "target"]].itertuples(index=False):
        # lm-eval: doc["text"].rsplit(" ", 1)[0] and " " + doc["text"].rsplit(" ", 1)[1]
        assert context == text.rsplit(" ", 1)[0] and target == " " + text.rsplit(" ", 1)[1]
    assert pd.read_parquet(tmp_path / "l.parquet").equals(frame)


def test_subsets_first_and_seeded_sample(tmp_path):
    path = str(shared_file("lambada_test.jsonl"))
    first = prepare_texts("l", "lambada", tmp_path / "a.parquet", path=path, subset_size=5)
    assert first["document"].tolist() == [0, 1, 2, 3, 4]
    one = prepare_texts("l", "lambada", tmp_path / "b.parquet", path=path, subset_size=5, subset_mode="sample")
    two = prepare_texts("l", "lambada", tmp_path / "c.parquet", path=path, subset_size=5, subset_mode="sample")
    other = prepare_texts("l", "lambada", tmp_path / "d.parquet", path=path, subset_size=5, subset_mode="sample",
                          subset_seed=1)
    assert one.equals(two) and not one["document"].equals(other["document"])
    assert (tmp_path / "b.parquet").read_bytes() == (tmp_path / "c.parquet").read_bytes()


def test_a_skipped_range_is_never_read(tmp_path):
    """Test text after the validation passages: passages 1,001 on are documents 1000 on, and a sample never draws
    from the skipped ones."""
    path = str(shared_file("lambada_test.jsonl"))
    after = prepare_texts("l", "lambada", tmp_path / "a.parquet", path=path, subset_size=3, subset_skip=1000)
    assert after["document"].tolist() == [1000, 1001, 1002]
    rest = prepare_texts("l", "lambada", tmp_path / "b.parquet", path=path, subset_skip=1000, split="test")
    assert len(rest) == 5153 - 1000 and rest["document"].min() == 1000
    drawn = prepare_texts("l", "lambada", tmp_path / "c.parquet", path=path, subset_size=50, subset_mode="sample",
                          subset_skip=5100)
    assert drawn["document"].min() >= 5100 and len(drawn) == 50
    with pytest.raises(TextSourceError, match="skips 6000 documents, but there are only 5153"):
        prepare_texts("l", "lambada", tmp_path / "d.parquet", path=path, subset_skip=6000)
    assert not (tmp_path / "d.parquet").exists()


def test_split_lambada():
    assert split_lambada("he said hello") == ("he said", " hello")


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("records, message", [
    ([{"text": "  "}, {"text": ""}], "no non-empty documents"),
    ([{"text": "fine"}, {"body": "no text"}], r"no 'text' field where a string is needed \(.*in\.jsonl:2\)"),
])
def test_bad_text_sets(tmp_path, records, message):
    with pytest.raises(TextSourceError, match=message):
        prepare_texts("mine", "jsonl", tmp_path / "out.parquet", path=_jsonl(tmp_path / "in.jsonl", records))
    assert not (tmp_path / "out.parquet").exists()


def test_single_word_lambada_line_is_refused(tmp_path):
    with pytest.raises(TextSourceError, match=r"single word.*\(.*l\.jsonl:2\)"):
        prepare_texts("l", "lambada", tmp_path / "o.parquet",
                      path=_jsonl(tmp_path / "l.jsonl", [{"text": "two words"}, {"text": "one"}]))


def test_missing_file_without_hub_fallback(tmp_path):
    with pytest.raises(TextSourceError, match="data set 'mine': file not found"):
        prepare_texts("mine", "jsonl", tmp_path / "o.parquet", path=str(tmp_path / "missing.jsonl"))


def test_missing_file_falls_back_to_the_hub_and_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(TextSourceError, match="data set 'l': file not found, and its hub fallback "
                                              "'EleutherAI/lambada_openai' cannot be loaded") as error:
        prepare_texts("l", "lambada", tmp_path / "o.parquet", path=str(tmp_path / "missing.jsonl"),
                      hub_id="EleutherAI/lambada_openai")
    assert str(tmp_path / "missing.jsonl") in str(error.value) and "HF_HUB_OFFLINE" in str(error.value)


def test_non_utf8_text_is_named(tmp_path):
    bad = tmp_path / "bad.raw"
    bad.write_bytes(b" = Title = \n caf\xe9 \n")
    with pytest.raises(TextSourceError, match=r"not UTF-8 text .*\(.*bad\.raw\)"):
        prepare_texts("w", "wikitext", tmp_path / "o.parquet", path=str(bad))
