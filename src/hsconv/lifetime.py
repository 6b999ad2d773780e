"""A stage lives no longer than the workflow that started it.

Snakemake runs a job as ``bash -c "... hsconv <stage> ..."``. Killed with SIGKILL, it cannot stop its jobs: the stage
keeps running, writes its outputs after the workflow is gone, and races the next run for the same files. A
parent-death signal (``prctl(PR_SET_PDEATHSIG)``) would not do, as the stage's parent is the shell, which outlives
Snakemake. So the Snakefile names its own process in ``HSCONV_WORKFLOW_PID`` (host, pid and start time, which a reused
pid does not match), every process started beneath it inherits that, and each stage watches it from a daemon thread:
when it is gone, the stage says so and kills itself before writing anything more (outputs are renamed into place
only when complete, so nothing half-written is left where a run would take it for done).

On a cluster the variable names the Snakemake process inside the job (the Snakefile is read there again), which
dies with the job; a process on another host (the second node of a multi-node job) cannot see it and does not watch.
Outside Snakemake the variable is unset, and nothing is watched.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

WORKFLOW_PID_ENV = "HSCONV_WORKFLOW_PID"
POLL_SECONDS = 1.0


def start_time(pid: int) -> float:
    """When process ``pid`` started: on Linux in clock ticks since boot, elsewhere psutil's wall-clock start time.

    Not the wall-clock time on Linux: there it is the start since boot plus the boot time, which the kernel derives from
    the wall clock, so a clock adjustment (NTP) shifts it between two reads and a live workflow would look gone.
    Raises ProcessLookupError when there is no such process.
    """
    stat = Path(f"/proc/{pid}/stat")
    if sys.platform.startswith("linux"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            raise ProcessLookupError(pid) from None
        if fields[0] == "Z":  # a zombie has ended
            raise ProcessLookupError(pid)
        return float(fields[19])  # field 22 of proc_pid_stat(5), counted after the command name
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            raise ProcessLookupError(pid)
        return process.create_time()
    except psutil.NoSuchProcess:
        raise ProcessLookupError(pid) from None


def workflow_identity() -> str:
    """This process as ``HSCONV_WORKFLOW_PID`` names it: ``<host>:<pid>:<start time>``."""
    return f"{socket.gethostname()}:{os.getpid()}:{start_time(os.getpid())!r}"


def _alive(pid: int, started: float) -> bool:
    try:
        return start_time(pid) == started  # a reused pid has another start time
    except ProcessLookupError:
        return False


def stop_with_workflow(stage: str) -> None:
    """Start watching the workflow named in the environment, if any; when it is gone, this process ends (SIGKILL)."""
    value = os.environ.get(WORKFLOW_PID_ENV)
    if not value:
        return
    try:
        host, pid_text, started_text = value.rsplit(":", 2)
        pid, started = int(pid_text), float(started_text)
    except ValueError:
        log.warning("ignoring %s=%r (expected <host>:<pid>:<start time>)", WORKFLOW_PID_ENV, value)
        return
    if host != socket.gethostname() or pid == os.getpid():
        return

    def watch() -> None:
        while _alive(pid, started):
            time.sleep(POLL_SECONDS)
        print(f"hsconv {stage}: the workflow that started this job (Snakemake, pid {pid}) is gone; stopping "
              f"before anything more is written", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="hsconv-workflow-watch", daemon=True).start()
