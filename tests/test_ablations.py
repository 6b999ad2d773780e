"""Ablation settings, the ablation table (against a hand-computed paired bootstrap) and its figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hsconv.ablations import ablation_settings, setting_name, tabulate_variants
from hsconv.figures.ablations import plot_ablations

DISTILL = {"alpha": 1.0, "k": 0.25, "kl_direction": "student_target", "movement_convention": "pre_norm",
           "max_steps": None, "learning_rate": 5e-4}


def test_one_factor_at_a_time_around_the_reference_with_the_shared_overrides():
    settings = ablation_settings(DISTILL, {"alpha": [0.0, 0.5, 1.0], "kl_direction": ["target_student"],
                                           "movement_convention": ["pre_norm", "hf"]}, {"max_steps": 4})
    assert list(settings) == ["reference", "alpha-0", "alpha-0.5", "kl_direction-target_student",
                              "movement_convention-hf"]  # alpha 1 and pre_norm are the reference itself
    assert all(values["max_steps"] == 4 and values["learning_rate"] == 5e-4 for values in settings.values())
    assert settings["reference"] == {**DISTILL, "max_steps": 4}
    for name, values in settings.items():
        changed = {key for key in DISTILL if values[key] != settings["reference"][key]}
        assert len(changed) == (name != "reference")
    assert settings["alpha-0.5"]["alpha"] == 0.5 and settings["movement_convention-hf"]["movement_convention"] == "hf"
    assert setting_name("k", 0.0) == "k-0" and setting_name("k", 0.25) == "k-0.25"
    with pytest.raises(ValueError, match="learning_rate cannot be ablated"):
        ablation_settings(DISTILL, {"learning_rate": [1e-3]})
    # ζ2's penalty is a factor too; the config's distill section without the key means the paper's "step"
    penalty = ablation_settings({**DISTILL, "zeta2_penalty": "step"}, {"zeta2_penalty": ["step", "rise"]})
    assert list(penalty) == ["reference", "zeta2_penalty-rise"]
    assert penalty["zeta2_penalty-rise"]["zeta2_penalty"] == "rise"


def _write_inputs(directory, accuracy_per_variant):
    """Per variant: a convergence table (both conventions), a stock lm-eval table and per-passage outcomes."""
    paths = {"convergence": [], "stock": [], "documents": []}
    for index, (variant, outcomes) in enumerate(accuracy_per_variant.items()):
        convergence = pd.DataFrame([{"model": "m", "variant": variant, "dataset": "lambada", "final_norm": norm,
                                     "s_model": 0.5 + 0.1 * index + shift, "s_model_ci_low": 0.45 + 0.1 * index,
                                     "s_model_ci_high": 0.65 + 0.1 * index + shift,
                                     "last_layer_movement": 0.2 - 0.01 * index, "previous_layer_movement": 0.01,
                                     "last_layer_ratio": 1.0, "num_layers": 4, "n_tokens": 50, "n_documents": 5}
                                    for norm, shift in (("hf", 0.0), ("pre_norm", 0.05))])
        # rows named by the data set, as lm-eval names them (the default's is `lambada_ablations`)
        stock = pd.DataFrame([{"model": "m", "variant": variant, "layer": 4, "task": "lambada_ablations",
                               "metric": metric, "value": value, "stderr": 0.1}
                              for metric, value in (("acc", float(np.mean(outcomes))), ("perplexity", 40.0))])
        documents = pd.DataFrame({"model": "m", "variant": variant, "task": "lambada_ablations", "layer": 4,
                                  "doc_id": range(len(outcomes)), "acc": np.array(outcomes, dtype=float),
                                  "loglikelihood": -1.0})
        for kind, frame in (("convergence", convergence), ("stock", stock), ("documents", documents)):
            path = directory / f"{variant}-{kind}.parquet"
            frame.to_parquet(path)
            paths[kind].append(str(path))
    return paths


def test_ablation_table_against_a_hand_computed_paired_bootstrap(tmp_path):
    outcomes = {"base": [0, 0, 1, 0, 1], "ablation-reference": [1, 0, 1, 1, 0], "ablation-alpha-0": [1, 1, 1, 1, 0]}
    paths = _write_inputs(tmp_path, outcomes)
    settings = ablation_settings(DISTILL, {"alpha": [0.0]}, {"max_steps": 4})
    variants = {"reference": "ablation-reference", "alpha-0": "ablation-alpha-0"}
    table = tabulate_variants(paths["convergence"], paths["stock"], paths["documents"], settings, variants,
                               tmp_path / "ablations", "hash", bootstrap_samples=200, confidence=0.9, seed=7)
    assert (tmp_path / "ablations.csv").is_file() and (tmp_path / "ablations.md").is_file()
    assert list(table["setting"].unique()) == ["base", "reference", "alpha-0"]
    row = table[(table["setting"] == "alpha-0") & (table["final_norm"] == "pre_norm")].iloc[0]
    assert row["factor"] == "alpha" and row["value"] == "0" and row["alpha"] == 0.0 and row["k"] == 0.25
    assert row["s_model"] == pytest.approx(0.75) and row["last_layer_movement"] == pytest.approx(0.18)
    assert row["lambada_acc"] == pytest.approx(0.8) and row["acc_difference"] == pytest.approx(0.2)
    # The interval by hand: the same document draws for both variants, one resample at a time.
    rng = np.random.default_rng(7)
    draws = rng.integers(0, 5, size=(200, 5))
    reference, ablated = np.array(outcomes["ablation-reference"]), np.array(outcomes["ablation-alpha-0"])
    replicates = [ablated[draw].mean() - reference[draw].mean() for draw in draws]
    assert row["acc_difference_low"] == pytest.approx(np.quantile(replicates, 0.05))
    assert row["acc_difference_high"] == pytest.approx(np.quantile(replicates, 0.95))
    reference_row = table[(table["setting"] == "reference") & (table["final_norm"] == "hf")].iloc[0]
    assert reference_row["acc_difference"] == 0 and reference_row["factor"] == "reference"
    base_row = table[(table["setting"] == "base") & (table["final_norm"] == "hf")].iloc[0]
    assert base_row["acc_difference"] == pytest.approx(0.4 - 0.6) and base_row["factor"] == "pretrained"


def test_ablation_figure_plots_its_table(tmp_path):
    outcomes = {"base": [0, 0, 1, 0, 1], "ablation-reference": [1, 0, 1, 1, 0], "ablation-alpha-0": [1, 1, 1, 1, 0]}
    paths = _write_inputs(tmp_path, outcomes)
    settings = ablation_settings(DISTILL, {"alpha": [0.0]}, {"max_steps": 4})
    tabulate_variants(paths["convergence"], paths["stock"], paths["documents"], settings,
                       {"reference": "ablation-reference", "alpha-0": "ablation-alpha-0"}, tmp_path / "t", "hash",
                       bootstrap_samples=100)
    table = pd.read_parquet(tmp_path / "t.parquet")
    table = table[table["final_norm"] == "hf"]
    figure = plot_ablations(tmp_path / "t.parquet", tmp_path / "f.pdf", tmp_path / "f.png", {"m": "model m"}, "hf")
    assert (tmp_path / "f.pdf").stat().st_size > 0 and (tmp_path / "f.png").stat().st_size > 0
    s_axis, movement_axis, accuracy_axis = figure.axes
    for axis, column, scale in ((s_axis, "s_model", 1), (movement_axis, "last_layer_movement", 1),
                                (accuracy_axis, "acc_difference", 100)):
        points = axis.containers[0].lines[0]
        np.testing.assert_allclose(points.get_xdata(), table[column] * scale)
        np.testing.assert_array_equal(points.get_ydata(), [2, 1, 0])  # the table's order, top down
        reference = table[table["setting"] == "reference"][column].iloc[0] * scale
        assert axis.lines[-1].get_xdata()[0] == pytest.approx(reference)
    labels = {tick: label.get_text() for tick, label in zip(s_axis.get_yticks(), s_axis.get_yticklabels())}
    assert labels == {2: "pretrained (no distillation)", 1: "reference setting", 0: "α = 0"}
    assert s_axis.get_title(loc="left") == ("model m: 2 distillation runs; reference α = 1, k = 0.25, "
                                            "KL (q_l ‖ q_target), $h_L$ before final norm") and "after final norm" in figure.texts[0].get_text()


@pytest.mark.parametrize("ablations, message", [
    ({"distill": {"alpha": 2.0}}, "ablations.distill: alpha is an ablation factor"),
    ({"factors": {"alpha": []}}, "ablations.factors: no values to try"),
    ({"models": ["gpt-5"]}, "ablations.models: unknown model ['gpt-5']"),
    ({"factors": {"k": [0.0]}, "distill": {"batch_size": 6}},
     "ablations.distill: distill.batch_size=6 is not a multiple of micro_batch_size"),
])
def test_ablation_configs_that_cannot_run_are_named(ablations, message):
    import copy
    import re

    import yaml
    from snakemake.utils import validate

    from conftest import REPO
    from hsconv.config import ConfigError, check_config

    config = yaml.safe_load((REPO / "configs" / "test.yaml").read_text())
    config["ablations"].update(copy.deepcopy(ablations))
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    for source in [*config["datasets"].values(), config["corpus"]["source"]]:
        source["path"] = str((REPO / source["path"]).resolve())
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(config)
