"""Writing outputs so that a killed stage never leaves a file that looks complete, with provenance attached."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hsconv.errors import InputError
from hsconv.faults import maybe_kill_before_rename

PROVENANCE_KEY = b"hsconv"
_TRACKED_PACKAGES = ("hsconv", "torch", "transformers", "deepspeed", "lm_eval", "pandas", "numpy")


def package_versions() -> dict[str, str | None]:
    """Versions of the packages whose behaviour changes the numbers (None where not installed)."""
    versions: dict[str, str | None] = {}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in blocks (checkpoints and shards can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def stable_hash(obj) -> str:
    """A short hash of a JSON-serialisable object, independent of key order."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds.

    Works for files and directories. The rename is atomic on one file system, so a reader (or Snakemake)
    sees either the old state or the finished output, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A killed writer cannot remove its temporary folder; the next writer of the same output does.
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if not target.exists():
            raise RuntimeError(f"stage finished without writing {path}")
        maybe_kill_before_rename(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_parquet(frame: pd.DataFrame, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write ``frame`` atomically, with package versions and ``metadata`` in the Parquet schema metadata."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    provenance = {"versions": package_versions(), **(metadata or {})}
    existing = table.schema.metadata or {}
    table = table.replace_schema_metadata({**existing, PROVENANCE_KEY: json.dumps(provenance, default=str).encode()})
    with atomic_path(path) as tmp:
        # A CRC of every page: a reader (read_input_table) then tells a file damaged after it was written from one
        # that was never right.
        pq.write_table(table, tmp, write_page_checksum=True)


def read_provenance(path: str | os.PathLike) -> dict:
    """The provenance dictionary stored by :func:`write_parquet`."""
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata.get(PROVENANCE_KEY, b"{}"))


def write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_table(frame: pd.DataFrame, stem: str | os.PathLike, metadata: dict | None = None,
                float_format: str = "{:.4f}") -> None:
    """Write a table for machines (``stem.parquet``) and for people (``stem.csv``, ``stem.md``)."""
    stem = Path(stem)
    write_parquet(frame, stem.with_suffix(".parquet"), metadata)
    with atomic_path(stem.with_suffix(".csv")) as tmp:
        frame.to_csv(tmp, index=False)
    write_text(markdown_table(frame, float_format), stem.with_suffix(".md"))


def markdown_table(frame: pd.DataFrame, float_format: str = "{:.4f}") -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return float_format.format(value)
        return str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def check_input_file(path: str | os.PathLike, what: str, made_by: str | None = None,
                     error: type[InputError] = InputError) -> Path:
    """``path`` as a Path, or an :class:`InputError` (the stage's own kind of it) naming it when it is missing or
    not a file."""
    path = Path(path)
    how = _how_to_fix(what, made_by) if made_by else f"give the path of the {what}"
    if not path.exists():
        raise error(f"{what} not found", str(path), how)
    if not path.is_file():
        raise error(f"{what} is a directory, not a file", str(path), how)
    return path


def _how_to_fix(what: str, made_by: str) -> str:
    return f"give the {what} that `hsconv {made_by}` writes"


def _starts_as_parquet(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PAR1"


def _how_to_rebuild(made_by: str | None) -> str:
    """What to do about an input that was written whole and damaged later (a cut copy, a bad disk)."""
    writer = f"`hsconv {made_by}`" if made_by else "the stage that wrote it"
    return (f"delete it and rerun: the workflow rebuilds it (or rerun with `snakemake --forcerun <rule>` naming the "
            f"rule that writes it); outside the workflow, run {writer} again")


def read_input_table(path: str | os.PathLike, what: str, columns=(), made_by: str | None = None,
                     allow_empty: bool = False) -> pd.DataFrame:
    """A stage's Parquet input, refused with its path when it is missing, not Parquet, lacks a needed column or
    holds no rows."""
    path = check_input_file(path, what, made_by)
    how = _how_to_fix(what, made_by) if made_by else f"give a Parquet {what}"
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as error:
        if _starts_as_parquet(path):
            raise InputError(f"{what} is damaged: it begins as Parquet but {str(error).splitlines()[0]}", str(path),
                             _how_to_rebuild(made_by)) from None
        raise InputError(f"{what} is not a Parquet file ({str(error).splitlines()[0]})", str(path), how) from None
    missing = [column for column in columns if column not in names]
    if missing:
        raise InputError(f"{what} lacks the column(s) {missing} (it has {names})", str(path), how)
    try:
        frame = pd.read_parquet(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as error:
        raise InputError(f"{what} is damaged ({str(error).splitlines()[0]})", str(path),
                         _how_to_rebuild(made_by)) from None
    if frame.empty and not allow_empty:
        raise InputError(f"{what} holds no rows", str(path), how)
    return frame


def iter_jsonl(path: str | os.PathLike, text_field: str = "text",
               error_type: type[InputError] = InputError) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a jsonl file whose lines are objects with a string ``text_field``; anything else is
    refused as ``path:line`` with ``error_type`` (the calling stage's kind of :class:`InputError`). Blank lines are
    skipped."""
    path = check_input_file(path, "jsonl file", error=error_type)
    for number, line in iter_text_lines(path, error_type):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise error_type(f"not a JSON line ({error.msg}, column {error.colno})", where,
                             "give a jsonl file: one JSON object per line") from None
        if not isinstance(record, dict):
            raise error_type(f"a JSON {type(record).__name__}, not an object", where,
                             f"each line must be an object with a {text_field!r} string")
        if not isinstance(record.get(text_field), str):
            found = "no" if text_field not in record else f"a {type(record[text_field]).__name__}"
            raise error_type(f"{found} {text_field!r} field where a string is needed", where,
                             f"each line must be an object with a {text_field!r} string")
        yield number, record


def iter_text_lines(path: Path, error_type: type[InputError] = InputError) -> Iterator[tuple[int, str]]:
    """(line number, line with its end) of a UTF-8 text file, line ends translated to "\\n" as text mode does; bytes
    that are not UTF-8 are refused as ``path:line`` with ``error_type`` (text mode could not say which line)."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
            except UnicodeDecodeError as error:
                raise error_type(f"not UTF-8 text ({error.reason} at byte {error.start})", f"{path}:{number}",
                                 "save the file as UTF-8") from None
