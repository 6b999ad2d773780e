"""Self-distillation of one model under DeepSpeed ZeRO, with checkpoints that a killed run resumes from.

``distill(...)`` is the whole stage: read the packed tokens, train the student against its frozen pretrained self,
save the result as an ordinary HF model directory, and write the training log. Run it as ``hsconv distill`` in one
process (CPU, one GPU) or under ``torchrun``/``deepspeed`` for several GPUs or nodes: the launcher sets RANK and
WORLD_SIZE, and every rank runs the same code on its slice of each batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from hsconv.corpus import read_sequences
from hsconv.distill.loss import LossTerms, layer_weights, use_compile
from hsconv.distill.objective import SelfDistillation
from hsconv.errors import check_device_available
from hsconv.faults import TrainingFaults
from hsconv.flags import Device, flag, flags
from hsconv.io import atomic_path, sha256_file, stable_hash, write_parquet
from hsconv.models import (
    MODEL_MANIFEST,
    LoadedModel,
    context_length,
    load_model,
    read_manifest,
)
from hsconv.precision import resolve_precision
from hsconv.readout import final_norm_module
from hsconv.settings import DistillSettings, LossSettings, TrainingError, TrainSettings  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from hsconv.distill.teacher import TeacherCache

log = logging.getLogger(__name__)

CHECKSUMS = "sha256.json"


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay from 1 to ``min_ratio`` at ``total_steps`` (step counts from 0)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _init_distributed(device_type: str) -> tuple[int, int, int]:
    """One process gets a single-rank process group; torchrun/deepspeed launchers have set the environment."""
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def resolve_zero_stage(setting: int | str, world_size: int, bf16: bool, accumulation: int,
                       offload_optimizer: bool = False) -> int:
    """The ZeRO stage for a setting of ``auto``, the fastest per step on the default (bench.distill_profile).

    In bf16 without gradient accumulation, stage 1 with float32 gradients: DeepSpeed's bf16 optimizer, one flat
    float32 master. With accumulation, 2: DeepSpeed 0.19's bf16 optimizer counted the first micro-batch's gradient
    twice there (a 1.6× gradient norm on a tiny model; the same run without accumulation matched ZeRO-2 exactly), and
    ZeRO-0 in bf16 sums gradients in bf16. In float32, no ZeRO on one rank (partitions of one save no memory and
    their copies cost time), 2 on several. ZeRO-Offload is part of ZeRO: 2.
    """
    if setting != "auto":
        return int(setting)
    if offload_optimizer:
        return 2
    if bf16:
        return 1 if accumulation == 1 else 2
    return 2 if world_size > 1 else 0


def _bf16_optimizer(bf16: bool, zero_stage: int, accumulation: int) -> bool:
    """Whether to ask for DeepSpeed's bf16 optimizer (float32 gradient sums under ZeRO-1); see resolve_zero_stage."""
    return bf16 and zero_stage == 1 and accumulation == 1


def _deepspeed_config(settings: TrainSettings, accumulation: int, bf16: bool, zero_stage: int) -> dict:
    zero = {"stage": zero_stage}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": settings.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        **({"data_types": {"grad_accum_dtype": "fp32"}} if _bf16_optimizer(bf16, zero_stage, accumulation) else {}),
        "steps_per_print": 10**9,  # hsconv logs progress itself
        "wall_clock_breakdown": False,
    }
    if settings.offload_optimizer:
        # ZeRO-Offload wants DeepSpeed's CPU Adam, which DeepSpeed builds from this section.
        config["optimizer"] = {"type": "AdamW", "params": {"lr": settings.learning_rate,
                                                           "betas": list(settings.adam_betas),
                                                           "weight_decay": settings.weight_decay}}
    return config


def _first_non_finite(terms) -> str | None:
    # Per-layer terms first: the shallowest non-finite one is where the problem starts.
    exits = range(len(terms.kl)) if terms.exits is None else terms.exits
    named = [(f"KL at layer {layer}", terms.kl[layer]) for layer in exits]
    named += [(f"hidden-state step at layer {layer}", value) for layer, value in enumerate(terms.step, start=1)]
    named += [("ζ1 (weighted KL)", terms.zeta1), ("ζ2 (weighted hidden-state steps)", terms.zeta2)]
    for name, value in named:
        if not torch.isfinite(value).all():
            return f"{name} = {value.item()}"
    return None


class _Checkpoints:
    """DeepSpeed checkpoints under ``root``, one tag per optimizer step; only the newest few are kept.

    Each finished tag gets a ``sha256.json`` of its files. A tag without it was still being written when the run
    died; a tag whose files no longer match it was damaged on disk. Neither is resumed from: the newest intact
    tag is, and the damaged one is named in the log.
    """

    def __init__(self, root: Path, keep: int):
        self.root, self.keep = root, keep

    def tags(self) -> list[str]:
        return sorted(path.name for path in self.root.glob("step*") if path.is_dir())

    def save(self, engine, step: int, client_state: dict, rank: int) -> None:
        tag = f"step{step:07d}"
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state)
        except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
            message = f"could not write checkpoint {self.root / tag} ({error}); it has no checksums, so a rerun " \
                      "will not resume from it"
            code = getattr(error, "errno", None)
            raise (OSError(code, message) if code else OSError(message)) from error
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's shard is on disk before it is summed up
        if rank == 0:
            files = sorted(path for path in (self.root / tag).rglob("*") if path.is_file())
            checksums = {str(path.relative_to(self.root / tag)): sha256_file(path) for path in files}
            with atomic_path(self.root / tag / CHECKSUMS) as tmp:
                tmp.write_text(json.dumps(checksums, indent=1))
            for old in self.tags()[:-self.keep]:
                shutil.rmtree(self.root / old, ignore_errors=True)

    def problem(self, tag: str) -> str | None:
        """Why the tag cannot be resumed from, or None when it is intact."""
        listing = self.root / tag / CHECKSUMS
        if not listing.is_file():
            return "it was not finished (no checksums)"
        for name, expected in json.loads(listing.read_text()).items():
            path = self.root / tag / name
            if not path.is_file():
                return f"{path} is missing"
            if sha256_file(path) != expected:
                return f"{path} does not match its checksum (truncated or damaged)"
        return None

    def newest_intact(self) -> str | None:
        """The newest tag to resume from; raises when there are checkpoints and every one is damaged."""
        damaged, any_finished = [], False
        for tag in reversed(self.tags()):
            problem = self.problem(tag)
            if problem is None:
                return tag
            log.warning("not resuming from checkpoint %s: %s", tag, problem)
            damaged.append(f"{tag}: {problem}")
            any_finished |= (self.root / tag / CHECKSUMS).is_file()
        if any_finished:
            raise TrainingError(f"every checkpoint under {self.root} is damaged ({'; '.join(damaged)}); delete the "
                                f"folder to train from the start")
        return None



@dataclass
class StepStats:
    """One optimizer step's statistics, summed over its micro-batches (and, after :meth:`all_reduce`, over ranks)."""

    zetas: torch.Tensor  # ζ, ζ1, ζ2
    kl_sums: torch.Tensor  # per exit (L + 1): KL summed over the micro-batches that computed it
    kl_counts: torch.Tensor  # per exit: how many did (all of them without exit sampling)
    hidden_steps: torch.Tensor  # per layer 1..L: the hidden-state step
    tokens: torch.Tensor  # one value
    plain_grad_norm: float | None = None  # where DeepSpeed reports none (_plain_grad_norm); not summed over ranks

    @classmethod
    def zeros(cls, num_layers: int) -> StepStats:
        return cls(*(torch.zeros(size, dtype=torch.float64)
                     for size in (3, num_layers + 1, num_layers + 1, num_layers, 1)))

    def add(self, terms: LossTerms) -> None:
        self.zetas += torch.stack([terms.total.detach(), terms.zeta1.detach(), terms.zeta2.detach()]).double().cpu()
        self.kl_sums += terms.kl.double().cpu().nan_to_num(0.0)
        self.kl_counts += (~terms.kl.isnan()).double().cpu()
        self.hidden_steps += terms.step.double().cpu()
        self.tokens += float(terms.tokens)

    def all_reduce(self, device: torch.device) -> StepStats:
        """The sums over every rank, in one collective."""
        parts = [getattr(self, field.name) for field in fields(self) if field.name != "plain_grad_norm"]
        packed = torch.cat(parts).to(device)
        torch.distributed.all_reduce(packed)
        return StepStats(*packed.cpu().split([part.numel() for part in parts]), self.plain_grad_norm)

    def rows(self, step: int, micro_batches: int, weights: list[float]) -> tuple[dict, list[dict]]:
        """The step log's loss columns (means over micro-batches) and the layer log's rows."""
        zeta, zeta1, zeta2 = (self.zetas / micro_batches).tolist()
        kl = (self.kl_sums / self.kl_counts).tolist()  # NaN at an exit no micro-batch sampled
        hidden_steps = (self.hidden_steps / micro_batches).tolist()
        layer_rows = [{"step": step, "layer": layer, "weight": weights[layer], "kl": kl[layer],
                       "hidden_step": hidden_steps[layer - 1] if layer else float("nan")}
                      for layer in range(len(kl))]
        return {"zeta": zeta, "zeta1": zeta1, "zeta2": zeta2}, layer_rows


@dataclass
class _Plan:
    """What a run trains, checked before any process group exists."""

    name: str
    base: LoadedModel  # becomes the student
    ids: np.ndarray
    n_tokens: np.ndarray
    accumulation: int
    steps_per_epoch: int
    total_steps: int
    last_step: int
    cache: TeacherCache | None  # the frozen model's top-k, read instead of recomputed


@flags(model_dir="the pretrained model directory (student and target)",
       tokens_path=flag("packed tokens (Parquet) from pack-tokens", name="--tokens"),
       out_dir=flag("model directory to write", name="--out"), log_out="per-step training log (Parquet)",
       layers_out="per-step, per-layer KL and hidden-state steps (Parquet)",
       checkpoint_dir=flag("DeepSpeed checkpoint directory (resumed from)", name="--checkpoints"),
       settings="the config's distill section, as JSON", name="the model's name, for logs and messages",
       teacher_cache="read the frozen model's distribution from this cache (cache-teacher; needs teacher_top_k in "
                     "--settings) instead of running the frozen model")
def distill(model_dir: str | os.PathLike, tokens_path: str | os.PathLike, out_dir: str | os.PathLike,
            log_out: str | os.PathLike, layers_out: str | os.PathLike, checkpoint_dir: str | os.PathLike,
            settings: DistillSettings, device: Device = "cpu", name: str | None = None,
            teacher_cache: str | os.PathLike | None = None) -> dict:
    """Train, save the distilled model to ``out_dir`` and the per-step and per-layer logs; returns a summary.

    ``teacher_cache`` (with the ``teacher_top_k`` setting): a directory written by ``hsconv cache-teacher`` for
    these packed rows; the frozen model's distribution is read from it and no target model is loaded."""
    plan = _plan(model_dir, tokens_path, settings, device, name, teacher_cache)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    rank, world, local_rank = _init_distributed(device_type)
    # An exit with the group alive lets gloo's threads be torn down by the C++ runtime, which can abort
    # ("terminate called without an active exception", exit -6) after a run that finished.
    try:
        engine, scheduler, bf16, frozen = _engine(plan, model_dir, settings, device_type, local_rank)
        settings_record = {"distill": settings.to_dict(), "precision": "bfloat16" if bf16 else "float32",
                           "zero_stage": engine.zero_optimization_stage(), "compiled": engine.module.compile_kernels,
                           "compiled_layers": engine.module.compiled_layers,
                           "world_size": world,
                           "tokens": str(tokens_path), "sequences": int(len(plan.ids)),
                           "sequence_length": int(plan.ids.shape[1])}
        if plan.cache is not None:
            settings_record["teacher_cache"] = {key: plan.cache.manifest[key]
                                                for key in ("top_k", "tokens_sha256", "dtype")}
        checkpoints = _Checkpoints(Path(checkpoint_dir) / stable_hash(settings_record), settings.train.keep_checkpoints)
        log.info("distilling %s: %d sequences × %d tokens, %d steps of %d sequences (%d per forward × %d accumulation "
                 "× %d ranks), %s, ZeRO stage %d, %s", plan.name, len(plan.ids), plan.ids.shape[1], plan.last_step,
                 settings.train.batch_size, settings.train.micro_batch_size, plan.accumulation, world,
                 "bf16" if bf16 else "float32", settings_record["zero_stage"],
                 ("compiled layers and loss kernels" if settings_record["compiled_layers"] else
                  "compiled loss kernels" if settings_record["compiled"] else "eager"))
        step_rows, layer_rows = _train(engine, scheduler, plan, settings, checkpoints, settings_record, rank, world)
        state = _master_weights(engine, frozen)  # every rank: assembling ZeRO's partitions is a collective
        if rank == 0:
            _save_model(state, plan.base, model_dir, out_dir, plan.name, settings_record)
            provenance = {"model": plan.name, "settings": settings_record}
            write_parquet(pd.DataFrame(step_rows), log_out, {"distill": provenance})
            write_parquet(pd.DataFrame(layer_rows), layers_out, {"distill": provenance})
        if world > 1:
            torch.distributed.barrier()
        summary = {"model": plan.name, "steps": len(step_rows), "tokens": step_rows[-1]["tokens"] if step_rows else 0,
                   "final_zeta": step_rows[-1]["zeta"] if step_rows else None}
        log.info("distilled %s: %s", plan.name, json.dumps(summary))
        return summary
    finally:
        torch.distributed.destroy_process_group()


def _plan(model_dir, tokens_path, settings: DistillSettings, device: str, name: str | None, teacher_cache) -> _Plan:
    """Everything that can be wrong with the settings or data, checked before any process group exists."""
    train, loss_settings = settings.train, settings.loss
    if (teacher_cache is None) != (loss_settings.teacher_top_k is None):
        raise TrainingError("teacher_top_k is set but no teacher cache was given (--teacher-cache)"
                            if teacher_cache is None else
                            "a teacher cache was given but teacher_top_k is not set")
    world = int(os.environ.get("WORLD_SIZE", 1))
    accumulation, remainder = divmod(train.batch_size, world * train.micro_batch_size)
    if remainder or accumulation == 0:
        raise TrainingError(f"batch_size={train.batch_size} is not a multiple of micro_batch_size × ranks = "
                            f"{train.micro_batch_size} × {world}")
    check_device_available(device)
    base = load_model(model_dir, dtype="float32", device="cpu")
    name = name or base.name
    exits = base.num_layers + 1
    if loss_settings.exit_samples is not None and loss_settings.exit_samples > exits:
        raise TrainingError(f"{loss_settings.exit_samples} exits to sample, but model {name!r} has {exits}",
                            "distill.exit_samples", f"set at most {exits}, or null for the exact loss on every exit")
    ids, n_tokens = read_sequences(tokens_path, context_length(base.model.config), name)
    steps_per_epoch = len(ids) // train.batch_size
    if steps_per_epoch == 0:
        raise TrainingError(f"{tokens_path} has {len(ids)} sequences, fewer than one batch of {train.batch_size}; "
                            f"raise packing.token_budget or lower distill.batch_size")
    total_steps = steps_per_epoch * train.epochs
    cache = None
    if teacher_cache is not None:
        from hsconv.distill.teacher import TeacherCache

        cache = TeacherCache(teacher_cache)
        cache.check(tokens_path, loss_settings.teacher_top_k, base.model.get_output_embeddings().weight.shape[0])
    return _Plan(name, base, ids, n_tokens, accumulation, steps_per_epoch, total_steps,
                 min(total_steps, train.max_steps or total_steps), cache)


def _compile(settings: DistillSettings, student, target, zero_stage: int) -> tuple[bool, bool]:
    """Whether the loss's kernels and the decoder layers are compiled (``distill.compile``); compiles the layers."""
    train = settings.train
    compiled = use_compile(train.compile, settings.loss.chunk_tokens, student.config.vocab_size)
    # auto leaves ZeRO-3's layers alone: their weights are gathered by hooks around each module's call, which a
    # compiled layer would trace through (always still compiles them)
    compile_layers = compiled and not train.gradient_checkpointing and (train.compile == "always" or zero_stage < 3)
    if compile_layers:
        # Fuses each layer's elementwise work (norms, rotary, SiLU) in forward and backward: the default's bf16 step
        # took 1.69 s against 1.9-2.0 s with only the loss kernels compiled (separate runs on a 2-core AMX CPU,
        # 2026-12-08); compiled in place, so parameter names and checkpoints are as before.
        for model in (student, target):
            if model is not None:
                for layer in getattr(model.get_decoder(), "layers", ()):
                    layer.compile()
    return compiled, compile_layers


def _engine(plan: _Plan, model_dir, settings: DistillSettings, device_type: str, local_rank: int):
    """The DeepSpeed engine around student + frozen target, its learning-rate schedule, whether it runs bf16, and the
    frozen parameters' pretrained float32 values (a bf16 engine rounds the module's copies, and frozen parameters
    have no float32 master)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    train = settings.train
    # auto: bf16 where the device multiplies it natively (a SmolLM2 step runs 1.45x faster than float32 on an AMX
    # CPU, docs/findings.md §13); float32 where bf16 would be emulated, many times slower
    bf16 = resolve_precision(train.precision, device_type) == "bfloat16"
    torch_device = torch.device(get_accelerator().device_name(local_rank)) if device_type == "cuda" else \
        torch.device("cpu")
    if train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(train.seed)
    student = plan.base.model
    if train.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    trainable = _trainable_parameters(student, train.frozen)
    frozen = {name: parameter.detach().to("cpu", torch.float32, copy=True)
              for name, parameter in student.named_parameters() if not parameter.requires_grad}
    target = None
    if plan.cache is None:
        target = load_model(model_dir, dtype="bfloat16" if bf16 else "float32", device=str(torch_device)).model
    zero_stage = resolve_zero_stage(train.zero_stage, torch.distributed.get_world_size(), bf16, plan.accumulation,
                                    train.offload_optimizer)
    compiled, compile_layers = _compile(settings, student, target, zero_stage)
    module = SelfDistillation(student, target, settings.loss, compile_kernels=compiled)
    module.compiled_layers = compile_layers
    optimizer = None
    if not train.offload_optimizer:
        # fused: one kernel over all parameters instead of a dozen passes over memory (bench.distill_profile:
        # the optimizer's share of the default's step fell from a third to under a tenth on CPU); the same update
        optimizer = torch.optim.AdamW(trainable, lr=train.learning_rate, betas=train.adam_betas,
                                      weight_decay=train.weight_decay, fused=True)

    # Given as a callable, DeepSpeed builds the schedule on its own optimizer, steps it at each accumulation
    # boundary and keeps its state in the checkpoints.
    def schedule(wrapped_optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            wrapped_optimizer, lambda index: lr_factor(index, train.warmup_steps, plan.total_steps, train.min_lr_ratio))

    engine, _, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer,
                                                   config=_deepspeed_config(train, plan.accumulation, bf16,
                                                                            zero_stage),
                                                   lr_scheduler=schedule,
                                                   model_parameters=None if optimizer else trainable)
    if zero_stage == 3:
        module.register_for_zero3()  # needs the partitioned parameters that initialize() made
    return engine, scheduler, bf16, frozen


def _trainable_parameters(student: torch.nn.Module, frozen: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """The student's parameters that train: all but the frozen parts, which keep their pretrained values (no gradient,
    not in the optimizer). Freezing the embeddings freezes a tied LM head with them (one tensor)."""
    if "embeddings" in frozen:
        student.get_input_embeddings().requires_grad_(False)
    if "final_norm" in frozen:
        final_norm_module(student).requires_grad_(False)
    return [parameter for parameter in student.parameters() if parameter.requires_grad]


def _train(engine, scheduler, plan: _Plan, settings: DistillSettings, checkpoints: _Checkpoints,
           settings_record: dict, rank: int, world: int) -> tuple[list[dict], list[dict]]:
    """The step loop, from the newest intact checkpoint (or the start) to the last step: the step and layer logs."""
    train = settings.train
    step, step_rows, layer_rows = 0, [], []
    resume_tag = checkpoints.newest_intact()
    if resume_tag:
        _, client = engine.load_checkpoint(str(checkpoints.root), tag=resume_tag)
        step, step_rows, layer_rows = client["step"], client["step_rows"], client["layer_rows"]
        log.info("resumed from checkpoint %s (step %d of %d)", resume_tag, step, plan.last_step)
    else:
        log.info("no checkpoint in %s; starting from the pretrained model", checkpoints.root)
    # ζ1's weight of each exit as logged: w_l, and w_L + β for the output exit (output_kl_weight)
    weights = layer_weights(plan.base.num_layers, settings.loss.k).tolist()
    weights[-1] += settings.loss.output_kl_weight
    faults = TrainingFaults.from_environment()
    tokens_seen = step_rows[-1]["tokens"] if step_rows else 0
    started_run, first_step = time.perf_counter(), step
    while step < plan.last_step:
        started, lr = time.perf_counter(), scheduler.get_last_lr()[0]
        stats = _step(engine, plan, train, step, rank, world)
        if world > 1:
            stats = stats.all_reduce(engine.device)
        step += 1
        faults.pace(started)
        elapsed = time.perf_counter() - started
        tokens = int(stats.tokens.item())
        tokens_seen += tokens
        losses, layers = stats.rows(step, plan.accumulation * world, weights)
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = stats.plain_grad_norm
        step_rows.append({"step": step, "epoch": (step - 1) // plan.steps_per_epoch, "tokens": tokens_seen,
                          "lr": lr, **losses, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                          "seconds": elapsed, "tokens_per_second": tokens / elapsed})
        layer_rows.extend(layers)
        # Steps of this process only: a resumed run's earlier steps took their time in another process.
        remaining = (plan.last_step - step) * (time.perf_counter() - started_run) / (step - first_step)
        log.info("step %d/%d  ζ=%.5f ζ1=%.5f ζ2=%.5f  lr=%.2e  |g|=%.3f  %.1f tokens/s  ~%.0f s left", step,
                 plan.last_step, losses["zeta"], losses["zeta1"], losses["zeta2"], lr, step_rows[-1]["grad_norm"],
                 tokens / elapsed, remaining)
        if step % train.checkpoint_every == 0 or step == plan.last_step:
            checkpoints.save(engine, step, {"step": step, "step_rows": step_rows, "layer_rows": layer_rows,
                                            "settings": settings_record}, rank)
        faults.after_step(step, rank)
    return step_rows, layer_rows


def micro_batches(n_rows: int, batch_size: int, micro_batch_size: int, seed: int, step: int, rank: int,
                  world: int) -> list[tuple[int, np.ndarray]]:
    """This rank's micro-batches of an optimizer step: (global micro-batch index, row indices) pairs.

    Each epoch is a seeded permutation of the rows cut into batches of ``batch_size`` (the last ``n_rows mod
    batch_size`` rows of the permutation wait for the next epoch's). Rank r takes the r-th of ``world`` equal
    consecutive slices of the batch, cut into micro-batches; micro-batch i of rank r is the batch's global micro-batch
    r·(micro-batches per rank) + i, so that one process with more accumulation sees the same micro-batches in the same
    order."""
    steps_per_epoch = n_rows // batch_size
    epoch, index_in_epoch = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    batch = order[index_in_epoch * batch_size:(index_in_epoch + 1) * batch_size]
    per_rank = batch_size // world
    mine = batch[rank * per_rank:(rank + 1) * per_rank]
    first = rank * (per_rank // micro_batch_size)
    return [(first + index, mine[start:start + micro_batch_size])
            for index, start in enumerate(range(0, per_rank, micro_batch_size))]


def exit_draw_seed(seed: int, step: int, global_micro_batch: int) -> int:
    """The seed of a micro-batch's draw of exits (``exit_samples``): a function of the global micro-batch, not of the
    rank, so that a run on several ranks draws what one process draws. (The trailing 0 stands where the rank was,
    with the per-rank index: one process's draws are those of runs made before.)"""
    return int(np.random.default_rng([seed, step, global_micro_batch, 0]).integers(2**62))


def _step(engine, plan: _Plan, train: TrainSettings, step: int, rank: int, world: int) -> StepStats:
    """One optimizer step on this rank's share of the step's batch (:func:`micro_batches`)."""
    stats = StepStats.zeros(plan.base.num_layers)
    for micro, rows in micro_batches(len(plan.ids), train.batch_size, train.micro_batch_size, train.seed, step, rank,
                                     world):
        input_ids = torch.from_numpy(plan.ids[rows]).to(engine.device)
        mask = (torch.arange(plan.ids.shape[1])[None, :] < torch.from_numpy(plan.n_tokens[rows])[:, None]).long()
        cached = None if plan.cache is None else plan.cache.rows(rows, engine.device)
        terms = engine(input_ids, mask.to(engine.device), exit_seed=exit_draw_seed(train.seed, step, micro),
                       cached_target=cached)
        problem = _first_non_finite(terms)
        if problem:
            raise FloatingPointError(f"model {plan.name!r}, step {step + 1}, micro-batch {micro + 1}: non-finite "
                                     f"loss term {problem} (lower the learning rate, or use float32)")
        engine.backward(terms.total)
        if engine.is_gradient_accumulation_boundary():
            stats.plain_grad_norm = _plain_grad_norm(engine)
        engine.step()
        stats.add(terms)
    return stats


def _plain_grad_norm(engine) -> float | None:
    """The gradient's norm where DeepSpeed does not report one: without ZeRO in float32 the engine clips with torch's
    own clip_grad_norm_ and keeps no norm. None where DeepSpeed's optimizer wrapper reports it."""
    if engine.zero_optimization_stage() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    gradients = [parameter.grad for parameter in engine.module.parameters() if parameter.grad is not None]
    return float(torch.nn.utils.get_total_norm(gradients)) if gradients else None


def _master_weights(engine, frozen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every trained parameter's float32 master copy, assembled from ZeRO's partitions on every rank, and every frozen
    one's pretrained value (``frozen``). The module's own weights would round a bf16 run's result to bf16, the frozen
    parts included; in a float32 run the two are the same tensors."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, parameter in engine.module.student.named_parameters():
        if name in frozen:
            state[name] = frozen[name].clone()
            continue
        master = safe_get_full_fp32_param(parameter)
        state[name] = (parameter.data if master is None else master).detach().to("cpu", torch.float32).clone()
    return state


def _save_model(state: dict[str, torch.Tensor], base, model_dir, out_dir, name: str, settings_record: dict) -> None:
    """The student (its float32 ``state``) as an ordinary HF directory (safetensors, config, tokenizer) that later
    stages load as usual."""
    student = base.model
    with atomic_path(out_dir) as tmp:
        student.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        base.tokenizer.save_pretrained(tmp)
        manifest = {"name": name, "variant": "distilled", "base": read_manifest(Path(model_dir)), "weights": None,
                    "training": settings_record}
        (tmp / MODEL_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
