"""Fig. 4: the hidden states of one sentence at every layer, projected to 3-D by PCA, one panel per model and variant.

Each panel shows every (token, layer) state as a point coloured by layer, and the path of the mean state over
the sentence's tokens from the input embedding (layer 0) to the last layer, with layers labelled. The PCA is fit per
panel (the stage that wrote the table fits it on all layers' states of that model and variant); all panels share
one axis range, so distances compare across panels.
"""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import cm
from matplotlib.colors import Normalize

from hsconv.errors import InputError
from hsconv.figures.style import apply_style, save_figure
from hsconv.flags import Labels, flag, flags
from hsconv.io import read_input_table
from hsconv.names import Convention

CONVENTION_LABELS = {"hf": "last state after the final norm", "pre_norm": "last state before the final norm"}
AXES = ("pc1", "pc2", "pc3")


def labelled_layers(num_layers: int) -> list[int]:
    """Layers named on the path: the input and the last three (where the jump is). The early and middle layers
    bunch together in PCA space, so labelling them only makes the labels overlap."""
    return sorted({0, num_layers - 2, num_layers - 1, num_layers} - {-1})


def mean_path(rows: pd.DataFrame) -> pd.DataFrame:
    """The mean over tokens of each layer's projected state (the projection is linear, so this is the projected
    mean state)."""
    return rows.groupby("layer", sort=True)[list(AXES)].mean()


@flags(table_path=flag("the gathered sentence PCA table (Parquet)", name="--table"), pdf_out=flag(name="--pdf"),
       png_out=flag(name="--png"), models=flag("NAME=LABEL, in order", name="--model"))
def plot_trajectory(table_path: str | os.PathLike, pdf_out: str | os.PathLike, png_out: str | os.PathLike,
                    models: Labels, variants: list[str], final_norm: Convention = "hf", title: str = "Fig. 4"):
    """Returns the (closed) figure; the mean path of each panel is its first line."""
    table = read_input_table(table_path, "sentence PCA table", made_by="gather-tables")
    table = table[table["final_norm"] == final_norm]
    panels = [(name, label, variant) for name, label in models.items() for variant in variants]
    missing = [f"{name}/{variant}" for name, _, variant in panels
               if table[(table["model"] == name) & (table["variant"] == variant)].empty]
    if missing:
        raise InputError(f"{table_path} has no {final_norm} PCA rows for {missing}")
    apply_style()
    figure = plt.figure(figsize=(5.4 * len(variants) + 1.0, 4.6 * len(models) + 0.8))
    selected = table[table["model"].isin(list(models)) & table["variant"].isin(variants)]
    low, high = selected[list(AXES)].min().min(), selected[list(AXES)].max().max()
    margin = 0.05 * (high - low)
    for index, (name, label, variant) in enumerate(panels):
        rows = table[(table["model"] == name) & (table["variant"] == variant)]
        num_layers = int(rows["layer"].max())
        axis = figure.add_subplot(len(models), len(variants), index + 1, projection="3d")
        colours = Normalize(vmin=0, vmax=num_layers)
        axis.scatter(rows["pc1"], rows["pc2"], rows["pc3"], c=rows["layer"], cmap="viridis", norm=colours, s=5,
                     alpha=0.35, depthshade=False, linewidths=0)
        path = mean_path(rows)
        axis.plot(path["pc1"], path["pc2"], path["pc3"], color="black", linewidth=1.4, marker="o", markersize=2.5,
                  label="mean over tokens")
        for layer in labelled_layers(num_layers):
            point = path.loc[layer]
            axis.text(point["pc1"], point["pc2"], point["pc3"], f" {layer}", fontsize=7, color="black")
        for setter in (axis.set_xlim, axis.set_ylim, axis.set_zlim):
            setter(low - margin, high + margin)
        explained = [rows[f"explained_{component}"].iloc[0] for component in AXES]
        axis.set_xlabel(f"PC1 ({explained[0]:.0%})", fontsize=8, labelpad=-2)
        axis.set_ylabel(f"PC2 ({explained[1]:.0%})", fontsize=8, labelpad=-2)
        axis.set_zlabel(f"PC3 ({explained[2]:.0%})", fontsize=8, labelpad=-2)
        axis.tick_params(labelsize=6, pad=-1)
        jump = np.linalg.norm(path.iloc[-1].to_numpy() - path.iloc[-2].to_numpy())
        axis.set_title(f"({chr(97 + index)}) {label}, {variant}\n{rows['position'].nunique()} tokens × "
                       f"{num_layers + 1} layers; last step of the\nmean path (layer {num_layers - 1} → {num_layers}):"
                       f" {jump:,.0f}", fontsize=8.5)
        axis.view_init(elev=22, azim=-60)
    colourbar = figure.colorbar(cm.ScalarMappable(norm=Normalize(0, int(table["layer"].max())), cmap="viridis"),
                                ax=figure.axes, shrink=0.5, pad=0.06, location="right")
    colourbar.set_label("layer $l$ of a point (0 = input embedding)", fontsize=9)
    colourbar.ax.tick_params(labelsize=8)
    figure.suptitle(f"{title}: hidden states of one sentence, every layer, projected on their first three principal "
                    f"components\n(PCA per panel on all layers' states; {CONVENTION_LABELS.get(final_norm, final_norm)};"
                    f" black: the path of the mean state, layers labelled; axes in the units of $h$)", fontsize=9)
    save_figure(figure, pdf_out, png_out)
    return figure
