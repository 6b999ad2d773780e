"""Ablations: S_model, the last layer's movement and LAMBADA accuracy per distillation setting, one row per model."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt

from hsconv.ablations import REFERENCE
from hsconv.errors import InputError
from hsconv.figures.style import apply_style, model_colour, save_figure
from hsconv.flags import Labels, flag, flags
from hsconv.io import read_input_table
from hsconv.names import Convention

FACTOR_LABELS = {"alpha": "α = {}", "output_kl_weight": "β = {}", "k": "k = {}", "kl_direction": "KL {}", "movement_convention": "$h_L$ {}",
                 "zeta2_measure": "ζ2 step {}", "zeta2_penalty": "ζ2 on each {}"}
VALUE_LABELS = {"student_target": "(q_l ‖ q_target)", "target_student": "(q_target ‖ q_l)",
                "pre_norm": "before final norm", "hf": "after final norm",
                "relative_step": "‖Δh‖²/‖h‖²", "cosine_distance": "1 − cos", "step": "step", "rise": "rise"}


def setting_label(row) -> str:
    if row.setting == "base":
        return "pretrained (no distillation)"
    if row.setting == REFERENCE or row.factor == REFERENCE:
        return "reference setting"
    if row.factor == "recipe":
        return row.value
    return FACTOR_LABELS[row.factor].format(VALUE_LABELS.get(row.value, row.value))


def reference_description(row) -> str:
    direction = VALUE_LABELS.get(row.kl_direction, row.kl_direction)
    beta = "" if row.output_kl_weight is None else f"β = {row.output_kl_weight:g}, "
    return (f"α = {row.alpha:g}, {beta}k = {row.k:g}, KL {direction}, "
            f"$h_L$ {VALUE_LABELS.get(row.movement_convention, row.movement_convention)}")


@flags(table_path=flag("the ablation table", name="--table"), pdf_out=flag(name="--pdf"),
       png_out=flag(name="--png"), models=flag("NAME=LABEL, in order", name="--model"))
def plot_ablations(table_path: str | os.PathLike, pdf_out: str | os.PathLike, png_out: str | os.PathLike,
                   models: Labels, final_norm: Convention = "pre_norm") -> plt.Figure:
    """Three panels per model: S_model (its bootstrap interval), D_L, and the LAMBADA accuracy difference from the
    reference (paired bootstrap interval); the reference's value is the dashed line in each."""
    table = read_input_table(table_path, "ablation table", made_by="tabulate-variants")
    table = table[table["final_norm"] == final_norm]
    missing = [name for name in models if name not in set(table["model"])]
    if missing:
        raise InputError(f"{table_path} has no {final_norm} rows for model(s) {missing}")
    apply_style()
    settings_per_model = max(len(table[table["model"] == name]) for name in models)
    figure, axes = plt.subplots(len(models), 3, figsize=(13, len(models) * (1.4 + 0.34 * settings_per_model)),
                                squeeze=False, sharey="row")
    for row_index, (name, model_label) in enumerate(models.items()):
        rows = table[table["model"] == name].reset_index(drop=True)
        labels = [setting_label(row) for row in rows.itertuples()]
        positions = range(len(rows))[::-1]  # the first setting at the top
        reference = rows[rows["setting"] == REFERENCE].iloc[0]
        colour = model_colour(row_index)
        panels = [
            ("s_model", "s_model_ci_low", "s_model_ci_high", "$S_{model}$ (higher: smoother convergence)"),
            ("last_layer_movement", None, None, "last-layer movement $D_L$"),
            ("acc_difference", "acc_difference_low", "acc_difference_high",
             "LAMBADA accuracy − reference (points)"),
        ]
        for column, (value, low, high, xlabel) in enumerate(panels):
            axis = axes[row_index][column]
            scale = 100 if value == "acc_difference" else 1
            values = rows[value].to_numpy(dtype=float) * scale
            errors = None
            if low is not None:
                errors = [values - rows[low].to_numpy(dtype=float) * scale,
                          rows[high].to_numpy(dtype=float) * scale - values]
            axis.errorbar(values, list(positions), xerr=errors, fmt="o", color=colour, ecolor="grey", capsize=2,
                          markersize=5)
            axis.axvline(reference[value] * scale, color="black", linestyle="--", linewidth=0.9,
                         label="reference setting")
            axis.set_xlabel(xlabel)
            axis.set_yticks(list(positions), labels)
            axis.set_ylim(-0.6, len(rows) - 0.4)
            if column == 0:
                axis.set_title(f"{model_label}: {len(rows) - 1} distillation runs; reference "
                               f"{reference_description(reference)}", fontsize=9, loc="left")
            if column == 2:
                axis.text(0.98, 0.02, f"accuracy of the reference: {reference['lambada_acc']:.1%}",
                          transform=axis.transAxes, ha="right", va="bottom", fontsize=7)
    dataset = table["dataset"].iloc[0]
    figure.suptitle(f"Self-distillation ablations, one factor at a time around the reference "
                    f"($S_{{model}}$, $D_L$ on {dataset}, $h_L$ {VALUE_LABELS[final_norm]}; accuracy from stock "
                    f"lm-eval, {table['confidence'].iloc[0]:.0%} intervals)", fontsize=10)
    figure.tight_layout()
    save_figure(figure, pdf_out, png_out)
    return figure
