"""Which of the paper's choices matter: one-factor-at-a-time ablations of the self-distillation loss.

The paper trains one setting (α = 1, k = 0.25, KL(q_l ‖ q_target), one h_L). An ablation varies one factor at a
time around a *reference* setting, every run with the same (usually shorter) training budget, so that a difference
between two rows is that factor's effect alone. Each setting is a named distillation job (``alpha-0.5``,
``k-0``, ``kl_direction-target_student``, ``movement_convention-hf``); every upstream stage (model, corpus) is shared.

Each setting is judged by what the paper reports: S_model and the last layer's movement D_L on held-out text, and the
model's own LAMBADA accuracy under stock lm-eval, the last against the reference with a paired bootstrap interval
over the same passages.
"""

from __future__ import annotations

import os
from typing import Literal

import pandas as pd

from hsconv.errors import InputError
from hsconv.flags import JSON, flag, flags, table_stem
from hsconv.io import read_input_table, write_table
from hsconv.paired import paired_differences
from hsconv.settings import MetricsSettings

REFERENCE = "reference"
ABLATION_PREFIX = "ablation-"
# The loss settings an ablation may vary; everything else (budget, optimiser) is held fixed across settings.
FACTORS = ("alpha", "output_kl_weight", "k", "kl_direction", "movement_convention", "zeta2_measure", "zeta2_penalty")


def value_text(value) -> str:
    """0.0 as ``0``, 0.5 as ``0.5``, strings as they are."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def setting_name(factor: str, value) -> str:
    """``alpha-0.5``, ``k-0``, ``kl_direction-target_student``: a path- and wildcard-safe name of one setting."""
    return f"{factor}-{value_text(value)}"


def ablation_settings(distill: dict, factors: dict[str, list], overrides: dict | None = None) -> dict[str, dict]:
    """Every setting's full distillation settings, the reference first.

    ``distill`` is the config's distill section (the reference's loss), ``overrides`` what every ablation run
    changes in it (a shorter budget), ``factors`` the values tried per factor. A value equal to the reference's is
    the reference itself and is not trained twice."""
    unknown = sorted(set(factors) - set(FACTORS))
    if unknown:
        raise InputError(f"ablations.factors: {', '.join(unknown)} cannot be ablated (one of {', '.join(FACTORS)})")
    reference = {**distill, **(overrides or {})}
    settings = {REFERENCE: reference}
    for factor, values in factors.items():
        for value in values:
            if value != reference.get(factor):
                settings[setting_name(factor, value)] = {**reference, factor: value}
    return settings


# Besides the factors, what a recipe may change that a reader of its row needs to see.
RECIPE_COLUMNS = (*FACTORS, "learning_rate", "max_steps", "exit_samples")


def describe_settings(settings: dict[str, dict], reference: dict, study: str = "ablations") -> pd.DataFrame:
    """One row per setting: the factor it varies (none for the reference) and that factor's value as text; a recipe
    (``study="recipes"``) is its own name, with the settings it may change beside it."""
    rows = []
    for name, values in settings.items():
        columns = {column: values.get(column) for column in (RECIPE_COLUMNS if study == "recipes" else FACTORS)}
        if study == "recipes":
            rows.append({"setting": name, "factor": REFERENCE if name == REFERENCE else "recipe",
                         "value": "" if name == REFERENCE else name, **columns})
            continue
        changed = [factor for factor in FACTORS if values.get(factor) != reference.get(factor)]
        factor = changed[0] if changed else REFERENCE
        rows.append({"setting": name, "factor": factor, "value": value_text(values[factor]) if changed else "",
                     **columns})
    return pd.DataFrame(rows)


@flags("metrics", convergence_paths=flag("compute-convergence scores per variant", name="--convergence"),
       stock_paths=flag("stock lm-eval tables per variant", name="--stock"),
       document_paths=flag("their per-document outcomes", name="--documents"),
       variant_settings="{setting: distillation settings}, as JSON", variants="{setting: model variant}, as JSON",
       out_stem=flag("Parquet; .csv and .md are written beside it", name="--out", type=table_stem),
       study="ablations: differences from the reference; recipes: from the pretrained model")
def tabulate_variants(convergence_paths: list[str], stock_paths: list[str], document_paths: list[str],
                       variant_settings: JSON, variants: JSON, out_stem: str | os.PathLike,
                       config_hash: str, bootstrap_samples: int = MetricsSettings.bootstrap_samples,
                       confidence: float = MetricsSettings.confidence, seed: int = MetricsSettings.seed,
                       study: Literal["ablations", "recipes"] = "ablations") -> pd.DataFrame:
    """One row per model, setting and final-norm convention: S_model (with its interval) and D_L on the measured
    data set, the model's stock LAMBADA accuracy, and its difference from a baseline with a paired interval: the
    reference for the ablations (what a factor changes), the pretrained model for the recipes (what a recipe costs).

    ``variants`` maps each setting to the model variant that holds it (the reference may be the main ``distilled``
    run when it has the same settings); the pretrained model (variant ``base``) is shown beside them."""
    convergence = pd.concat([read_input_table(path, "convergence scores", made_by="compute-convergence")
                             for path in convergence_paths], ignore_index=True)
    stock = pd.concat([read_input_table(path, "stock evaluation", made_by="evaluate-layers") for path in stock_paths],
                      ignore_index=True)
    documents = pd.concat([read_input_table(path, "per-document outcomes", made_by="evaluate-layers")
                           for path in document_paths], ignore_index=True)
    # One LAMBADA data set was evaluated; lm-eval names its rows by the data set (any name), so select by metric.
    documents = documents[documents["acc"].notna()].assign(task="lambada", kind="lambada")
    setting_of = {"base": "base", **{variant: setting for setting, variant in variants.items()}}
    baseline = "base" if study == "recipes" else variants[REFERENCE]
    # A stock evaluation has one exit, the model's output, so each variant is compared at its only layer.
    differences = paired_differences(documents, baseline=baseline, samples=bootstrap_samples, confidence=confidence,
                                     seed=seed)
    accuracy = stock[stock["metric"] == "acc"]
    description = describe_settings({name: variant_settings[name] for name in variants},
                                    variant_settings[REFERENCE], study)
    description = pd.concat([description, pd.DataFrame([{"setting": "base", "factor": "pretrained", "value": ""}])],
                            ignore_index=True)
    rows = []
    for (model, variant, dataset, final_norm), scores in convergence.groupby(
            ["model", "variant", "dataset", "final_norm"], sort=False):
        if variant not in setting_of:
            continue
        score = scores.iloc[0]
        row = {"model": model, "setting": setting_of[variant], "variant": variant, "dataset": dataset,
               "final_norm": final_norm, "s_model": score["s_model"], "s_model_ci_low": score["s_model_ci_low"],
               "s_model_ci_high": score["s_model_ci_high"],
               "last_layer_movement": score["last_layer_movement"], "num_layers": int(score["num_layers"])}
        rows.append({**row, **_accuracy_columns(model, variant, accuracy, differences, baseline)})
    table = pd.DataFrame(rows).merge(description, on="setting", how="left")
    leading = ["model", "setting", "factor", "value"]
    table = table[leading + [column for column in table.columns if column not in leading]]
    order = {name: position for position, name in enumerate(["base", *variants])}
    table = table.sort_values(["model", "final_norm", "setting"], key=lambda column: column.map(order)
                              if column.name == "setting" else column, kind="stable").reset_index(drop=True)
    table["accuracy_baseline"] = baseline
    table["confidence"] = confidence
    table["n_documents"] = int(documents.groupby(["model", "variant"])["doc_id"].nunique().min())
    write_table(table, out_stem, {study: {"settings": variant_settings, "variants": variants,
                                          "paired_bootstrap": {"samples": bootstrap_samples, "confidence": confidence,
                                                               "seed": seed},
                                          "config_hash": config_hash}})
    return table


def _accuracy_columns(model: str, variant: str, accuracy: pd.DataFrame, differences: pd.DataFrame,
                      baseline: str) -> dict:
    """A variant's stock LAMBADA accuracy and its paired difference from the baseline (0 for the baseline)."""
    acc = accuracy[(accuracy["model"] == model) & (accuracy["variant"] == variant)]
    if len(acc) != 1:
        raise InputError(f"{model} {variant}: expected one stock LAMBADA accuracy, found {len(acc)}")
    columns = {"lambada_acc": float(acc["value"].iloc[0])}
    if variant == baseline:
        return {**columns, "acc_difference": 0.0, "acc_difference_low": 0.0, "acc_difference_high": 0.0}
    diff = differences[(differences["model"] == model) & (differences["variant"] == variant)]
    if len(diff) != 1:
        raise InputError(f"{model} {variant}: expected one paired LAMBADA difference, found {len(diff)}")
    return {**columns, "acc_difference": float(diff["difference"].iloc[0]),
            "acc_difference_low": float(diff["lower"].iloc[0]), "acc_difference_high": float(diff["upper"].iloc[0])}
