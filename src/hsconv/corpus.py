"""Training text: draw documents from FineWeb-Edu (streamed from the hub) or local files into Parquet shards,
then tokenise and pack them into fixed-length sequences, per tokenizer.

Both steps stream: memory is bounded by the shuffle buffer and one shard, never by the size of the source.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hsconv.errors import InputError
from hsconv.flags import flag, flags
from hsconv.io import (
    atomic_path,
    check_input_file,
    iter_jsonl,
    iter_text_lines,
    read_input_table,
    sha256_file,
    write_parquet,
)
from hsconv.names import Boundary, choices
from hsconv.settings import CorpusSettings, PackingSettings

log = logging.getLogger(__name__)

CORPUS_KINDS = ("hub", "jsonl", "text", "parquet")
CORPUS_MANIFEST = "manifest.json"
BOUNDARY_POLICIES = choices(Boundary)


class CorpusError(InputError):
    """A corpus source or budget that cannot work; the message names it and what was available."""


def iter_documents(source: dict) -> Iterator[dict]:
    """Documents of a source as dicts with ``text`` (and ``int_score`` where the source has it), streamed."""
    kind = source.get("kind")
    if kind not in CORPUS_KINDS:
        raise CorpusError(f"corpus source kind {kind!r} is not one of {', '.join(CORPUS_KINDS)}")
    if kind == "hub":
        yield from _iter_hub(source)
        return
    if source.get("hub") and not Path(source["path"]).expanduser().exists():
        # The local copy (../shared/data in the embedded default) is absent: stream the same data from the hub.
        log.info("corpus file %s not found; streaming its hub source %s instead", source["path"], source["hub"]["id"])
        hub = {key: value for key, value in source["hub"].items() if key != "documents"}
        yield from itertools.islice(_iter_hub({"kind": "hub", **hub}, missing=source["path"]),
                                    source["hub"].get("documents", 2000))
        return
    path = check_input_file(source["path"], "corpus file", error=CorpusError)
    if kind == "jsonl":
        for _, record in iter_jsonl(path, error_type=CorpusError):
            yield record
    elif kind == "parquet":
        try:
            reader = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as error:
            raise CorpusError(f"not a Parquet file ({error})", str(path),
                              "give a Parquet file with a 'text' column") from None
        if "text" not in reader.schema_arrow.names:
            raise CorpusError(f"no 'text' column in {reader.schema_arrow.names}", str(path),
                              "give a Parquet file with a 'text' column")
        row = 0
        for batch in reader.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                if not isinstance(record["text"], str):
                    raise CorpusError(f"row {row} has a {type(record['text']).__name__} 'text', not a string",
                                      str(path), "drop or fix that row")
                row += 1
                yield record
    elif kind == "text":
        yield from _iter_text_chunks(path, source.get("chunk_chars", 4000))


def _iter_text_chunks(path: Path, chunk_chars: int) -> Iterator[dict]:
    """Plain text has no document boundaries: cut it into pieces of about ``chunk_chars`` at line ends."""
    pending: list[str] = []
    size = 0
    for _, line in iter_text_lines(path, CorpusError):
        pending.append(line)
        size += len(line)
        if size >= chunk_chars:
            yield {"text": "".join(pending)}
            pending, size = [], 0
    if pending:
        yield {"text": "".join(pending)}


def _iter_hub(source: dict, missing: str | None = None) -> Iterator[dict]:
    """The hub data set's documents, streamed; ``missing``: the local file this stands in for (named when the hub
    cannot be reached either)."""
    try:
        import datasets

        kwargs = {"data_files": source["data_files"]} if source.get("data_files") else {}
        stream = datasets.load_dataset(source["id"], source.get("config"), split=source.get("split", "train"),
                                       streaming=True, **kwargs)
        iterator = iter(stream)
        first = next(iterator)
    except StopIteration:
        return
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if missing is not None:
            raise CorpusError(f"corpus file not found, and its hub source {source['id']!r} ({source.get('config')}) "
                              f"cannot be streamed either ({type(error).__name__}: {reason})", str(missing),
                              "put the file there (the repository's ../shared/data), or run with hub access "
                              "(HF_HUB_OFFLINE unset)") from None
        raise CorpusError(
            f"corpus: cannot stream {source['id']!r} ({source.get('config')}) from the hub "
            f"({type(error).__name__}: {reason}); to run offline use a local copy, e.g. "
            f"`corpus.source: {{kind: jsonl, path: ../shared/data/fineweb_edu_10BT_150docs.jsonl}}`") from None
    yield first
    yield from iterator


def shuffled(documents: Iterable, buffer_size: int, seed: int) -> Iterator:
    """A seeded streaming shuffle: keep ``buffer_size`` items and emit a random one as each new one arrives."""
    rng = random.Random(seed)
    buffer: list = []
    for item in documents:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer



@flags("corpus", source="the corpus source, as JSON", out_dir=flag("directory to write", name="--out"))
def sample_corpus(source: dict, out_dir: str | os.PathLike, documents: int | None = CorpusSettings.documents,
                  seed: int = CorpusSettings.seed, min_int_score: int | None = CorpusSettings.min_int_score,
                  shuffle_buffer: int = CorpusSettings.shuffle_buffer,
                  shard_documents: int = CorpusSettings.shard_documents) -> dict:
    """Draw ``documents`` documents (all, when None) into Parquet shards plus a manifest, written atomically."""
    stream = ({**record, "source_index": index} for index, record in enumerate(iter_documents(source)))
    if min_int_score is not None:
        stream = (r for r in stream if r.get("int_score") is None or r["int_score"] >= min_int_score)
    stream = (r for r in stream if str(r["text"]).strip())
    chosen = itertools.islice(shuffled(stream, shuffle_buffer, seed), documents)
    out_dir = Path(out_dir)
    shards, total = [], 0
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        while True:
            rows = list(itertools.islice(chosen, shard_documents))
            if not rows:
                break
            frame = pd.DataFrame({"source_index": [r["source_index"] for r in rows],
                                  "text": [r["text"] for r in rows]})
            if any("int_score" in r for r in rows):
                frame["int_score"] = [r.get("int_score") for r in rows]
            name = f"shard-{len(shards):05d}.parquet"
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp / name)
            shards.append({"file": name, "documents": len(rows), "sha256": sha256_file(tmp / name)})
            total += len(rows)
        if total == 0:
            raise CorpusError(f"corpus source {source} gave no documents (after the quality filter, if any)")
        if documents is not None and total < documents:
            raise CorpusError(f"corpus source {source} has only {total} documents; {documents} were requested")
        manifest = {"source": source, "seed": seed, "min_int_score": min_int_score, "shuffle_buffer": shuffle_buffer,
                    "documents": total, "shards": shards}
        (tmp / CORPUS_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log.info("sampled %d documents into %d shards in %s", total, len(shards), out_dir)
    return manifest


def read_corpus(corpus_dir: str | os.PathLike, verify: bool = True) -> Iterator[tuple[int, str]]:
    """(source_index, text) of every sampled document, shard by shard, checking each shard's sha256."""
    corpus_dir = Path(corpus_dir)
    if not (corpus_dir / CORPUS_MANIFEST).is_file():
        raise CorpusError(f"not a sampled corpus (no {CORPUS_MANIFEST})", str(corpus_dir),
                          "give the directory that `hsconv sample-corpus` writes")
    manifest = json.loads((corpus_dir / CORPUS_MANIFEST).read_text())
    for shard in manifest["shards"]:
        path = corpus_dir / shard["file"]
        if verify and sha256_file(path) != shard["sha256"]:
            raise CorpusError(f"{path} does not match the sha256 in {corpus_dir / CORPUS_MANIFEST}: corrupted or edited")
        table = pq.read_table(path, columns=["source_index", "text"])
        yield from zip(table.column("source_index").to_pylist(), table.column("text").to_pylist())


def read_sequences(tokens_path: str | os.PathLike, max_length: int, model_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Token matrix and real-token counts from the packed Parquet; refuses an empty file or too-long sequences."""
    table = read_input_table(tokens_path, "packed tokens", ["input_ids", "n_tokens"], made_by="pack-tokens")
    ids = np.stack(table["input_ids"].to_numpy()).astype(np.int64)
    if ids.shape[1] > max_length:
        raise CorpusError(f"sequences in {tokens_path} have {ids.shape[1]} tokens, more than the context length "
                            f"of model {model_name!r} ({max_length}); lower packing.sequence_length")
    return ids, table["n_tokens"].to_numpy().astype(np.int64)


@flags("packing", corpus_dir=flag("directory written by sample-corpus", name="--corpus"),
       model_dir="a model directory whose tokenizer is used",
       batch_documents=flag("documents tokenised at once", minimum=1))
def pack_tokens(corpus_dir: str | os.PathLike, model_dir: str | os.PathLike, out: str | os.PathLike,
                sequence_length: int = PackingSettings.sequence_length, token_budget: int = PackingSettings.token_budget,
                boundary: Boundary = PackingSettings.boundary, batch_documents: int = 256) -> dict:
    """Tokenise documents, join them with EOS, and pack the stream into rows of ``sequence_length`` tokens.

    The budget is rounded down to whole sequences. ``boundary: cut`` fills every row and cuts the last document;
    ``boundary: document`` ends at the last whole document, padding the final row (its ``n_tokens`` says how much).
    """
    from hsconv.models import load_tokenizer

    if boundary not in BOUNDARY_POLICIES:
        raise CorpusError(f"boundary {boundary!r} is not one of {', '.join(BOUNDARY_POLICIES)}")
    sequences = token_budget // sequence_length
    if sequences < 1:
        raise CorpusError(f"token_budget={token_budget} is less than one sequence of {sequence_length} tokens")
    target = sequences * sequence_length
    tokenizer = load_tokenizer(model_dir)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CorpusError(f"the tokenizer in {model_dir} has no EOS token to separate documents")
    started = time.perf_counter()
    pieces, filled, used_documents, last_document_cut, ran_out = _take_tokens(
        read_corpus(corpus_dir), tokenizer, target, boundary, batch_documents)
    if ran_out:
        raise CorpusError(f"the corpus in {corpus_dir} gives only {filled:,} tokens ({used_documents} documents) "
                          f"with this tokenizer; token_budget asks for {target:,}")
    rows = -(-filled // sequence_length)
    padded = np.full(rows * sequence_length, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                     dtype=np.int32)
    padded[:filled] = np.concatenate(pieces)[:filled] if pieces else []
    matrix = padded.reshape(rows, sequence_length)
    n_tokens = np.minimum(sequence_length, np.maximum(0, filled - np.arange(rows) * sequence_length)).astype(np.int32)
    frame = pd.DataFrame({"input_ids": list(matrix), "n_tokens": n_tokens})
    elapsed = time.perf_counter() - started
    stats = {"sequence_length": sequence_length, "token_budget": token_budget, "tokens": int(filled),
             "sequences": int(rows), "boundary": boundary, "documents": used_documents,
             "last_document_cut": last_document_cut, "eos_token_id": int(eos),
             "corpus": json.loads((Path(corpus_dir) / CORPUS_MANIFEST).read_text())["source"]}
    write_parquet(frame, out, {"packing": stats})
    log.info("packed %d tokens from %d documents into %d sequences of %d (%.0f tokens/s) -> %s", filled,
             used_documents, rows, sequence_length, filled / max(elapsed, 1e-9), out)
    return stats


def _take_tokens(documents, tokenizer, target: int, boundary: str, batch_documents: int):
    """Tokens of the documents in order, each followed by EOS, up to ``target``: (pieces, tokens taken, documents
    used, whether the last was cut, whether the corpus ran out first). With ``boundary: document`` the stream stops
    before the first document that does not fit whole."""
    eos = tokenizer.eos_token_id
    # Grown as documents arrive, so that a budget larger than the corpus fails on the corpus, not on allocation.
    pieces: list[np.ndarray] = []
    filled, used_documents = 0, 0
    while True:
        batch = list(itertools.islice(documents, batch_documents))
        if not batch:
            return pieces, filled, used_documents, False, True
        for ids in tokenizer([text for _, text in batch], add_special_tokens=False)["input_ids"]:
            ids = ids + [eos]
            room = target - filled
            if len(ids) > room:
                if boundary == "cut":
                    pieces.append(np.asarray(ids[:room], dtype=np.int32))
                    return pieces, target, used_documents + 1, True, False
                return pieces, filled, used_documents, False, False  # the next document does not fit whole
            pieces.append(np.asarray(ids, dtype=np.int32))
            filled += len(ids)
            used_documents += 1
            if filled == target:
                return pieces, filled, used_documents, False, False
