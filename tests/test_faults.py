"""Faults really caused: a full disk (a file-size limit), an unwritable output location, a tokenizer without EOS.

A full disk is simulated with RLIMIT_FSIZE in the stage's own process (SIGXFSZ ignored), so a write past the limit
fails with EFBIG as a write to a full disk fails with ENOSPC, and it works as root, where permissions do not.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from hsconv.corpus import sample_corpus
from hsconv.models import prepare_model, weights_dir

from conftest import TINY_SOURCE, shared_file

TRAIN = {"batch_size": 8, "micro_batch_size": 4, "learning_rate": 1e-3, "checkpoint_every": 2, "max_steps": 3,
         "zero_stage": 2}


def hsconv(*args: str, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, "-m", "hsconv.cli", *args], capture_output=True, text=True, timeout=600,
                          preexec_fn=limit if file_size_limit else None)


def errors(result: subprocess.CompletedProcess) -> list[str]:
    """The stage's one-line failure report (``hsconv <stage>: ...``), the last line of its stderr."""
    return [line for line in result.stderr.splitlines() if line.startswith("hsconv ")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus"
    sample_corpus({"kind": "jsonl", "path": str(shared_file("fineweb_edu_10BT_150docs.jsonl"))}, path, documents=20)
    return path


def pack(corpus, model_dir, out, **kwargs):
    return hsconv("pack-tokens", "--corpus", str(corpus), "--model-dir", str(model_dir), "--out", str(out),
                  "--sequence-length", "64", "--token-budget", str(64 * 48), **kwargs)


def test_a_full_disk_while_writing_a_table_leaves_nothing_and_says_so(tmp_path, corpus, tiny_model_dir):
    out = tmp_path / "results" / "tokens.parquet"
    result = pack(corpus, tiny_model_dir, out, file_size_limit=4096)
    assert result.returncode == 1, result.stderr[-2000:]
    (line,) = errors(result)
    assert "File too large" in line and "disk full" in line and "nothing half-written" in line, line
    assert list(out.parent.iterdir()) == []  # neither the table nor its temporary folder
    assert pack(corpus, tiny_model_dir, out).returncode == 0 and out.is_file()


@pytest.mark.parametrize("where", ["under a file", "read-only file system"])
def test_an_unwritable_output_location_is_named(tmp_path, corpus, tiny_model_dir, where):
    if where == "under a file":
        (tmp_path / "results").write_text("not a folder")
        out = tmp_path / "results" / "tokens.parquet"
    else:
        out = "/sys/hsconv-results/tokens.parquet"  # sysfs: no new folders, even for root
    result = pack(corpus, tiny_model_dir, out)
    assert result.returncode == 1, result.stderr[-2000:]
    (line,) = errors(result)
    assert "not writable" in line and str(out).rsplit("/", 1)[0] in line, line


def test_a_full_disk_during_a_checkpoint_is_named_and_never_resumed_from(tmp_path, corpus):
    from hsconv.corpus import pack_tokens

    model_dir = prepare_model("tiny", TINY_SOURCE, tmp_path / "tiny")
    tokens = tmp_path / "tokens.parquet"
    pack_tokens(corpus, model_dir, tokens, 64, 64 * 48)
    outputs = {"--out": tmp_path / "model", "--log-out": tmp_path / "steps.parquet",
               "--layers-out": tmp_path / "layers.parquet", "--checkpoints": tmp_path / "checkpoints"}
    command = ["distill", "--model-dir", str(model_dir), "--tokens", str(tokens), "--settings", json.dumps(TRAIN),
               "--name", "tiny"] + [str(part) for pair in outputs.items() for part in pair]
    # The tiny model's weights fit in 64 kB per file; its optimizer states do not.
    full = hsconv(*command, file_size_limit=64 * 1024)
    assert full.returncode == 1, full.stderr[-3000:]
    assert "could not write checkpoint" in full.stderr and "step0000002" in full.stderr, full.stderr[-3000:]
    assert not outputs["--out"].exists() and not outputs["--log-out"].exists()
    (partial,) = outputs["--checkpoints"].glob("*/step0000002")
    assert not (partial / "sha256.json").exists()

    rerun = hsconv(*command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "not resuming from checkpoint step0000002: it was not finished (no checksums)" in rerun.stderr
    assert outputs["--out"].is_dir()


def test_a_tokenizer_without_eos_is_named_before_packing(tmp_path, corpus, tiny_model_dir):
    from transformers import AutoTokenizer

    model_dir = tmp_path / "no-eos"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(weights_dir(model_dir))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.eos_token = None
    tokenizer.save_pretrained(weights_dir(model_dir))
    out = tmp_path / "tokens.parquet"
    result = pack(corpus, model_dir, out)
    assert result.returncode == 2, result.stderr[-2000:]  # bad input
    (line,) = errors(result)
    assert "no EOS token" in line and str(model_dir) in line, line
    assert not out.exists()
