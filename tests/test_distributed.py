"""Training on several processes, on CPU ranks (DeepSpeed's CPU accelerator, gloo), started exactly as the workflow
starts them: the launcher line comes from :func:`hsconv.cluster.distill_launcher`, the one the distill rule and the
Slurm profile use. Marker ``distributed``: `.ci/run` runs this tier after the main suite.

Why the tolerances: a run on two ranks sums the two halves of a batch's gradient in another order than one process
that accumulates them (gloo's all-reduce against DeepSpeed's accumulation buffer; under ZeRO-3 also through
partitioned buffers), so the gradients differ by float32 rounding (~1e-7 relative). AdamW divides by √v, which
can amplify a rounding difference in a small gradient component up to one update's size in the worst case, but over a
few steps of a smooth model the weights stay within ~1e-5 of each other; what a real fault changes (a rank training on
the wrong rows, a share counted twice, a missing all-reduce) moves the weights by a whole update, lr = 1e-3 per
step, 100× the bound. The test below shows that such a fault is caught at this bound.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from hsconv.cluster import distill_launcher

from test_distill_train import SETTINGS, corpus, make_model  # noqa: F401 (corpus: the fixture)

pytestmark = pytest.mark.distributed

WEIGHT_TOLERANCE = 1e-5  # float32 rounding of the gradient sum, through 5 AdamW steps (module docstring)
TIMEOUT = 300  # seconds a run (or a run that lost a rank) may take before the test calls it a hang


def _outputs(root: Path, tag: str) -> dict[str, Path]:
    return {"out": root / tag / "model", "log-out": root / tag / "steps.parquet",
            "layers-out": root / tag / "layers.parquet", "checkpoints": root / tag / "checkpoints"}


def _distill_command(launcher: str, model_dir, tokens, outputs, settings) -> str:
    """The distill rule's shell line: the launcher, then the stage's arguments."""
    arguments = ["distill", "--model-dir", str(model_dir), "--tokens", str(tokens), "--settings", json.dumps(settings),
                 "--device", "cpu", "--name", "tiny"]
    for option, path in outputs.items():
        arguments += [f"--{option}", str(path)]
    program = f"{shlex.quote(sys.executable)} -m hsconv.cli" if launcher == "hsconv" else launcher
    return f"{program} {shlex.join(arguments)}"


def run(command: str, env: dict | None = None, path_prepend: Path | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    # torchrun's `-m hsconv.cli` and the hsconv command resolve in this interpreter's environment
    bin_dirs = [str(Path(sys.executable).parent)] + ([str(path_prepend)] if path_prepend else [])
    environment["PATH"] = os.pathsep.join([*bin_dirs[::-1], environment.get("PATH", "")])
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=environment, timeout=TIMEOUT)


def _weights(outputs) -> dict[str, torch.Tensor]:
    return load_file(outputs["out"] / "model.safetensors")


def _largest_difference(left: dict, right: dict) -> float:
    assert left.keys() == right.keys()
    return max((left[name] - right[name]).abs().max().item() for name in left)


STEP_COLUMNS = ["step", "epoch", "tokens", "lr", "zeta", "zeta1", "zeta2", "grad_norm"]


def _assert_same_steps(left, right) -> None:
    """The step logs agree: exactly in what was counted, to float32 rounding in what was computed."""
    left, right = pd.read_parquet(left["log-out"])[STEP_COLUMNS], pd.read_parquet(right["log-out"])[STEP_COLUMNS]
    pd.testing.assert_frame_equal(left[["step", "epoch", "tokens", "lr"]], right[["step", "epoch", "tokens", "lr"]])
    np.testing.assert_allclose(left[["zeta", "zeta1", "zeta2", "grad_norm"]].to_numpy(),
                               right[["zeta", "zeta1", "zeta2", "grad_norm"]].to_numpy(), rtol=1e-4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, corpus):  # noqa: F811 (the imported fixture)
    return make_model(tmp_path_factory.mktemp("distributed"), corpus)


@pytest.fixture(scope="module")
def two_rank_zero2(tmp_path_factory, tiny):
    """An undisturbed two-rank ZeRO-2 run, shared by the tests that compare with it."""
    root = tmp_path_factory.mktemp("two-rank")
    outputs = _outputs(root, "whole")
    result = run(_distill_command(distill_launcher("auto", 2, 1), *tiny, outputs, {**SETTINGS, "zero_stage": 2}))
    assert result.returncode == 0, result.stderr[-3000:]
    return outputs, result


@pytest.mark.parametrize("zero_stage, exit_samples", [(1, None), (2, 2), (3, None)],
                         ids=["zero1", "zero2-sampled-exits", "zero3"])
def test_two_ranks_train_what_one_process_trains(tmp_path, tiny, zero_stage, exit_samples):
    """The same global batch (8 rows: one process accumulates two micro-batches of 4, two ranks take one each)."""
    settings = {**SETTINGS, "zero_stage": zero_stage, "exit_samples": exit_samples}
    one, two = _outputs(tmp_path, "one"), _outputs(tmp_path, "two")
    single = run(_distill_command(distill_launcher("auto", 0, 1), *tiny, one, settings))
    assert single.returncode == 0, single.stderr[-3000:]
    double = run(_distill_command(distill_launcher("auto", 2, 1), *tiny, two, settings))
    assert double.returncode == 0, double.stderr[-3000:]
    assert "torchrun --standalone --nnodes 1 --nproc_per_node 2" in distill_launcher("auto", 2, 1)

    difference = _largest_difference(_weights(one), _weights(two))
    print(f"ZeRO-{zero_stage}, exit_samples={exit_samples}: largest weight difference, 2 ranks vs 1: {difference:.2e}")
    assert difference < WEIGHT_TOLERANCE, f"ZeRO-{zero_stage}: largest weight difference {difference:.2e}"
    _assert_same_steps(one, two)
    layers_one, layers_two = (pd.read_parquet(outputs["layers-out"]) for outputs in (one, two))
    # Exit sampling: each micro-batch's draw follows its global index, so two ranks draw what one process draws.
    pd.testing.assert_series_equal(layers_one["kl"].isna(), layers_two["kl"].isna())
    if exit_samples:
        assert layers_one["kl"].isna().any()  # exits were sampled, not all computed


def test_the_tolerance_catches_a_rank_that_trains_on_the_wrong_rows(tmp_path, tiny, two_rank_zero2):
    """The weight bound is not loose: another seed's rows (every rank still trains, on other data) are far off."""
    outputs = _outputs(tmp_path, "other-rows")
    result = run(_distill_command(distill_launcher("auto", 2, 1), *tiny, outputs,
                                  {**SETTINGS, "zero_stage": 2, "seed": 1}))
    assert result.returncode == 0, result.stderr[-3000:]
    difference = _largest_difference(_weights(outputs), _weights(two_rank_zero2[0]))
    print(f"another seed's rows: largest weight difference {difference:.2e}")
    assert difference > 100 * WEIGHT_TOLERANCE


def test_only_rank_zero_tells_the_progress(two_rank_zero2):
    _, result = two_rank_zero2
    step_lines = [line for line in result.stderr.splitlines() if " step 1/5 " in line]
    assert len(step_lines) == 1 and not step_lines[0].startswith("[rank"), step_lines


def test_a_killed_rank_ends_the_run_and_the_rerun_resumes_to_the_same_bits(tmp_path, tiny, two_rank_zero2):
    outputs = _outputs(tmp_path, "killed")
    command = _distill_command(distill_launcher("auto", 2, 1), *tiny, outputs, {**SETTINGS, "zero_stage": 2})
    killed = run(command, env={"HSCONV_KILL_AFTER_STEP": "3", "HSCONV_KILL_RANK": "1"})  # TIMEOUT: no hang
    assert killed.returncode != 0
    # torchrun's summary names the rank that died and how; rank 0 was stopped by torchrun, not left waiting.
    assert "rank 1" in killed.stderr and "Signal 9 (SIGKILL)" in killed.stderr, killed.stderr[-3000:]
    assert not outputs["out"].exists() and not outputs["log-out"].exists()

    resumed = run(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint step0000002 (step 2 of 5)" in resumed.stderr
    expected, actual = _weights(two_rank_zero2[0]), _weights(outputs)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    pd.testing.assert_frame_equal(pd.read_parquet(two_rank_zero2[0]["log-out"])[STEP_COLUMNS],
                                  pd.read_parquet(outputs["log-out"])[STEP_COLUMNS])


FAKE_SRUN = """#!/usr/bin/env bash
# srun --nodes N --ntasks-per-node 1 COMMAND...: COMMAND once per "node", here all on this machine, as Slurm would
# start them (SLURM_NODEID, SLURM_PROCID); the exit status is the first failure's.
set -u
nodes=1
while [[ $1 == --* ]]; do
    case $1 in --nodes) nodes=$2; shift 2;; --ntasks-per-node) shift 2;; *) echo "fake srun: $1?" >&2; exit 2;; esac
done
pids=()
for ((node = 0; node < nodes; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
# scontrol show hostnames NODELIST: the allocation's hosts, one per line; both "nodes" are this machine.
[[ "$1 $2" == "show hostnames" ]] || { echo "fake scontrol: $*?" >&2; exit 2; }
echo 127.0.0.1
echo 127.0.0.1
"""


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_the_two_node_launch_of_the_slurm_profile_trains_what_one_process_trains(tmp_path, tiny):
    """``{gpus: 1, nodes: 2}``: the profile's job runs ``srun … torchrun --nnodes 2 … --rdzv_endpoint <first
    node>:29500``; here srun starts both "nodes" on this machine and they meet at 127.0.0.1."""
    launcher = distill_launcher("auto", 1, 2)
    assert launcher.startswith("srun --nodes 2 --ntasks-per-node 1 torchrun --nnodes 2 --nproc_per_node 1")
    if not _port_free(29500):
        pytest.skip("port 29500, the profile's rendezvous port, is taken on this machine")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IXUSR)
    settings = {**SETTINGS, "zero_stage": 2}
    nodes, one = _outputs(tmp_path, "nodes"), _outputs(tmp_path, "one")
    result = run(_distill_command(launcher, *tiny, nodes, settings), path_prepend=bin_dir,
                 env={"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]"})
    assert result.returncode == 0, result.stderr[-3000:]
    single = run(_distill_command(distill_launcher("auto", 0, 1), *tiny, one, settings))
    assert single.returncode == 0, single.stderr[-3000:]
    difference = _largest_difference(_weights(nodes), _weights(one))
    print(f"two nodes (1 rank each) vs 1 process: largest weight difference {difference:.2e}")
    assert difference < WEIGHT_TOLERANCE
    _assert_same_steps(nodes, one)
