"""What a distillation job asks of a scheduler, and how it starts its processes: one place for both.

Three shapes (``distill.resources`` in the config):

=================  =========================================  =========================================
shape              Snakemake resources (→ sbatch)              processes
=================  =========================================  =========================================
CPU / 1 GPU        ``gpu=G`` (``--gpus=G``)                   ``hsconv distill``: one process
1 node × G GPUs    ``gpu=G`` (``--gpus=G``), no ``tasks``     ``torchrun --nproc_per_node G``: G processes
N nodes × G GPUs   ``gres=gpu:G`` per node, ``nodes=N``,      ``srun --ntasks-per-node=1 torchrun --nnodes N
                   ``tasks=N``, ``mpi``, ``tasks_per_gpu=0``  --nproc_per_node G --rdzv_endpoint <first node>``
=================  =========================================  =========================================

The pitfalls this avoids, with snakemake-executor-plugin-slurm (2.x): setting ``tasks`` on a GPU job becomes
``--ntasks-per-gpu``, and the job step then starts one copy of the command per task, each seeing one GPU — N
independent trainings instead of one on N GPUs. A single-node job therefore sets no task count and lets torchrun
start one process per GPU inside the one job step. A multi-node job is marked ``mpi`` so that the plugin runs the
command as it is (no ``srun -n1`` around it) and the command starts one launcher per node itself through ``srun``;
its GPUs are requested once, per node, as GRES (``tasks_per_gpu=0`` keeps the plugin from adding a task count).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from hsconv.errors import InputError

LAUNCHERS = ("auto", "none", "torchrun", "deepspeed")
RENDEZVOUS_PORT = 29500
# Host memory per parameter and process: the student and the frozen target are each loaded in float32 before they
# move to the GPU (or stay on the CPU).
HOST_BYTES_PER_PARAMETER = 8
# AdamW's two moments and the float32 master weights, on the host when the optimizer is offloaded (or on CPU).
OPTIMIZER_BYTES_PER_PARAMETER = 12
# The interpreter with torch, transformers and DeepSpeed imported.
BASE_MEMORY_MB = 2048


def processes_per_node(gpus: int) -> int:
    return max(gpus, 1)


def distill_resources(gpus: int, nodes: int, runtime: int) -> dict:
    """Snakemake resources of the ``distill`` rule for a shape, less memory (:func:`distill_mem_mb`)."""
    resources = {"runtime": runtime}
    if nodes > 1:
        if gpus < 1:
            raise InputError(f"a {nodes}-node distillation needs distill.resources.gpus >= 1 (GPUs per node)")
        resources.update(nodes=nodes, gres=f"gpu:{gpus}", tasks=nodes, tasks_per_gpu=0, mpi="srun")
    elif gpus > 0:
        resources.update(nodes=1, gpu=gpus)
    return resources


def distill_launcher(launcher: str, gpus: int, nodes: int) -> str:
    """The command that starts ``hsconv``'s distill stage with one process per GPU (or one on CPU)."""
    if launcher not in LAUNCHERS:
        raise InputError(f"distill.launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    per_node = processes_per_node(gpus)
    if launcher == "auto":
        launcher = "torchrun" if per_node * nodes > 1 else "none"
    if launcher == "none":
        if per_node * nodes > 1:
            raise InputError(f"distill.launcher 'none' starts one process, but {nodes} node(s) × {gpus} GPU(s) "
                             f"were asked for; use auto or torchrun")
        return "hsconv"
    if launcher == "deepspeed":
        if nodes > 1:
            raise InputError("distill.launcher 'deepspeed' needs a hostfile and ssh between nodes; use torchrun, "
                             "which takes the rendezvous from Slurm")
        return f"deepspeed --num_nodes 1 --num_gpus {per_node} --module hsconv.cli"
    if nodes == 1:
        return f"torchrun --standalone --nnodes 1 --nproc_per_node {per_node} -m hsconv.cli"
    # One torchrun per node, started by srun inside the allocation; every node meets at the first one. The
    # endpoint is expanded once, on the batch host, before srun runs.
    return (f"srun --nodes {nodes} --ntasks-per-node 1 torchrun --nnodes {nodes} --nproc_per_node {per_node}"
            f' --rdzv_backend c10d --rdzv_id "$SLURM_JOB_ID"'
            f' --rdzv_endpoint "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):{RENDEZVOUS_PORT}"'
            f" -m hsconv.cli")


def parameter_count(model_dir: str | os.PathLike) -> int | None:
    """Parameters of a prepared model, from its safetensors headers (no weights are read); None if unknown."""
    from safetensors import safe_open

    from hsconv.models import read_manifest, weights_dir

    try:
        directory = weights_dir(Path(model_dir), read_manifest(Path(model_dir)))
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                total += math.prod(handle.get_slice(name).get_shape())
    return total


def distill_mem_mb(configured_mb: int, parameters: int | None, gpus: int, nodes: int, offload: bool) -> int:
    """Host memory (MB per node) a distillation job asks for: the configured floor, or what the model needs."""
    if not parameters:
        return configured_mb
    per_node = processes_per_node(gpus)
    needed = parameters * HOST_BYTES_PER_PARAMETER * per_node
    if offload or gpus == 0:
        needed += parameters * OPTIMIZER_BYTES_PER_PARAMETER // nodes
    return max(configured_mb, math.ceil(needed / 2**20) + BASE_MEMORY_MB)
