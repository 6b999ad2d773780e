"""Fault injection for the tests, in one place: environment variables that make a stage die or slow down at a chosen
point, so that tests can prove what a real crash or a scheduler's time limit leaves behind. Unset (always, outside
the tests), each hook does nothing.

- ``HSCONV_KILL_BEFORE_RENAME=<folder>``: a process about to rename its first finished output into place
  (:func:`hsconv.io.atomic_path`) SIGKILLs itself instead, unless that output was killed once already (a marker file
  in the folder records it, with whether the target existed). Each stage is killed once at its worst moment, to prove
  that it leaves nothing that looks complete and that its rerun writes the same bytes. Where the folder holds
  ``KILL_SELECTION`` ({job: [its declared outputs]}), only those jobs are killed, each once, just before it renames
  one of its declared outputs (a sample of the jobs, for CI).
- ``HSCONV_KILL_AFTER_STEP=<n>``: the trainer SIGKILLs itself right after optimizer step n (and its checkpoint, if
  one is due), to prove that a run killed at any point resumes to the same result. With ``HSCONV_KILL_RANK=<r>``,
  only rank r of a multi-process run does: one rank dies and the others are left waiting on it.
- ``HSCONV_MIN_STEP_SECONDS=<s>``: every optimizer step lasts at least s seconds, so that a scheduler's time limit
  (Slurm's, in tests/test_slurm.py) reliably falls in the middle of a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

KILL_BEFORE_RENAME_ENV = "HSCONV_KILL_BEFORE_RENAME"
KILL_SELECTION = "selected_jobs.json"
KILL_AFTER_STEP_ENV = "HSCONV_KILL_AFTER_STEP"
KILL_RANK_ENV = "HSCONV_KILL_RANK"
MIN_STEP_SECONDS_ENV = "HSCONV_MIN_STEP_SECONDS"
_first_rename_done = False


def maybe_kill_before_rename(path: Path) -> None:
    """The ``HSCONV_KILL_BEFORE_RENAME`` hook, called by :func:`hsconv.io.atomic_path` before its rename."""
    global _first_rename_done
    folder = os.environ.get(KILL_BEFORE_RENAME_ENV)
    if not folder or _first_rename_done:
        return
    path = path.resolve()
    selection = Path(folder) / KILL_SELECTION
    if selection.is_file():
        jobs = json.loads(selection.read_text())
        job = next((job for job, outputs in jobs.items()
                    if any(path == Path(output) or Path(output) in path.parents for output in outputs)), None)
        if job is None:
            return  # not a selected job's output (or a selected job's scratch, such as a checkpoint)
        record = {"job": job}  # once per job, whichever of its outputs it renames first
    else:
        record = {}  # once per output path
    _first_rename_done = True
    marker = Path(folder) / hashlib.sha256(json.dumps(record or str(path)).encode()).hexdigest()[:16]
    if marker.exists():
        return
    marker.write_text(json.dumps({"path": str(path), "existed": path.exists(), **record}))
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class TrainingFaults:
    """The trainer's hooks, read from the environment once when a run starts."""

    kill_after_step: int = 0
    min_step_seconds: float = 0.0
    kill_rank: int | None = None  # None: every rank

    @classmethod
    def from_environment(cls) -> TrainingFaults:
        rank = os.environ.get(KILL_RANK_ENV)
        return cls(int(os.environ.get(KILL_AFTER_STEP_ENV, "0") or 0),
                   float(os.environ.get(MIN_STEP_SECONDS_ENV, "0") or 0), int(rank) if rank else None)

    def pace(self, started: float) -> None:
        """Sleep out the rest of ``min_step_seconds`` since ``started`` (a ``time.perf_counter()`` value)."""
        if self.min_step_seconds:
            time.sleep(max(0.0, self.min_step_seconds - (time.perf_counter() - started)))

    def after_step(self, step: int, rank: int = 0) -> None:
        """Called once a step (and its checkpoint) is done."""
        if self.kill_after_step and step == self.kill_after_step and self.kill_rank in (None, rank):
            log.warning("%s=%d: killing this process (rank %d)", KILL_AFTER_STEP_ENV, self.kill_after_step, rank)
            os.kill(os.getpid(), signal.SIGKILL)
