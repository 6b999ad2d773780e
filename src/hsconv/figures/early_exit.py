"""Early exit: each task's quality at exit l against the fraction l/L of the decoder kept, base vs distilled."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt

from hsconv.early_exit import QUALITY_METRICS
from hsconv.errors import InputError
from hsconv.figures.per_layer import METRIC_LABELS, TASK_LABELS, off_scale_exits
from hsconv.figures.style import apply_style, model_colour, save_figure, variant_label, variant_style
from hsconv.flags import Labels, flag, flags
from hsconv.io import read_input_table
from hsconv.tables import with_kind


@flags(evaluation_path=flag("the gathered per-layer evaluation table (Parquet)", name="--evaluation"),
       exits_path=flag("the early-exit table", name="--exits"), pdf_out=flag(name="--pdf"), png_out=flag(name="--png"),
       models=flag("NAME=LABEL, in order", name="--model"), tolerance=flag(minimum=0, maximum=1))
def plot_early_exit(evaluation_path: str | os.PathLike, exits_path: str | os.PathLike, pdf_out: str | os.PathLike,
                    png_out: str | os.PathLike, models: Labels, tolerance: float = 0.05) -> plt.Figure:
    """One column per model, one row per task; the shallowest exit within ``tolerance`` of the full model is starred
    (its layer comes from the early-exit table)."""
    evaluation = read_input_table(evaluation_path, "per-layer evaluation", made_by="gather-tables")
    exits = read_input_table(exits_path, "early-exit table", made_by="tabulate-early-exit")
    exits = exits[exits["tolerance"] == tolerance]
    evaluation = with_kind(evaluation)
    named = sorted(evaluation[["task", "kind"]].drop_duplicates().itertuples(index=False))
    tasks = [(task, metric) for quality_kind, metric in QUALITY_METRICS for task, kind in named
             if kind == quality_kind]
    missing = [name for name in models if name not in set(evaluation["model"])]
    if missing or not tasks:
        raise InputError(f"{evaluation_path} has no rows for model(s) {missing} or none of {list(QUALITY_METRICS)}")
    apply_style()
    figure, axes = plt.subplots(len(tasks), len(models), figsize=(4.2 * len(models), 3.2 * len(tasks)),
                                squeeze=False)
    for column, (name, model_label) in enumerate(models.items()):
        for row, (task, metric) in enumerate(tasks):
            axis = axes[row][column]
            panel = evaluation[(evaluation["model"] == name) & (evaluation["task"] == task)
                               & (evaluation["metric"] == metric)]
            num_layers = panel["layer"].max()
            label, log_scale = METRIC_LABELS.get(metric, (metric, False))
            off = off_scale_exits(panel)["layer"].unique() if log_scale else []
            if len(off):  # the embeddings' astronomical perplexity would flatten every other exit
                axis.text(0.98, 0.97, f"exit{'s' if len(off) > 1 else ''} {', '.join(map(str, off))} off scale",
                          transform=axis.transAxes, ha="right", va="top", fontsize=7)
                panel = panel[~panel["layer"].isin(off)]
            for variant, rows in panel.groupby("variant", sort=True):
                rows = rows.sort_values("layer")
                axis.plot(rows["layer"] / num_layers, rows["value"], color=model_colour(column),
                          label=variant_label(variant), markersize=3, linewidth=1.4, **variant_style(variant))
                chosen = exits[(exits["model"] == name) & (exits["variant"] == variant) & (exits["task"] == task)]
                for point in chosen.itertuples():
                    axis.plot(point.fraction_of_layers, point.value, marker="*", markersize=13, color="black",
                              markerfacecolor=model_colour(column), linestyle="none",
                              label=f"{variant_label(variant)}: first exit within {tolerance:.0%} (layer {point.layer})")
            if log_scale:
                axis.set_yscale("log")
            axis.set_xlabel(f"fraction of the {num_layers} decoder layers kept ($l/L$)")
            axis.set_ylabel(f"{TASK_LABELS.get(task, task)} {label}")
            axis.set_title(f"({chr(97 + row * len(models) + column)}) {model_label}", fontsize=10)
            axis.legend(fontsize=7, loc="best")
    figure.suptitle(f"Early exit: quality when the model stops after layer $l$\n(logit lens; star: the shallowest "
                    f"exit within {tolerance:.0%} of the full model)", fontsize=10)
    figure.tight_layout()
    save_figure(figure, pdf_out, png_out)
    return figure
