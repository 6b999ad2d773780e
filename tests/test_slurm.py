"""The test preset through the Slurm profile against a real single-node Slurm (tests/slurm/start_slurm.sh).

First a distillation job whose Slurm time limit (1 minute) falls in the middle of its run: Slurm kills it, no
output is left that a rerun would take for done, and its checkpoints stay. Then the whole preset: every job is an
``sbatch`` job, the killed distillation resumes from its last checkpoint, and a dry run afterwards plans nothing.

Skipped where no Slurm is running, unless HSCONV_REQUIRE_SLURM=1 (as in .ci/run), where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, SHARED_DATA
from test_workflow import planned_counts, planned_jobs, snakemake, write_config

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def slurm_partition() -> str | None:
    """The default partition of a running Slurm, or None."""
    if not shutil.which("sinfo"):
        return None
    result = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True)
    for line in result.stdout.splitlines():
        partition, state = line.split()
        if state in ("idle", "mixed", "allocated") or state.startswith(("idle", "mix", "alloc")):
            return partition.rstrip("*")
    return None


@pytest.fixture(scope="module")
def partition() -> str:
    pytest.importorskip("snakemake_executor_plugin_slurm")
    if not (SHARED_DATA / "lambada_test.jsonl").is_file():
        pytest.skip("shared data not present")
    found = slurm_partition()
    if found is None:
        message = "no Slurm is running (start one with: bash tests/slurm/start_slurm.sh)"
        if os.environ.get("HSCONV_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


def local_slurm_profile(directory: Path, partition: str) -> Path:
    """The shipped Slurm profile with its placeholders filled for this one-node cluster (no accounts)."""
    profile = yaml.safe_load((REPO / "profiles/slurm/profile.yaml").read_text())
    profile["default-resources"]["slurm_partition"] = partition
    del profile["default-resources"]["slurm_account"]
    profile.update({
        "slurm-no-account": True,
        "slurm-status-command": "squeue",  # no slurmdbd here, so no sacct
        "slurm-init-seconds-before-status-checks": 5,
        "latency-wait": 5,
        "jobs": 8,
        "max-threads": 2,  # the node has 2 CPUs; rules ask for up to 8 threads
    })
    target = directory / "slurm-profile"
    target.mkdir()
    (target / "profile.yaml").write_text(yaml.safe_dump(profile))
    return target


def test_preset_runs_as_slurm_jobs_and_a_timed_out_distillation_resumes(partition, tmp_path):
    def longer_training(config):
        config["distill"].update(max_steps=10, checkpoint_every=2)
        # One model, one figure of each plotting rule and the default target only: the second model, the other
        # figures and the studies beyond the paper (`findings`) are more of the same rules' jobs, and the scheduling
        # and resume under test here are the same for them (each job here costs a Slurm round trip on a 2-CPU node).
        del config["models"]["tiny-qwen2"]
        # one figure of each plotting rule (Figs. 6, 8-10 are the same rules again for another data set or model)
        config["figures"] = {name: config["figures"][name] for name in ("fig3", "fig4", "fig5", "fig7")}
        config["figures"]["fig4"]["models"] = ["tiny-llama"]

    write_config(tmp_path, longer_training)
    profile = local_slurm_profile(tmp_path, partition)
    slurm = ("--workflow-profile", str(profile))

    # 1. Slurm's time limit (1 minute) ends the distillation mid-run: each step lasts >= 9 s, 10 steps.
    killed = snakemake(tmp_path, "results/models/tiny-llama/distilled", *slurm, "--set-resources",
                       "distill:runtime=1", env={"HSCONV_MIN_STEP_SECONDS": "9"})
    output = killed.stdout + killed.stderr
    results = tmp_path / "results"
    distill_log = results / "logs/distill/tiny-llama.log"
    output += "\n--- the distill job's log ---\n" + (distill_log.read_text()[-3000:] if distill_log.exists() else "")
    assert killed.returncode != 0, output[-6000:]
    assert "TIMEOUT" in output, output[-6000:]
    for path in ("models/tiny-llama/distilled", "training/tiny-llama/steps.parquet",
                 "training/tiny-llama/layers.parquet"):
        assert not (results / path).exists(), path
    checkpoints = sorted(p.name for p in (results / "checkpoints/tiny-llama").glob("*/step*"))
    assert checkpoints, "the killed run wrote no checkpoint"
    assert "distill" in planned_jobs(snakemake(tmp_path, *slurm, "-n"))

    # 2. The whole preset through Slurm; the distillation continues from its last checkpoint.
    planned = planned_counts(snakemake(tmp_path, *slurm, "-n"))
    finished = snakemake(tmp_path, *slurm)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-4000:]
    log = (results / "logs/distill/tiny-llama.log").read_text()
    assert "resumed from checkpoint" in log, log[-2000:]
    resumed_at = int(log.split("resumed from checkpoint")[1].split("(step ")[1].split()[0])
    assert resumed_at >= 2
    steps = pd.read_parquet(results / "training/tiny-llama/steps.parquet")
    assert steps["step"].tolist() == list(range(1, 11))

    # every job of this run (all but the local `all`) was an sbatch job, with a Slurm log named by its rule
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", output)
    assert len(submitted) == sum(planned.values()) - planned.get("all", 0), (planned, output[-3000:])
    slurm_logs = [Path(log) for _, log in submitted]
    assert all(log.is_file() for log in slurm_logs)
    rules_with_logs = {log.relative_to(results / "logs/slurm").parts[0].removeprefix("rule_") for log in slurm_logs}
    expected = {"prepare_model", "prepare_texts", "sample_corpus", "pack_tokens", "distill", "dump_hidden_states",
                "compute_convergence", "evaluate_layers", "trace_sentence", "gather_table", "plot_movement_figure",
                "plot_per_layer_figure", "plot_fig4", "plot_fig7", "plot_training"}
    assert expected - {"prepare_model", "sample_corpus", "pack_tokens"} <= rules_with_logs, sorted(rules_with_logs)
    queue = subprocess.run(["squeue", "--states=all", "--format=%i %j %T %M"], capture_output=True, text=True)
    print("squeue --states=all after the run:\n" + queue.stdout)  # shown with -s / in CI logs
    assert queue.stdout.count("COMPLETED") >= 10, queue.stdout

    # 3. Nothing left to do.
    assert planned_jobs(snakemake(tmp_path, *slurm, "-n")) == set()
