"""Issue 18's recipe search: each distillation recipe measured by the workflow itself, one after another.

    python -m studies.recipe_search --work /tmp/recipes                  # every recipe below, then the summary
    python -m studies.recipe_search --work /tmp/recipes --only frozen16  # one (the others' snapshots are kept)
    python -m studies.recipe_search --work /tmp/recipes --summary-only --out docs/findings/recipe/summary
    python -m studies.recipe_search --work /tmp/new --only k1-16 --keep-earlier  # add to the summary's other rows

A recipe is `config.yaml` with some `distill` / `packing` keys changed, measured (movement, per-layer evaluation and
the output study) on the config's validation sets only (`split: validation`: LAMBADA passages 1-1,000 and WikiText-2
validation in the default); a recipe that would read test text is refused (``TestTextError``). Before 2026-12-06 the
recipes were measured on the texts the README reported (docs/findings.md says which). Every recipe runs in one shared run folder (``WORK/run``), so the pretrained model's dumps and
output evaluation are made once and reused (their settings do not change); after each run its tables, training logs
and benchmarks are copied to ``WORK/snapshots/NAME`` and the distilled model to ``WORK/snapshots/NAME/model``. The
summary is :mod:`studies.recipe_summary` over the snapshots; the recipe that ``config.yaml`` uses is named
``default`` there. Each run trains alone on the machine, so ``job_seconds`` is the recipe's real wall-clock.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from studies.recipe_summary import write_summary

REPO = Path(__file__).resolve().parents[1]
FROZEN = ["embeddings", "final_norm"]
# config.yaml's distill and packing keys from 2026-12-05 (§11) until §13's recipe replaced them: every recipe below
# but `default` is these keys with its own changed, so that each stays the configuration it was measured as
# (`precision` was `auto`, which meant float32 on a CPU until auto chose bf16 where it is native).
BEFORE_13 = {"distill": {"alpha": 1.0, "frozen": FROZEN, "learning_rate": 5.0e-4, "warmup_steps": 2,
                         "precision": "float32", "checkpoint_every": 8, "exit_samples": None, "exit_sampling": "uniform",
                         "output_kl_weight": 0.0, "zeta2_penalty": "step"},
             "packing": {"token_budget": 8192}}


def rises_in_bf16(weight: float, steps: int) -> dict:
    """§13–14's recipes: bf16, 4 stratified exits, ζ2 on the rises, lr 2e-4 with 10 warm-up steps, a checkpoint every
    40 steps, α = β = ``weight``, ``steps`` optimizer steps of 4 × 128 tokens."""
    return {"distill": {"frozen": FROZEN, "alpha": weight, "output_kl_weight": weight, "exit_samples": 4,
                        "exit_sampling": "stratified_keep_last", "learning_rate": 2.0e-4, "warmup_steps": 10,
                        "precision": "bfloat16", "zeta2_penalty": "rise", "checkpoint_every": 40},
            "packing": {"token_budget": steps * 512}}


# Tried in this order (docs/findings.md §10-14 say why each followed the one before). `default` is config.yaml itself,
# since 2026-12-05 §14's recipe (measured as bf16-rise-alpha16-anchor16-200); `bf16-rise-alpha4-anchor4-216` was
# `default` before it (§13), `frozen16` before that (§11), and `paper-loss16` before that.
RECIPES: dict[str, dict] = {
    "default": {},  # config.yaml
    "frozen16": {},  # BEFORE_13 itself: 16 full steps, embeddings/head and the final norm's gain frozen
    "paper-loss16": {"distill": {"frozen": []}},  # the default before: every parameter trains (the paper's)
    "frozen40": {"distill": {"frozen": FROZEN}, "packing": {"token_budget": 20480}},
    "fwdk05-16": {"distill": {"frozen": FROZEN, "kl_direction": "target_student", "k": 0.5}},
    "k1-16": {"distill": {"frozen": FROZEN, "k": 1.0}},
    "lr2e4-40": {"distill": {"frozen": FROZEN, "learning_rate": 2.0e-4}, "packing": {"token_budget": 20480}},
    # ζ2 on the normed h_L, the final norm's gain trained
    "hf16": {"distill": {"movement_convention": "hf", "frozen": []}},
    # ζ1 + β KL_L: the output exit held by its own weight, at the 15-minute budget
    "anchor4-40": {"distill": {"frozen": FROZEN, "output_kl_weight": 4.0}, "packing": {"token_budget": 20480}},
    # 3x the tokens in the same budget: 4 sampled exits (the output exit always), β = 2, lr 2e-4 over 120 steps
    "sampled-anchor2-120": {"distill": {"frozen": FROZEN, "output_kl_weight": 2.0, "exit_samples": 4,
                                        "exit_sampling": "uniform_keep_last", "learning_rate": 2.0e-4,
                                        "warmup_steps": 10}, "packing": {"token_budget": 61440}},
    # the same without the anchor: how much of the held output is β's, how much the smaller steps'
    "sampled-120": {"distill": {"frozen": FROZEN, "exit_samples": 4, "exit_sampling": "uniform_keep_last",
                                "learning_rate": 2.0e-4, "warmup_steps": 10}, "packing": {"token_budget": 61440}},
    # the two above with the lower-variance draw: the heavy late exits every time, one of each lighter band
    "stratified-anchor2-120": {"distill": {"frozen": FROZEN, "output_kl_weight": 2.0, "exit_samples": 4,
                                           "exit_sampling": "stratified_keep_last", "learning_rate": 2.0e-4,
                                           "warmup_steps": 10}, "packing": {"token_budget": 61440}},
    "stratified-120": {"distill": {"frozen": FROZEN, "exit_samples": 4, "exit_sampling": "stratified_keep_last",
                                   "learning_rate": 2.0e-4, "warmup_steps": 10}, "packing": {"token_budget": 61440}},
    # between β = 0 (S 0.85, the output lost) and β = 2 (the output held, S 0.80): is there a point near the corner?
    "stratified-anchor05-120": {"distill": {"frozen": FROZEN, "output_kl_weight": 0.5, "exit_samples": 4,
                                            "exit_sampling": "stratified_keep_last", "learning_rate": 2.0e-4,
                                            "warmup_steps": 10}, "packing": {"token_budget": 61440}},
    "stratified-anchor1-120": {"distill": {"frozen": FROZEN, "output_kl_weight": 1.0, "exit_samples": 4,
                                           "exit_sampling": "stratified_keep_last", "learning_rate": 2.0e-4,
                                           "warmup_steps": 10}, "packing": {"token_budget": 61440}},
    # bf16 on the CPU's AMX units: a logged step 1.45x faster (3.29 against 4.77 s), so 15 minutes take 2x the tokens
    "bf16-stratified-anchor1-240": {"distill": {"frozen": FROZEN, "output_kl_weight": 1.0, "exit_samples": 4,
                                                "exit_sampling": "stratified_keep_last", "learning_rate": 2.0e-4,
                                                "warmup_steps": 10, "precision": "bfloat16"},
                                    "packing": {"token_budget": 122880}},
    # the same with ζ2 on the rises only (zeta2_penalty: rise): a late step larger than the one before it is pulled
    # down and the one before it up, shrinking steps are left alone
    "bf16-rise-anchor1-240": {"distill": {"frozen": FROZEN, "output_kl_weight": 1.0, "exit_samples": 4,
                                          "exit_sampling": "stratified_keep_last", "learning_rate": 2.0e-4,
                                          "warmup_steps": 10, "precision": "bfloat16", "zeta2_penalty": "rise"},
                              "packing": {"token_budget": 122880}},
    # the rises pulled twice as hard (α = 2) and the output held harder (β = 2); checkpoints every 40 steps, not 8
    # (each costs ~5 s of the budget)
    "bf16-rise-alpha2-anchor2-240": rises_in_bf16(2.0, 240),
    # α and β doubled again (from 1 → 2 both S and the output gained: the intermediate exits' KL weighs less), and 216
    # steps, so that the job fits the 15 minutes (240 took 929 s): §13's recipe, config.yaml's `default` from
    # 2026-12-05 until §14's replaced it
    "bf16-rise-alpha4-anchor4-216": rises_in_bf16(4.0, 216),
    # α and β doubled once more (§14): the intermediate exits' KL at 1/17 of the loss's weights, not 1/9
    "bf16-rise-alpha8-anchor8-216": rises_in_bf16(8.0, 216),
    # and once more (1/33), on 200 steps: the 216 of α = 8 took 939 s on a slower hour of this machine (4.2 s a step
    # against 3.8 s for the same work an hour before), so 200 leave the 15 minutes a margin: measured under this name,
    # then made config.yaml's `default` (§14; its rows and snapshot renamed)
    "bf16-rise-alpha16-anchor16-200": rises_in_bf16(16.0, 200),
}
TARGETS = ["results/tables/convergence.parquet", "results/tables/convergence_paired.parquet",
           "results/tables/output_paired.parquet"]


class TestTextError(ValueError):
    """A recipe would be measured, and so chosen, on test text."""


def validation_sets(config: dict) -> dict[str, str]:
    """Kind (lambada, wikitext) → the config's validation data set of that kind: what a recipe is measured on."""
    chosen = {}
    for name, data in config["datasets"].items():
        if data.get("split", "test") == "validation" and data["kind"] in ("lambada", "wikitext"):
            chosen.setdefault(data["kind"], name)
    missing = sorted({"lambada", "wikitext"} - set(chosen))
    if missing:
        raise TestTextError(f"the config has no validation data set of kind {', '.join(missing)}: recipes are chosen "
                            f"on validation text only (datasets.<name>.split: validation)")
    return chosen


def recipe_config(overrides: dict, base: Path = REPO / "config.yaml") -> dict:
    """config.yaml with the recipe's keys changed, its data paths made absolute (the run folder is elsewhere), and
    every measurement (movement, per-layer evaluation, the output study, the figures) on the validation sets: a recipe
    is chosen there, and test text is never read."""
    config = yaml.safe_load(base.read_text())
    for data in config["datasets"].values():
        data["path"] = str((base.parent / data["path"]).resolve())
    source = config["corpus"]["source"]
    if "path" in source:
        source["path"] = str((base.parent / source["path"]).resolve())
    by_kind = validation_sets(config)
    measured = [by_kind["lambada"], by_kind["wikitext"]]
    kind_of = {name: data["kind"] for name, data in config["datasets"].items()}
    config["hidden_states"]["datasets"] = list(measured)
    evaluation = config["evaluation"]
    evaluation["limits"] = {by_kind[kind_of[name]]: limit for name, limit in evaluation.get("limits", {}).items()}
    evaluation["datasets"] = evaluation["output_datasets"] = list(measured)
    for figure in config["figures"].values():
        if "dataset" in figure:
            figure["dataset"] = by_kind[kind_of[figure["dataset"]]]
    for section, values in overrides.items():
        config[section].update(values)
    read = {*config["hidden_states"]["datasets"], *evaluation["datasets"], *evaluation["output_datasets"]}
    tested = sorted(name for name in read if config["datasets"][name].get("split", "test") != "validation")
    if tested:
        raise TestTextError(f"recipe measured on test text ({', '.join(tested)}); recipes read validation text only")
    return config


def recipe_overrides(name: str) -> dict:
    """The config keys recipe ``name`` changes in config.yaml: none for ``default``, else BEFORE_13's with its own."""
    if name == "default":
        return {}
    recipe = RECIPES[name]
    return {section: {**BEFORE_13.get(section, {}), **recipe.get(section, {})}
            for section in [*BEFORE_13, *(section for section in recipe if section not in BEFORE_13)]}


def run_recipe(name: str, work: Path) -> float:
    """Measure one recipe in the shared run folder and snapshot what the summary reads; the run's seconds."""
    config_path = work / "configs" / f"{name}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(recipe_config(recipe_overrides(name)), sort_keys=False))
    run = work / "run"
    run.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(work / f"{name}.log", "w") as log:
        subprocess.run([sys.executable, "-m", "snakemake", *TARGETS, "--snakefile", str(REPO / "Snakefile"),
                        "--cores", "2", "--directory", str(run), "--configfile", str(config_path)],
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    seconds = time.monotonic() - started
    snapshot = work / "snapshots" / name
    shutil.rmtree(snapshot, ignore_errors=True)
    for part in ("tables", "training", "benchmarks"):
        shutil.copytree(run / "results" / part, snapshot / "results" / part)
    model = next((run / "results" / "models").glob("*/distilled"))
    shutil.copytree(model, snapshot / "model")
    print(json.dumps({"recipe": name, "seconds": round(seconds)}), flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the shared run and the snapshots")
    parser.add_argument("--only", nargs="+", choices=list(RECIPES), help="these recipes (default: all)")
    parser.add_argument("--summary-only", action="store_true", help="only tabulate the snapshots already there")
    parser.add_argument("--out", default="docs/findings/recipe/summary", help="the summary's path without suffix")
    parser.add_argument("--keep-earlier", action="store_true",
                        help="keep OUT.csv's rows of recipes with no snapshot here (measured in an earlier run folder; "
                             "refused unless the base model's numbers agree)")
    args = parser.parse_args()
    if not args.summary_only:
        for name in args.only or RECIPES:
            run_recipe(name, args.work)
    snapshots = [name for name in RECIPES if (args.work / "snapshots" / name).is_dir()]
    write_summary({name: args.work / "snapshots" / name for name in snapshots}, Path(args.out), args.keep_earlier)


if __name__ == "__main__":
    main()
