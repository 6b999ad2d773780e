"""The README's first command, timed: the embedded default run from a fresh clone, the whole and every job.

    python -m bench.default_run                 # clone HEAD, run it, store the times, rewrite BENCHMARKS.md
    python -m bench.default_run --keep DIR      # keep the clone (and its results/) in DIR

A fresh ``git clone`` of the committed HEAD (uncommitted edits are not measured) gets ``../shared`` beside it, as a
checkout has, and runs ``HF_HUB_OFFLINE=1 snakemake --cores all`` there with the clone's own ``src`` first on the
path. Installation is not timed (the README states it apart). The whole run's wall-clock is measured around the
command; each job's from its Snakemake ``benchmark:`` file (every rule has one, under ``results/benchmarks/``).

Runs the embedded default after installation: every job of the default target `all`, from the packed corpus to the
figures, one after another or side by side as Snakemake schedules them on this machine's cores. The per-job seconds
add up to more than the whole where light jobs ran beside heavy ones.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, compiled_note, environment

COMMAND = ["snakemake", "--cores", "all"]  # the README's first command, after its install steps
STORE = ROOT / "bench" / "measurements" / "default_run.json"


def job_times(results: Path) -> list[dict]:
    """One row per job from its benchmark file: the rule, its wildcards (the path under the rule's folder), seconds
    and peak resident memory."""
    rows = []
    for path in sorted((results / "benchmarks").rglob("*.tsv")):
        relative = path.relative_to(results / "benchmarks").with_suffix("")
        with path.open() as handle:
            record = next(csv.DictReader(handle, delimiter="\t"))
        rows.append({"rule": relative.parts[0], "job": "/".join(relative.parts[1:]) or relative.parts[0],
                     "seconds": float(record["s"]), "max_rss_mb": float(record["max_rss"])
                     if record.get("max_rss") not in (None, "", "-", "NA") else None})
    return rows


def how_distilled(results: Path) -> dict:
    """Per distilled model, how its training ran (from its manifest): precision, ZeRO stage, compiled or not."""
    runs = {}
    for manifest in sorted(results.glob("models/*/distilled/hsconv_model.json")):
        training = json.loads(manifest.read_text()).get("training", {})
        runs[manifest.parent.parent.name] = {key: training.get(key)
                                             for key in ("precision", "zero_stage", "compiled", "compiled_layers")}
    return runs


def measure(keep: str | None = None) -> dict:
    """Clone, run the default target, time it; raise with the log's tail if the run fails."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    holder = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="hsconv-default-run-"))
    holder.mkdir(parents=True, exist_ok=True)
    clone = holder / "main"
    if clone.exists():
        raise FileExistsError(f"{clone} exists: the measurement needs a fresh clone")
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    shared = holder / "shared"
    if not shared.exists():
        shared.symlink_to((ROOT / ".." / "shared").resolve())
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(clone / "src"), os.environ.get("PYTHONPATH")]))}
    log = holder / "default_run.log"
    print(f"running {' '.join(COMMAND)} in {clone} (log: {log})", flush=True)
    started = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run(COMMAND, cwd=clone, env=env, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"the default run failed after {seconds:.0f} s; the end of {log}:\n"
                           + log.read_text()[-4000:])
    jobs = job_times(clone / "results")
    text = log.read_text()
    measured = {"commit": commit, "command": "HF_HUB_OFFLINE=1 " + " ".join(COMMAND), "seconds": seconds,
                "jobs": jobs, "profile_used": "Using workflow specific profile" in text,
                "distill": how_distilled(clone / "results")}
    if not keep:
        shutil.rmtree(holder, ignore_errors=True)
    return measured


def markdown(result: dict) -> str:
    """The whole run, then the per-rule totals (jobs, seconds, peak memory), slowest first."""
    rules: dict[str, dict] = {}
    for job in result["jobs"]:
        entry = rules.setdefault(job["rule"], {"jobs": 0, "seconds": 0.0, "max_rss_mb": 0.0})
        entry["jobs"] += 1
        entry["seconds"] += job["seconds"]
        entry["max_rss_mb"] = max(entry["max_rss_mb"], job["max_rss_mb"] or 0.0)
    lines = [f"Commit {result['commit'][:10]}, `{result['command']}` in a fresh clone: **{result['seconds'] / 60:.1f} "
             f"min** wall-clock for {len(result['jobs'])} jobs (sum of the jobs' own times "
             f"{sum(job['seconds'] for job in result['jobs']) / 60:.1f} min).", "",
             "| rule | jobs | seconds (sum) | share of the run | peak RSS (MB) |", "|---|---|---|---|---|"]
    for rule, entry in sorted(rules.items(), key=lambda item: -item[1]["seconds"]):
        lines.append(f"| {rule} | {entry['jobs']} | {entry['seconds']:,.0f} | "
                     f"{entry['seconds'] / result['seconds']:.0%} | {entry['max_rss_mb']:,.0f} |")
    for model, run in result.get("distill", {}).items():
        compiled = compiled_note(run)
        lines += ["", f"distill/{model} trained in {run['precision']}, ZeRO stage {run['zero_stage']}{compiled} "
                      f"(its `hsconv_model.json`)."]
    lines += ["", "Each job, in seconds: " + ", ".join(
        f"{job['rule']}{'/' + job['job'] if job['job'] != job['rule'] else ''} {job['seconds']:,.0f}"
        for job in sorted(result["jobs"], key=lambda job: -job["seconds"])) + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="keep the clone and its results in this folder")
    args = parser.parse_args()
    started = time.perf_counter()
    result = measure(args.keep)
    record = {"date": datetime.date.today().isoformat(), "environment": environment(),
              "seconds": time.perf_counter() - started, "result": result}
    STORE.parent.mkdir(parents=True, exist_ok=True)
    STORE.write_text(json.dumps(record, indent=1))
    print(markdown(result))
    subprocess.run([sys.executable, "-m", "bench.report", "--render-only"], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
