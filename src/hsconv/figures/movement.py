"""Figs. 3 and 8: movement D_l of the hidden state at each layer, one panel per model, base vs distilled."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt

from hsconv.errors import InputError
from hsconv.figures.style import apply_style, model_colour, save_figure, variant_style
from hsconv.flags import Labels, flag, flags
from hsconv.io import read_input_table
from hsconv.names import Convention

DATASET_LABELS = {"lambada": "LAMBADA", "wikitext": "WikiText-2"}
CONVENTION_LABELS = {"hf": "last state after the final norm", "pre_norm": "last state before the final norm"}


@flags(layer_table=flag("the gathered layer-movement table (Parquet)", name="--table"), pdf_out=flag(name="--pdf"),
       png_out=flag(name="--png"), models=flag("NAME=LABEL, in order", name="--model"))
def plot_movement(layer_table: str | os.PathLike, pdf_out: str | os.PathLike, png_out: str | os.PathLike,
                  models: Labels, dataset: str, final_norm: Convention = "hf", title: str = "Fig. 3"):
    """``models`` maps each model name to its label, in panel order. Returns the (closed) figure."""
    table = read_input_table(layer_table, "layer-movement table", made_by="gather-tables")
    table = table[(table["dataset"] == dataset) & (table["final_norm"] == final_norm)]
    missing = [name for name in models if name not in set(table["model"])]
    if missing:
        raise InputError(f"{layer_table} has no rows for model(s) {missing} on {dataset!r} ({final_norm})")
    apply_style()
    figure, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.4), squeeze=False, sharey=False)
    for index, ((name, label), axis) in enumerate(zip(models.items(), axes[0])):
        for variant, rows in table[table["model"] == name].groupby("variant", sort=True):
            rows = rows.sort_values("layer")
            style = variant_style(variant)
            axis.plot(rows["layer"], rows["movement_mean"], color=model_colour(index), label=variant,
                      markersize=3.5, linewidth=1.5, **style)
            axis.fill_between(rows["layer"], rows["ci_low"], rows["ci_high"], color=model_colour(index), alpha=0.2,
                              linewidth=0)
            floor = rows["norm_floor"].dropna() if "norm_floor" in rows.columns else ()
            if final_norm == "hf" and len(floor):  # what the final norm alone contributes to D_L(hf)
                axis.scatter([rows["layer"].max()], [floor.iloc[-1]], marker="x", s=30, color=model_colour(index),
                             zorder=3, label=f"{variant}: norm floor " r"$D(h_{L-1}, \mathrm{Norm}(h_{L-1}))$")
        tokens, documents = int(rows["n_tokens"].iloc[0]), int(rows["n_documents"].iloc[0])
        axis.set_title(f"({chr(97 + index)}) {label}\n{tokens:,} tokens, {documents:,} documents", fontsize=10)
        axis.set_xlabel("layer $l$")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.set_ylabel(r"$D_l = (1 - \cos(h_{l-1}, h_l))\,/\,2$")
        axis.legend(title="variant", fontsize=8, title_fontsize=8)
    level = table["ci_level"].iloc[0]
    figure.suptitle(f"{title}: hidden-state movement per layer on {DATASET_LABELS.get(dataset, dataset)}\n"
                    f"({CONVENTION_LABELS.get(final_norm, final_norm)}; mean over tokens, band: {level:.0%} "
                    f"bootstrap interval over documents)",
                    fontsize=10)
    figure.tight_layout()
    save_figure(figure, pdf_out, png_out)
    return figure
