"""studies.reproduction names each run's loss: the paper's (eqs. 3-6) or the departure it takes."""

import pytest

from studies.reproduction import loss_name


@pytest.mark.parametrize("distill, name", [
    ({}, "paper"),  # the settings' defaults are eq. 5
    ({"zeta2_penalty": "step", "zeta2_measure": "relative_step", "output_kl_weight": 16.0, "exit_samples": 4,
      "frozen": ["embeddings"]}, "paper"),  # weighting, exits and procedure do not depart
    ({"zeta2_penalty": "rise"}, "zeta2 penalty rise"),
    ({"zeta2_penalty": "rise", "zeta2_measure": "cosine_distance"}, "zeta2 penalty rise; zeta2 measure cosine_distance"),
])
def test_the_loss_is_the_papers_unless_zeta2_departs(distill, name):
    assert loss_name(distill) == name


def _paired_row(variant, task, kind, metric, layer, n, baseline_value, variant_value, difference):
    return {"model": "m", "task": task, "kind": kind, "metric": metric, "layer": layer, "baseline": "base",
            "variant": variant, "baseline_value": baseline_value, "variant_value": variant_value,
            "difference": difference, "lower": difference - 0.01, "upper": difference + 0.01, "confidence": 0.95,
            "n_documents": n, "bootstrap_samples": 100}


def _score(variant, s_model, last):
    return {"model": "m", "variant": variant, "dataset": "lambada", "final_norm": "pre_norm", "s_model": s_model,
            "s_model_ci_low": s_model - 0.01, "s_model_ci_high": s_model + 0.01, "last_layer_movement": last,
            "previous_layer_movement": 0.02, "largest_rise_layer": 4, "largest_rise": last - 0.02}


def test_the_summary_takes_the_output_study_over_the_per_layer_tables_and_lists_every_seed(tmp_path):
    """A synthetic finished run: the main model in both paired tables (the output study's larger set must win), a
    second seed in the output study only (its accuracy comes from there; nothing gives it a perplexity)."""
    import json

    import pandas as pd

    from hsconv.io import write_parquet
    from studies.reproduction import reproduction_rows

    results = tmp_path / "results"
    for folder in ("tables", "data/eval", "benchmarks/distill", "benchmarks/distill_variant/m"):
        (results / folder).mkdir(parents=True)
    for dataset, split in (("lambada", "test"), ("lambada_full", "test"), ("wikitext", "test")):
        write_parquet(pd.DataFrame({"document": [0], "text": ["x"]}), results / "data/eval" / f"{dataset}.parquet",
                      {"texts": {"split": split}})
    for variant, seed, training in (("distilled", 0, ""), ("distilled-seed-1", 1, "distilled-seed-1")):
        (results / "models/m" / variant).mkdir(parents=True)
        (results / "models/m" / variant / "hsconv_model.json").write_text(
            json.dumps({"training": {"distill": {"seed": seed}}}))
        (results / "training/m" / training).mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"step": [1, 2], "tokens": [512, 1024]}).to_parquet(
            results / "training/m" / training / "steps.parquet")
    pd.DataFrame({"s": [700.0]}).to_csv(results / "benchmarks/distill/m.tsv", sep="\t", index=False)
    pd.DataFrame({"s": [710.0]}).to_csv(results / "benchmarks/distill_variant/m/distilled-seed-1.tsv", sep="\t",
                                        index=False)
    # the convergence table holds base and the config's variants; another seed's scores are its own metrics file
    pd.DataFrame([_score("base", 0.74, 0.12), _score("distilled", 0.83, 0.06)]).to_parquet(
        results / "tables/convergence.parquet")
    (results / "metrics/m/distilled-seed-1/lambada").mkdir(parents=True)
    pd.DataFrame([_score("distilled-seed-1", 0.82, 0.065)]).to_parquet(
        results / "metrics/m/distilled-seed-1/lambada/convergence.parquet")
    pd.DataFrame([_paired_row("distilled", "lambada", "lambada", "acc", layer, 400, 0.3, 0.25, -0.05)
                  for layer in (3, 4)]
                 + [_paired_row("distilled", "wikitext", "wikitext", "word_perplexity", 4, 8, 30.0, 33.0, 3.0)]
                 ).to_parquet(results / "tables/paired_differences.parquet")
    pd.DataFrame([_paired_row("distilled", "lambada_full", "lambada", "acc", 4, 4153, 0.3, 0.27, -0.03),
                  _paired_row("distilled-seed-1", "lambada_full", "lambada", "acc", 4, 4153, 0.3, 0.28, -0.02)]
                 ).to_parquet(results / "tables/output_paired.parquet")

    rows = reproduction_rows(tmp_path).set_index("variant")
    assert list(rows.index) == ["default", "default-seed-1"]
    assert rows.loc["default", ["seed", "tokens", "job_seconds", "s_variant"]].tolist() == [0, 1024, 700.0, 0.83]
    assert rows.loc["default", ["accuracy_diff", "accuracy_documents"]].tolist() == [pytest.approx(-3.0), 4153]
    assert rows.loc["default", ["perplexity_ratio", "perplexity_documents"]].tolist() == [pytest.approx(1.1), 8]
    assert rows.loc["default-seed-1", ["seed", "job_seconds", "s_variant", "s_base", "accuracy_diff"]].tolist() == [
        1, 710.0, 0.82, 0.74, pytest.approx(-2.0)]
    assert pd.isna(rows.loc["default-seed-1", "perplexity_ratio"])


def test_the_spread_over_seeds_groups_the_rows_that_differ_only_in_their_seed():
    """Two settings, one with three seeds and one with two, on one data set: each group's mean and standard deviation
    against a hand computation; a row whose settings differ (another digest) is a group of its own."""
    import pandas as pd

    from studies.reproduction import COLUMNS, settings_digest, spread_over_seeds

    paper, rise = ({"alpha": 16.0, "zeta2_penalty": penalty} for penalty in ("step", "rise"))
    assert settings_digest({**paper, "seed": 0}) == settings_digest({**paper, "seed": 2}) != settings_digest(rise)

    def row(variant, loss, settings, seed, s_variant, accuracy):
        return {**dict.fromkeys(COLUMNS), "model": "m", "variant": variant, "loss": loss, "seed": seed,
                "settings": settings_digest(settings), "split": "validation", "dataset": "d", "convention": "pre_norm",
                "tokens": 512, "s_base": 0.74, "d_last_base": 0.12, "d_prev_base": 0.026, "s_variant": s_variant,
                "d_last_variant": 0.06, "d_prev_variant": 0.02, "largest_rise": 0.04, "accuracy_diff": accuracy,
                "perplexity_ratio": float("nan")}

    table = pd.DataFrame([row("recipe-paper-s0", "paper", paper, 0, 0.81, -6.0),
                          row("recipe-rise-s1", "zeta2 penalty rise", rise, 1, 0.83, -3.0),
                          row("recipe-paper-s1", "paper", paper, 1, 0.82, -4.0),
                          row("recipe-paper-s2", "paper", paper, 2, 0.80, -5.0),
                          row("recipe-rise-s0", "zeta2 penalty rise", rise, 0, 0.84, -5.0)])
    spread = spread_over_seeds(table).set_index("variant")
    assert list(spread.index) == ["recipe-paper-s0", "recipe-rise-s0"]
    assert spread.loc["recipe-paper-s0", ["n_seeds", "seeds"]].tolist() == [3, "0 1 2"]
    assert spread.loc["recipe-paper-s0", "s_variant_mean"] == pytest.approx(0.81)
    assert spread.loc["recipe-paper-s0", "s_variant_std"] == pytest.approx(0.01)  # sqrt((0 + 1e-4 + 1e-4) / 2)
    assert spread.loc["recipe-paper-s0", "accuracy_diff_std"] == pytest.approx(1.0)
    assert spread.loc["recipe-rise-s0", ["n_seeds", "seeds", "s_base"]].tolist() == [2, "0 1", 0.74]
    assert spread.loc["recipe-rise-s0", "s_variant_std"] == pytest.approx(0.0070711, abs=1e-6)
    with pytest.raises(ValueError, match="two rows with one seed"):
        spread_over_seeds(pd.concat([table, table.iloc[[0]]]))
