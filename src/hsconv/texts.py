"""Evaluation texts (LAMBADA passages, WikiText documents, any jsonl) into one Parquet file per data set.

Every later stage reads that Parquet, so a data set is parsed, split and subset exactly once. Sources are a local
file when it exists (``../shared/data`` here) and a hub data set otherwise.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from hsconv.errors import InputError
from hsconv.flags import flag, flags
from hsconv.io import check_input_file, iter_jsonl, write_parquet
from hsconv.names import Split, SubsetMode, TextKind

log = logging.getLogger(__name__)

TEXT_KINDS = ("lambada", "wikitext", "jsonl")
# A WikiText article starts at a top-level heading ` = Title = ` (one `=` each side; sections use `= =`).
WIKITEXT_HEADING = re.compile(r"^ = [^=].* = $")
HUB_SOURCES = {
    "lambada": ("EleutherAI/lambada_openai", "default", "test", "text"),
    "wikitext": ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test", "page"),
}


class TextSourceError(InputError):
    """A text source that is missing, empty or malformed; the message names the data set."""


def split_wikitext_articles(raw: str) -> list[str]:
    """Cut raw WikiText into articles at top-level headings, keeping every byte of each article."""
    articles: list[list[str]] = []
    for line in raw.splitlines(keepends=True):
        if WIKITEXT_HEADING.match(line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    return [text for text in ("".join(lines) for lines in articles) if text.strip()]


def split_lambada(text: str) -> tuple[str, str]:
    """Context and target as lm-eval's ``lambada_openai``: the target is the last word, with its leading space."""
    context, _, last_word = text.rpartition(" ")
    return context, " " + last_word


def hub_split(kind: str, split: str) -> str:
    """The hub split a data set of ``kind`` and ``split`` reads: LAMBADA has only its test set (its validation text
    is a range of it); WikiText-2 has a validation split."""
    if kind == "wikitext" and split == "validation":
        return "validation"
    return HUB_SOURCES[kind][2] if kind in HUB_SOURCES else "test"


def read_texts(name: str, kind: str, path: str | None, hub_id: str | None = None,
               split: str = "test") -> tuple[list[str], str]:
    """All documents of a data set and a description of where they came from (the local file first; else the hub,
    whose validation split a WikiText validation set reads)."""
    if kind not in TEXT_KINDS:
        raise TextSourceError(f"data set {name!r}: unknown kind {kind!r}", f"datasets.{name}.kind",
                              f"give one of {', '.join(TEXT_KINDS)}")
    if path and Path(path).exists():
        local = check_input_file(path, f"text file of data set {name!r}", error=TextSourceError)
        if kind == "wikitext":
            try:
                texts = split_wikitext_articles(local.read_text(encoding="utf-8"))
            except UnicodeDecodeError as error:
                raise TextSourceError(f"not UTF-8 text ({error.reason} at byte {error.start})", str(local),
                                      "save the file as UTF-8") from None
        else:
            lines = list(iter_jsonl(local, error_type=TextSourceError))
            if kind == "lambada":
                for number, record in lines:
                    _check_lambada_passage(record["text"], f"{local}:{number}")
            texts = [record["text"] for _, record in lines]
        return texts, str(local.resolve())
    if kind == "jsonl" or not hub_id:
        raise TextSourceError(f"data set {name!r}: file not found", str(path),
                              "fix datasets.<name>.path, or give a hub_id to fall back on")
    return _read_hub(name, kind, hub_id, missing=path, split=split), f"hub:{hub_id}"


def _check_lambada_passage(text: str, where: str) -> None:
    """A passage whose target (its last word) lm-eval would read as empty or shifted is refused, not scored."""
    if text != text.rstrip():
        raise TextSourceError("LAMBADA passage ends in whitespace, so its target word would be empty", where,
                              "strip the trailing whitespace")
    if " " not in text.strip():
        raise TextSourceError("LAMBADA passage has a single word, so no context to predict it from", where,
                              "remove the line")


def _read_hub(name: str, kind: str, hub_id: str, missing: str | None = None, split: str = "test") -> list[str]:
    default_id, config, _, field = HUB_SOURCES[kind]
    split = hub_split(kind, split)
    try:
        import datasets

        rows = datasets.load_dataset(hub_id or default_id, config, split=split)
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if missing:
            raise TextSourceError(
                f"data set {name!r}: file not found, and its hub fallback {hub_id!r} cannot be loaded from the hub "
                f"or its cache either ({type(error).__name__}: {reason})", str(missing),
                "put the file there (the repository's ../shared/data), or run with hub access (HF_HUB_OFFLINE "
                "unset)") from None
        raise TextSourceError(
            f"data set {name!r}: cannot load {hub_id!r} from the hub or its cache ({type(error).__name__}: {reason}); "
            f"point `path:` to a local copy (e.g. ../shared/data/) to run offline") from None
    return list(rows[field])


def select_subset(count: int, size: int | None, mode: str, seed: int, skip: int = 0) -> np.ndarray:
    """Indices of the documents to keep, after the first ``skip``: the first ``size`` of the rest, or ``size`` drawn
    from the rest without replacement (sorted)."""
    if skip >= count:
        raise InputError(f"the subset skips {skip} documents, but there are only {count}")
    rest = count - skip
    if size is None or size >= rest:
        return skip + np.arange(rest)
    if mode == "first":
        return skip + np.arange(size)
    if mode == "sample":
        return skip + np.sort(np.random.default_rng(seed).choice(rest, size=size, replace=False))
    raise InputError(f"subset mode {mode!r} is not 'first' or 'sample'")


@flags(path="local file, used when it exists", hub_id="hub data set used when the local file does not exist",
       subset_size=flag("documents to keep (none: all)", minimum=1), subset_seed=flag(minimum=0),
       subset_skip=flag("documents passed over before the subset", minimum=0), split="validation or test text")
def prepare_texts(name: str, kind: TextKind, out: str | os.PathLike, path: str | None = None,
                  hub_id: str | None = None, subset_size: int | None = None, subset_mode: SubsetMode = "first",
                  subset_seed: int = 0, subset_skip: int = 0, split: Split = "test") -> pd.DataFrame:
    """Read, subset and write one data set as Parquet (``document``, ``text``; LAMBADA adds ``context``, ``target``)."""
    texts, origin = read_texts(name, kind, path, hub_id, split)
    kept = [(index, text) for index, text in enumerate(texts) if text.strip()]
    dropped = len(texts) - len(kept)
    if dropped:
        log.warning("data set %s: dropped %d empty or whitespace-only documents", name, dropped)
    if not kept:
        raise TextSourceError(f"data set {name!r}: no non-empty documents in {origin}")
    try:
        chosen = select_subset(len(kept), subset_size, subset_mode, subset_seed, subset_skip)
    except InputError as error:
        raise TextSourceError(f"data set {name!r}: {error}", f"datasets.{name}.subset.skip") from None
    frame = pd.DataFrame({"document": [kept[i][0] for i in chosen], "text": [kept[i][1] for i in chosen]})
    if kind == "lambada":
        pairs = [split_lambada(text) for text in frame["text"]]
        if any(not context for context, _ in pairs):
            bad = next(i for i, (context, _) in zip(frame["document"], pairs) if not context)
            raise TextSourceError(f"data set {name!r}: document {bad} has a single word, so no context to predict from")
        frame["context"] = [context for context, _ in pairs]
        frame["target"] = [target for _, target in pairs]
    settings = dict(name=name, kind=kind, origin=origin, documents_available=len(kept), documents_dropped=dropped,
                    subset_size=subset_size, subset_mode=subset_mode, subset_seed=subset_seed, subset_skip=subset_skip,
                    split=split)
    write_parquet(frame, out, {"texts": settings})
    log.info("data set %s: %d of %d documents from %s -> %s", name, len(frame), len(kept), origin, out)
    return frame
