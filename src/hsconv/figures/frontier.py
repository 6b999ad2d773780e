"""The recipes' frontier: S_model against what each recipe costs the output, one panel per model."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt

from hsconv.errors import InputError
from hsconv.figures.ablations import VALUE_LABELS, setting_label
from hsconv.figures.style import apply_style, model_colour, save_figure
from hsconv.flags import Labels, flag, flags
from hsconv.io import read_input_table
from hsconv.names import Convention


@flags(table_path=flag("the recipes table", name="--table"), pdf_out=flag(name="--pdf"),
       png_out=flag(name="--png"), models=flag("NAME=LABEL, in order", name="--model"))
def plot_frontier(table_path: str | os.PathLike, pdf_out: str | os.PathLike, png_out: str | os.PathLike,
                  models: Labels, final_norm: Convention = "pre_norm") -> plt.Figure:
    """Each setting of a recipes (or ablations) table as a point: its LAMBADA accuracy difference from the table's
    baseline (paired interval) across, S_model (bootstrap interval) up; the pretrained model is the point at zero
    when it is the baseline. A setting up and to the right of another is better on both."""
    table = read_input_table(table_path, "recipes table", ["model", "setting", "s_model", "acc_difference"],
                             made_by="tabulate-variants")
    table = table[table["final_norm"] == final_norm]
    missing = [name for name in models if name not in set(table["model"])]
    if missing:
        raise InputError(f"{table_path} has no {final_norm} rows for model(s) {missing}")
    apply_style()
    figure, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    for index, (name, label) in enumerate(models.items()):
        axis = axes[0][index]
        rows = table[table["model"] == name]
        x = rows["acc_difference"].to_numpy(dtype=float) * 100
        y = rows["s_model"].to_numpy(dtype=float)
        axis.errorbar(x, y, xerr=[x - rows["acc_difference_low"].to_numpy(dtype=float) * 100,
                                  rows["acc_difference_high"].to_numpy(dtype=float) * 100 - x],
                      yerr=[y - rows["s_model_ci_low"].to_numpy(dtype=float),
                            rows["s_model_ci_high"].to_numpy(dtype=float) - y],
                      fmt="o", color=model_colour(index), ecolor="grey", capsize=2, markersize=5)
        for position, (row, x_value, y_value) in enumerate(zip(rows.itertuples(), x, y)):
            # alternate above and below, so that two settings with the same S_model keep legible labels
            axis.annotate(setting_label(row), (x_value, y_value), textcoords="offset points",
                          xytext=(4, 4 if position % 2 == 0 else -11), fontsize=7)
        baseline = rows["accuracy_baseline"].iloc[0]
        axis.axvline(0, color="black", linestyle="--", linewidth=0.9)
        axis.set_xlabel(f"LAMBADA accuracy − {'pretrained' if baseline == 'base' else baseline} (points)")
        axis.set_ylabel(f"$S_{{model}}$, $h_L$ {VALUE_LABELS[final_norm]} (higher: smoother convergence)")
        axis.set_title(f"{label}: {len(rows)} models, {int(rows['n_documents'].iloc[0])} passages of "
                       f"{rows['dataset'].iloc[0]}", fontsize=9, loc="left")
    figure.suptitle(f"Distillation settings on validation text: convergence against the output's accuracy "
                    f"({table['confidence'].iloc[0]:.0%} intervals)", fontsize=10)
    figure.tight_layout()
    save_figure(figure, pdf_out, png_out)
    return figure
