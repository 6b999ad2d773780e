"""studies.recipe_summary reads a finished run's tables; each column is the number the workflow wrote."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from studies.recipe_summary import COLUMNS, recipe_rows


def write_run(run: Path) -> None:
    tables = run / "results" / "tables"
    tables.mkdir(parents=True)
    pd.DataFrame([
        {"model": "m", "variant": variant, "dataset": "lambada", "final_norm": "pre_norm", "s_model": s,
         "s_model_ci_low": s - 0.01, "s_model_ci_high": s + 0.01, "last_layer_ratio": ratio}
        for variant, s, ratio in (("base", 0.74, 4.9), ("distilled", 0.86, 1.8))]).to_parquet(
        tables / "convergence.parquet")
    pd.DataFrame([{"model": "m", "baseline": "base", "variant": "distilled", "dataset": "lambada",
                   "final_norm": "pre_norm", "s_model_difference": 0.12, "s_model_difference_low": 0.11,
                   "s_model_difference_high": 0.13}]).to_parquet(tables / "convergence_paired.parquet")
    pd.DataFrame([
        {"model": "m", "task": "lam", "kind": "lambada", "metric": "acc", "variant": "distilled",
         "baseline_value": 0.30, "variant_value": 0.295, "difference": -0.005, "lower": -0.02, "upper": 0.01},
        {"model": "m", "task": "wiki", "kind": "wikitext", "metric": "word_perplexity", "variant": "distilled",
         "baseline_value": 30.0, "variant_value": 31.2, "difference": 1.2, "lower": 0.5, "upper": 2.0},
        {"model": "m", "task": "wiki", "kind": "wikitext", "metric": "byte_perplexity", "variant": "distilled",
         "baseline_value": 2.0, "variant_value": 2.1, "difference": 0.1, "lower": 0.0, "upper": 0.2}]).to_parquet(
        tables / "output_paired.parquet")
    training = run / "results" / "training" / "m"
    training.mkdir(parents=True)
    pd.DataFrame({"step": [1, 2], "tokens": [512, 1024], "seconds": [30.0, 31.5]}).to_parquet(
        training / "steps.parquet")
    # 5 steps of layers 0..2: the last 4 steps' means are read (a tenth of 5 is less than 4)
    pd.DataFrame([{"step": step, "layer": layer, "kl": step + layer / 10, "hidden_step": None if layer == 0 else
                   10 * step + layer} for step in range(1, 6) for layer in range(3)]).to_parquet(
        training / "layers.parquet")
    benchmarks = run / "results" / "benchmarks" / "distill"
    benchmarks.mkdir(parents=True)
    (benchmarks / "m.tsv").write_text("s\th:m:s\tmax_rss\n75.25\t0:01:15\t512.0\n")


def test_one_row_per_dataset_and_convention_from_the_runs_tables(tmp_path):
    write_run(tmp_path)
    rows = recipe_rows("k05", tmp_path)
    assert list(rows.columns) == COLUMNS and len(rows) == 1
    row = rows.iloc[0]
    assert (row["recipe"], row["dataset"], row["convention"]) == ("k05", "lambada", "pre_norm")
    assert (row["tokens"], row["train_seconds"], row["job_seconds"]) == (1024, 61.5, 75.25)
    assert (row["s_base"], row["s_distilled"], row["s_distilled_low"]) == (0.74, 0.86, 0.86 - 0.01)
    assert (row["ratio_base"], row["ratio_distilled"]) == (4.9, 1.8)
    assert row["accuracy_diff"] == pytest.approx(-0.5) and row["accuracy_diff_low"] == pytest.approx(-2.0)
    assert row["perplexity_ratio"] == pytest.approx(31.2 / 30.0)
    assert row["output_kl_training"] == pytest.approx((2 + 3 + 4 + 5) / 4 + 0.2)
    assert (row["last_step_training"], row["previous_step_training"]) == (pytest.approx(37.0), pytest.approx(36.0))


def test_the_summary_writes_its_tables_and_the_frontier_figure(tmp_path):
    from studies.recipe_summary import write_summary

    write_run(tmp_path / "run")
    table = write_summary({"k05": tmp_path / "run"}, tmp_path / "out" / "summary")
    assert table["model"].tolist() == ["m"]
    assert pd.read_csv(tmp_path / "out" / "summary.csv")["s_distilled"].tolist() == [0.86]
    for suffix in (".pdf", ".png"):
        assert (tmp_path / "out" / f"summary_frontier{suffix}").stat().st_size > 1000


def test_a_run_without_the_wikitext_output_is_refused(tmp_path):
    write_run(tmp_path)
    path = tmp_path / "results" / "tables" / "output_paired.parquet"
    output = pd.read_parquet(path)
    output[output["kind"] == "lambada"].to_parquet(path)
    with pytest.raises(ValueError, match="one WikiText word perplexity"):
        recipe_rows("k05", tmp_path)


def test_a_recipe_is_its_base_with_its_keys_changed_and_measured_on_the_validation_sets():
    """`default` is config.yaml itself; every other recipe is config.yaml with the keys it had until §13 (BEFORE_13)
    and its own changed, so that a recipe stays what it was measured as when config.yaml moves on."""
    import yaml

    from studies.recipe_search import BEFORE_13, REPO, recipe_config, recipe_overrides

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    default = recipe_config(recipe_overrides("default"))
    frozen16, frozen40 = (recipe_config(recipe_overrides(name)) for name in ("frozen16", "frozen40"))
    paper = recipe_config(recipe_overrides("paper-loss16"))
    assert default["distill"] == config["distill"] and default["packing"] == config["packing"]
    assert frozen16["distill"] == {**config["distill"], **BEFORE_13["distill"]}
    assert frozen16["packing"] == {**config["packing"], "token_budget": 8192}
    assert paper["distill"] == {**frozen16["distill"], "frozen": []}
    assert frozen40["distill"] == frozen16["distill"] and frozen40["packing"]["token_budget"] == 20480
    assert frozen40["evaluation"]["output_datasets"] == frozen40["evaluation"]["datasets"] == [
        "lambada_validation", "wikitext_validation"]
    assert all(Path(data["path"]).is_absolute() for data in frozen40["datasets"].values())


def test_keeping_earlier_rows_adds_the_new_recipes_and_refuses_a_different_base(tmp_path):
    """Rows of recipes measured in an earlier run folder stay (the folder is gone, its rows are not), a recipe
    measured again replaces its old rows, and a summary whose pretrained-model numbers differ is not merged."""
    from studies.recipe_summary import write_summary

    write_run(tmp_path / "run")
    out = tmp_path / "out" / "summary"
    write_summary({"old": tmp_path / "run", "again": tmp_path / "run"}, out)
    earlier = pd.read_csv(out.with_suffix(".csv"))
    earlier.loc[earlier["recipe"] == "again", "s_distilled"] = 0.5  # what the recipe measured before
    earlier.to_csv(out.with_suffix(".csv"), index=False)
    table = write_summary({"again": tmp_path / "run", "new": tmp_path / "run"}, out, keep_earlier=True)
    assert table["recipe"].tolist() == ["old", "again", "new"]
    assert table["s_distilled"].tolist() == [0.86, 0.86, 0.86]
    assert pd.read_csv(out.with_suffix(".csv"))["recipe"].tolist() == ["old", "again", "new"]
    assert write_summary({"new": tmp_path / "run"}, out)["recipe"].tolist() == ["new"]  # without it: only the runs

    earlier = pd.read_csv(out.with_suffix(".csv"))
    earlier["s_base"] = 0.70
    earlier.to_csv(out.with_suffix(".csv"), index=False)
    with pytest.raises(ValueError, match="base-model numbers differ"):
        write_summary({"newer": tmp_path / "run"}, out, keep_earlier=True)


def test_the_recipe_study_reads_validation_text_only(tmp_path):
    """Recipes are chosen: every set they are measured on is validation text, none is test text, and a config or a
    recipe that would read test text is refused."""
    import yaml

    from studies.recipe_search import REPO, TestTextError, recipe_config

    config = recipe_config({})
    read = {*config["hidden_states"]["datasets"], *config["evaluation"]["datasets"],
            *config["evaluation"]["output_datasets"],
            *(figure["dataset"] for figure in config["figures"].values() if "dataset" in figure)}
    assert read and all(config["datasets"][name]["split"] == "validation" for name in read), read
    assert {config["datasets"][name]["kind"] for name in read} == {"lambada", "wikitext"}
    with pytest.raises(TestTextError, match="lambada"):
        recipe_config({"evaluation": {"output_datasets": ["lambada"]}})
    plain = yaml.safe_load((REPO / "config.yaml").read_text())
    for data in plain["datasets"].values():
        data.pop("split", None)  # every set test text, as before the held-out protocol
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(plain))
    with pytest.raises(TestTextError, match="no validation data set"):
        recipe_config({}, base=tmp_path / "config.yaml")
