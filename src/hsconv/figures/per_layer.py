"""Figs. 5, 6, 9, 10: an lm-eval metric at every exit layer (logit lens), one panel per model, base vs distilled."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import pandas as pd

from hsconv.errors import InputError
from hsconv.figures.style import apply_style, model_colour, save_figure, variant_label, variant_style
from hsconv.flags import Labels, flag, flags
from hsconv.io import read_input_table

METRIC_LABELS = {
    "acc": ("accuracy", False),
    "perplexity": ("perplexity of the target word (log scale)", True),
    "word_perplexity": ("word perplexity (log scale)", True),
    "byte_perplexity": ("byte perplexity (log scale)", True),
    "bits_per_byte": ("bits per byte", False),
}
TASK_LABELS = {"lambada": "LAMBADA", "wikitext": "WikiText-2"}
# On a log scale, exits this many times above every later exit are drawn off the axis (with their value written
# at the top), so that one astronomical value (the embeddings' perplexity) does not flatten all the others.
OFF_SCALE_FACTOR = 1e4


def off_scale_exits(panel: pd.DataFrame) -> pd.DataFrame:
    """The leading exits whose value is above OFF_SCALE_FACTOR × the largest value of the exits after them."""
    by_layer = panel.groupby("layer")["value"].max().sort_index()
    off = []
    for layer, value in by_layer.items():
        later = by_layer[by_layer.index > layer]
        if later.empty or not value > OFF_SCALE_FACTOR * later.max():
            break
        off.append(layer)
    return panel[panel["layer"].isin(off)]


@flags(table_path=flag("the gathered per-layer evaluation table (Parquet)", name="--table"),
       pdf_out=flag(name="--pdf"), png_out=flag(name="--png"), models=flag("NAME=LABEL, in order", name="--model"))
def plot_per_layer(table_path: str | os.PathLike, pdf_out: str | os.PathLike, png_out: str | os.PathLike,
                   models: Labels, task: str, metric: str, title: str):
    table = read_input_table(table_path, "per-layer evaluation", made_by="gather-tables")
    table = table[(table["task"] == task) & (table["metric"] == metric)]
    missing = [name for name in models if name not in set(table["model"])]
    if missing:
        raise InputError(f"{table_path} has no {task} {metric} rows for model(s) {missing}")
    label, log_scale = METRIC_LABELS.get(metric, (metric, False))
    apply_style()
    figure, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.4), squeeze=False)
    for index, ((name, model_label), axis) in enumerate(zip(models.items(), axes[0])):
        panel = table[table["model"] == name]
        for variant, rows in panel.groupby("variant", sort=True):
            rows = rows.sort_values("layer")
            axis.plot(rows["layer"], rows["value"], color=model_colour(index), label=variant_label(variant),
                      markersize=3.5, linewidth=1.5, **variant_style(variant))
            if rows["stderr"].notna().any():
                axis.fill_between(rows["layer"], rows["value"] - 1.96 * rows["stderr"],
                                  rows["value"] + 1.96 * rows["stderr"], color=model_colour(index), alpha=0.2,
                                  linewidth=0)
        samples = int(rows["n_samples"].iloc[0]) if rows["n_samples"].notna().any() else None
        documents = f"\n{samples:,} document{'s' if samples != 1 else ''}" if samples else ""
        axis.set_title(f"({chr(97 + index)}) {model_label}{documents}", fontsize=10)
        axis.set_xlabel("exit layer $l$ (0 = embeddings)")
        axis.set_ylabel(label)
        if log_scale:
            axis.set_yscale("log")
            off = off_scale_exits(panel)
            if not off.empty:
                shown = panel[~panel["layer"].isin(off["layer"])]["value"]
                # headroom above the highest shown value for the note
                axis.set_ylim(shown.min() / 1.5, shown.max() * 1e3)
                notes = [f"exit {layer} off scale: " + ", ".join(f"{row.variant} {row.value:.1e}" for row in
                                                                 values.sort_values("variant").itertuples())
                         for layer, values in off.groupby("layer")]
                axis.text(0.98, 0.97, "\n".join(notes), transform=axis.transAxes, ha="right", va="top", fontsize=7,
                          bbox={"facecolor": "white", "edgecolor": "0.8", "alpha": 0.9})
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.legend(title="variant", fontsize=8, title_fontsize=8)
    band = " (band: ±1.96 standard errors)" if table["stderr"].notna().any() else ""
    figure.suptitle(f"{title}: {TASK_LABELS.get(task, task)} {label.split(' (')[0]} at every layer through the "
                    f"logit lens{band}", fontsize=10)
    figure.tight_layout()
    save_figure(figure, pdf_out, png_out)
    return figure
