"""A cache of the frozen model's output distribution over the packed training rows: its k most likely tokens per
position, with their log-probabilities and the log of the mass left over.

The frozen target is the same for every step, epoch and run on the same rows (the main distillation and every
ablation setting), so its forward pass can be paid once. A dense cache would hold V floats per token (98 GB per
million tokens for SmolLM2); k of them, with the rest folded into one bucket, hold 8k + 4 bytes. The trainer then
needs no target model at all. What the folding costs in ζ1 is measured by ``bench/teacher_cache.py``.

Layout of a cache directory: ``values.npy`` (rows, T, k) float32 log-probabilities, largest first; ``ids.npy``
(rows, T, k) int32; ``rest.npy`` (rows, T) float32 log of the remaining mass; ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from hsconv.corpus import read_sequences
from hsconv.distill.loss import TopKTarget, top_k_target
from hsconv.errors import InputError
from hsconv.flags import Device, flag, flags
from hsconv.io import atomic_path, sha256_file
from hsconv.models import context_length, load_model
from hsconv.names import TrainingPrecision
from hsconv.precision import resolve_precision
from hsconv.readout import decoder_states, readout

log = logging.getLogger(__name__)

TEACHER_MANIFEST = "manifest.json"


class TeacherCacheError(InputError):
    """A cache that does not belong to the model, rows or settings it is used with; the message says which."""


@flags(tokens_path=flag("packed tokens (Parquet) from pack-tokens", name="--tokens"),
       out_dir=flag("cache directory to write", name="--out"), top_k=flag("tokens kept per position", minimum=1),
       batch_size=flag(minimum=1),
       dtype="the frozen model's precision (auto: bfloat16 where this device multiplies it natively)")
def write_teacher_cache(model_dir: str | os.PathLike, tokens_path: str | os.PathLike, out_dir: str | os.PathLike,
                        top_k: int, batch_size: int = 8, dtype: TrainingPrecision = "float32",
                        device: Device = "cpu") -> dict:
    """Run the frozen model once over every packed row and keep its top-k distribution per position.

    The distribution is formed as the trainer forms q_target (the decoder's last normalised state through the LM
    head and the family's softcap, log-softmax in float32), so a cache with k = V − 1 reproduces the recomputed
    loss exactly."""
    dtype = resolve_precision(dtype, device)  # `auto` as the trainer resolves it on this machine
    loaded = load_model(model_dir, dtype=dtype, device=device)
    model = loaded.model
    ids, n_tokens = read_sequences(tokens_path, context_length(model.config), loaded.name)
    vocab = model.get_output_embeddings().weight.shape[0]
    if not 1 <= top_k < vocab:
        raise TeacherCacheError(f"teacher_top_k must be between 1 and the vocabulary size − 1 ({vocab - 1}), "
                                f"got {top_k}")
    rows, length = ids.shape
    model_readout = readout(model)
    started = time.perf_counter()
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        values = np.lib.format.open_memmap(tmp / "values.npy", mode="w+", dtype=np.float32, shape=(rows, length, top_k))
        token_ids = np.lib.format.open_memmap(tmp / "ids.npy", mode="w+", dtype=np.int32, shape=(rows, length, top_k))
        rest = np.lib.format.open_memmap(tmp / "rest.npy", mode="w+", dtype=np.float32, shape=(rows, length))
        with torch.no_grad():
            for start in range(0, rows, batch_size):
                stop = min(start + batch_size, rows)
                input_ids = torch.from_numpy(ids[start:stop]).to(device)
                mask = (torch.arange(length)[None, :] < torch.from_numpy(n_tokens[start:stop])[:, None]).long()
                hidden = decoder_states(model, input_ids, mask.to(device))["states"][-1]
                for row in range(stop - start):  # one row's V-sized logits at a time
                    log_probs = torch.log_softmax(model_readout.logits(hidden[row]).float(), dim=-1)
                    top, top_ids, left = top_k_target(log_probs, top_k)
                    values[start + row], token_ids[start + row] = top.cpu().numpy(), top_ids.int().cpu().numpy()
                    rest[start + row] = left.cpu().numpy()
                log.info("teacher cache: %d/%d rows, %.0f tokens/s", stop, rows,
                         stop * length / (time.perf_counter() - started))
        for array in (values, token_ids, rest):
            array.flush()
        del values, token_ids, rest
        manifest = {"model": loaded.name, "model_dir": str(model_dir), "top_k": top_k, "vocab": vocab, "rows": rows,
                    "sequence_length": length, "tokens": str(tokens_path), "tokens_sha256": sha256_file(tokens_path),
                    "dtype": dtype, "bytes_per_token": 8 * top_k + 4}
        (tmp / TEACHER_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    log.info("teacher cache of %s: %d rows × %d tokens, top %d -> %s (%.1f MB)", loaded.name, rows, length, top_k,
             out_dir, rows * length * manifest["bytes_per_token"] / 1e6)
    return manifest


class TeacherCache:
    """A written cache, opened for reading rows (memory-mapped: only the rows asked for are read)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        path = self.directory / TEACHER_MANIFEST
        if not path.is_file():
            raise TeacherCacheError(f"{self.directory} is not a teacher cache (no {TEACHER_MANIFEST}); write one with "
                                    "`hsconv cache-teacher`")
        self.manifest = json.loads(path.read_text())
        self.arrays = {name: np.load(self.directory / f"{name}.npy", mmap_mode="r")
                       for name in ("values", "ids", "rest")}

    def check(self, tokens_path: str | os.PathLike, top_k: int, vocab: int) -> None:
        """Refuse a cache of other rows, another k or another vocabulary than the run it is given to."""
        manifest = self.manifest
        if manifest["top_k"] != top_k:
            raise TeacherCacheError(f"teacher cache {self.directory} keeps the top {manifest['top_k']} tokens, the "
                                    f"settings ask for teacher_top_k={top_k}")
        if manifest["vocab"] != vocab:
            raise TeacherCacheError(f"teacher cache {self.directory} is over a vocabulary of {manifest['vocab']}, "
                                    f"the model's has {vocab}")
        if manifest["tokens_sha256"] != sha256_file(tokens_path):
            raise TeacherCacheError(f"teacher cache {self.directory} was written for other packed rows than "
                                    f"{tokens_path}; write it again")

    def rows(self, indices, device: torch.device | str = "cpu") -> TopKTarget:
        indices = np.asarray(indices)
        values, ids, rest = (torch.from_numpy(np.ascontiguousarray(self.arrays[name][indices])).to(device)
                             for name in ("values", "ids", "rest"))
        return TopKTarget(values=values, ids=ids.long(), rest=rest)
