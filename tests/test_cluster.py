"""Distillation job shapes against the Slurm plugin's own submit-string builder (no cluster or GPU needed)."""

from __future__ import annotations

import re

import pytest

from hsconv.cluster import distill_launcher, distill_mem_mb, distill_resources, parameter_count

submit_string = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string")
slurm_utils = pytest.importorskip("snakemake_executor_plugin_slurm.utils")
jobstep = pytest.importorskip("snakemake_executor_plugin_slurm_jobstep")


class Resources(dict):
    """What the plugin reads from ``job.resources``: ``.get`` and attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Job:
    def __init__(self, resources: dict, threads: int):
        self.resources = Resources(resources)
        self.threads = threads
        self.name = "distill"


SHAPES = {  # the three shapes documented in README.md: (GPUs per node, nodes)
    "1 GPU": (1, 1),
    "8 GPUs": (8, 1),
    "2 nodes x 8 GPUs": (8, 2),
}


def sbatch_line(gpus: int, nodes: int) -> tuple[str, Job]:
    job = Job({**distill_resources(gpus, nodes, runtime=600), "mem_mb": 64000}, threads=8)
    params = {"run_uuid": "run", "slurm_logfile": "results/logs/slurm/%j.log", "comment_str": "rule_distill",
              "account": "-A 'lab'", "partition": "-p 'batch'", "workdir": "/work"}
    return submit_string.get_submit_command(job, params) + slurm_utils.set_gres_string(job), job


@pytest.mark.parametrize("shape", SHAPES)
def test_sbatch_requests_the_gpus_once_and_no_task_per_gpu(shape):
    gpus, nodes = SHAPES[shape]
    line, _ = sbatch_line(gpus, nodes)
    requests = re.findall(r"--gpus=\S+|--gres=gpu\S*|--gpus-per-\S+", line)
    assert len(requests) == 1, line
    assert "--ntasks-per-gpu" not in line, line  # the plugin's N-copies pitfall
    assert " -t 600" in line and "--mem 64000" in line
    if nodes == 1:
        assert requests == [f"--gpus={gpus}"] and "--nodes=1" in line
    else:
        # GRES counts per node: 8 on each of the 2 nodes, and one task (one launcher) per node
        assert requests == [f"--gres=gpu:{gpus}"] and f"--nodes={nodes}" in line and f"--ntasks={nodes}" in line


@pytest.mark.parametrize("shape", SHAPES)
def test_one_process_per_gpu(shape):
    gpus, nodes = SHAPES[shape]
    _, job = sbatch_line(gpus, nodes)
    command = distill_launcher("auto", gpus, nodes)
    if "mpi" in job.resources:
        # the job step runs the command as it is; the command starts one torchrun per node through srun
        assert command.startswith(f"srun --nodes {nodes} --ntasks-per-node 1 torchrun --nnodes {nodes} "
                                   f"--nproc_per_node {gpus}")
        assert "$SLURM_JOB_NODELIST" in command and "--rdzv_backend c10d" in command
    else:
        # the job step is `srun -n1 --gpus=G ...`: one task holding every GPU of the allocation
        assert jobstep.get_gpu_setting(job) == f"--gpus={gpus}"
        assert jobstep.get_node_setting(job) == "--nodes=1"
        if gpus == 1:
            assert command == "hsconv"
        else:
            assert command == f"torchrun --standalone --nnodes 1 --nproc_per_node {gpus} -m hsconv.cli"


def test_cpu_job_asks_for_no_gpu():
    line, job = sbatch_line(0, 1)
    assert "gpu" not in line and "--ntasks=1" in line
    assert distill_launcher("auto", 0, 1) == "hsconv"


@pytest.mark.parametrize("call, message", [
    (lambda: distill_resources(0, 2, 60), "needs distill.resources.gpus >= 1"),
    (lambda: distill_launcher("none", 8, 1), "'none' starts one process"),
    (lambda: distill_launcher("deepspeed", 8, 2), "needs a hostfile"),
    (lambda: distill_launcher("mpirun", 1, 1), "is not one of"),
])
def test_impossible_shapes_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_memory_scales_with_the_model(tiny_model_dir, tiny_model):
    parameters = parameter_count(tiny_model_dir)
    assert parameters == sum(p.numel() for p in tiny_model.model.parameters())
    # a tiny model needs the interpreter's 2 GB and little more; the configured value is a floor
    assert distill_mem_mb(1000, parameters, gpus=0, nodes=1, offload=False) == 2048 + 1
    assert distill_mem_mb(9000, parameters, gpus=0, nodes=1, offload=False) == 9000
    billion = 10**9
    one_gpu = distill_mem_mb(2000, billion, gpus=1, nodes=1, offload=False)
    assert one_gpu == 8 * billion // 2**20 + 1 + 2048
    assert distill_mem_mb(2000, billion, gpus=8, nodes=1, offload=False) == -(-8 * 8 * billion // 2**20) + 2048
    assert distill_mem_mb(2000, billion, gpus=1, nodes=1, offload=True) > one_gpu  # Adam state on the host
    assert distill_mem_mb(2000, None, gpus=1, nodes=1, offload=False) == 2000
