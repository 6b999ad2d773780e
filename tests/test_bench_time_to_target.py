"""The time-to-target benchmark end to end on the tiny model: snapshots are the trained weights, the table and the
target selection say what the snapshots measured."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import REPO, shared_file


def test_time_to_target_picks_the_first_snapshot_at_or_above_the_full_losss_last():
    from studies.time_to_target import time_to_target

    table = pd.DataFrame({
        "setting": ["all-exits"] * 3 + ["m4"] * 4,
        "step": [0, 2, 4, 0, 2, 4, 6],
        "train_seconds": [0, 10, 20, 0, 3, 6, 9],
        "s_model_pre_norm": [0.70, 0.74, 0.78, 0.70, 0.73, 0.78, 0.80],
        "accuracy": [0.3, 0.3, 0.29, 0.3, 0.3, 0.28, 0.27],
        "accuracy_minus_reference": [0.01, 0.01, 0.0, 0.01, 0.01, -0.01, -0.02],
        "accuracy_minus_reference_low": [0.0] * 7, "accuracy_minus_reference_high": [0.0] * 7})
    targets = {row["setting"]: row for row in time_to_target(table)}
    assert targets["m4"]["step"] == 4 and targets["m4"]["seconds"] == 6  # 0.78 >= 0.78: equal counts as reached
    assert targets["all-exits"]["step"] == 4 and targets["all-exits"]["target"] == 0.78
    slower = table.assign(s_model_pre_norm=[0.70, 0.74, 0.78, 0.70, 0.71, 0.72, 0.77])
    assert {row["setting"]: row["step"] for row in time_to_target(slower)}["m4"] is None


@pytest.mark.heavy
@pytest.mark.slow
def test_benchmark_on_the_tiny_model(tiny_model_dir, tmp_path):
    shared_file("lambada_test.jsonl")
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "studies.time_to_target", "--model-dir", str(tiny_model_dir), "--out", str(out),
               "--setting", "all-exits=all:uniform:2", "--setting", "m2=2:uniform:4:16", "--eval-every", "2",
               "--accuracy-passages", "12", "--movement-passages", "6", "--bootstrap", "50"]
    result = subprocess.run([*command, "--phase", "train"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]

    # The last snapshot of a run holds exactly the weights the trainer saved as its model (float32 masters: the
    # default trains in bf16, whose module weights are rounded), and no DeepSpeed checkpoint is left on disk.
    from hsconv.models import load_model

    last = sorted((out / "runs/m2/snapshots").glob("step*"))[-1]
    assert last.name == "step0000004"
    snapshot, trained = (load_model(path).model.state_dict() for path in (last, out / "runs/m2/model"))
    assert snapshot.keys() == trained.keys()
    assert all(torch.equal(snapshot[key], trained[key]) for key in snapshot)
    assert not list(out.rglob("*.pt"))

    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_parquet(out / "time_to_target.parquet")
    assert sorted(zip(table["setting"], table["step"])) == [("all-exits", 0), ("all-exits", 2), ("m2", 0),
                                                            ("m2", 2), ("m2", 4)]
    # step 0 is the pretrained model for both; the clock is the training log's step times
    first = table[table["step"] == 0]
    assert first["s_model_pre_norm"].nunique() == 1 and (first["train_seconds"] == 0).all()
    log = pd.read_parquet(out / "runs/m2/steps.parquet")
    assert table.loc[(table["setting"] == "m2") & (table["step"] == 4), "train_seconds"].item() == \
        pytest.approx(log["seconds"].sum())
    reference = table[(table["setting"] == "all-exits") & (table["step"] == 2)].iloc[0]
    assert reference["accuracy_minus_reference"] == 0
    passages = pd.read_parquet(out / "evaluated/m2-step004-passages.parquet")
    assert len(passages) == 12
    assert table.loc[(table["setting"] == "m2") & (table["step"] == 4), "accuracy"].item() == passages["acc"].mean()
    targets = json.loads((out / "targets.json").read_text())["targets"]
    assert [row["setting"] for row in targets] == ["all-exits", "m2"]
    assert (out / "time_to_target.png").stat().st_size > 0 and (out / "time_to_target.md").is_file()
    # the cached-teacher setting read its cache (written once, its cost recorded apart from the training clock)
    assert set(table.loc[table["setting"] == "m2", "teacher"]) == {"top-16 cache"}
    cache = json.loads((out / "inputs/teacher-top16.json").read_text())
    assert cache["seconds"] > 0 and 0 <= cache["bytes"] - cache["tokens"] * (8 * 16 + 4) < 1024  # + .npy headers
    trained = json.loads((out / "runs/m2/model/hsconv_model.json").read_text())
    assert trained["training"]["teacher_cache"]["top_k"] == 16
