"""Fig. 7: how one model arrives at the last tokens of a sentence, layer by layer, read through the logit lens.

Top: for each variant a layers × positions heatmap; a column is an input position whose next token is one of the
target tokens (" at", " the", " top" in the paper's sentence), a cell the logit lens's top-1 token at that layer,
coloured by its probability, bold where it is the token that really comes next. Bottom: D_l per layer at each of
those positions, base solid and distilled dashed.
"""

from __future__ import annotations

import os
import textwrap

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.gridspec import GridSpec

from hsconv.errors import InputError
from hsconv.figures.style import apply_style, model_colour, save_figure, variant_style
from hsconv.flags import flag, flags
from hsconv.io import read_input_table
from hsconv.names import Convention

CONVENTION_LABELS = {"hf": "last state after the final norm", "pre_norm": "last state before the final norm"}
HEATMAP_COLOURS = "Blues"
MAX_TOKEN_CHARS = 10


def readable_token(text: str) -> str:
    """A token as a reader can see it: a visible mark for spaces and line breaks, long tokens shortened."""
    text = text.replace("\n", "↵").replace("\t", "⇥").replace(" ", "␣")
    return text if len(text) <= MAX_TOKEN_CHARS else text[:MAX_TOKEN_CHARS - 1] + "…"


@flags(table_path=flag("the gathered sentence logit-lens table (Parquet)", name="--table"),
       pdf_out=flag(name="--pdf"), png_out=flag(name="--png"), label="the model's label in the title")
def plot_lens_heatmap(table_path: str | os.PathLike, pdf_out: str | os.PathLike, png_out: str | os.PathLike,
                      model: str, label: str, variants: list[str], final_norm: Convention = "hf",
                      title: str = "Fig. 7"):
    """Returns the (closed) figure; heatmap ``i`` is axes ``i`` and holds its probabilities as an image."""
    full = read_input_table(table_path, "sentence logit-lens table", made_by="gather-tables")
    full = full[full["model"] == model]
    table = full[full["predicts_target"]]
    missing = [variant for variant in variants if table[table["variant"] == variant].empty]
    if missing:
        raise InputError(f"{table_path} has no logit-lens rows of model {model!r} for variant(s) {missing}")
    positions = sorted(table["position"].unique())
    num_layers = int(table["layer"].max())
    apply_style()
    heatmap_height = max(0.22 * (num_layers + 1), 2.6) + 1.0
    figure = plt.figure(figsize=(max(7.5, 3.2 * len(variants) + 1.2), heatmap_height + 3.4), layout="constrained")
    grid = GridSpec(2, 1, figure=figure, height_ratios=[heatmap_height, 2.6])
    heatmap_grid = grid[0].subgridspec(1, len(variants))
    movement_grid = grid[1].subgridspec(1, len(positions))
    image = None
    for index, variant in enumerate(variants):
        image = _draw_heatmap(figure.add_subplot(heatmap_grid[0, index]), table[table["variant"] == variant],
                              positions, index, variant)
    colourbar = figure.colorbar(image, ax=figure.axes[:len(variants)], shrink=0.6, pad=0.03)
    colourbar.set_label("top-1 probability")

    shared_axis = None
    for column, position in enumerate(positions):
        axis = figure.add_subplot(movement_grid[0, column], sharey=shared_axis)
        shared_axis = shared_axis or axis
        _draw_movement(axis, table, position, variants, f"movement_{final_norm}", len(variants) + column)
    tokens = full.drop_duplicates("position").sort_values("position")
    sentence = "".join(tokens["token"]) + tokens["next_token"].iloc[-1]
    figure.suptitle(f"{title}: {label}, the logit lens predicting the last {len(positions)} tokens of\n"
                    + "\n".join(textwrap.wrap(f"“{sentence.strip()}”", 100))
                    + f"\n(bold: the true next token; D$_l$: {CONVENTION_LABELS.get(final_norm, final_norm)})",
                    fontsize=9)
    save_figure(figure, pdf_out, png_out)
    return figure


def _draw_heatmap(axis, rows: pd.DataFrame, positions: list[int], index: int, variant: str):
    """One variant's top-1 token and probability per layer (rows) at each traced position (columns)."""
    cells = rows.pivot(index="layer", columns="position", values="top1_prob").loc[::-1, positions]
    tokens = rows.pivot(index="layer", columns="position", values="top1_token").loc[::-1, positions]
    correct = (rows.pivot(index="layer", columns="position", values="top1_id")
               == rows.pivot(index="layer", columns="position", values="next_token_id")).loc[::-1, positions]
    image = axis.imshow(cells.to_numpy(), cmap=HEATMAP_COLOURS, vmin=0, vmax=1, aspect="auto")
    for row, layer in enumerate(cells.index):
        for column, position in enumerate(positions):
            probability = cells.loc[layer, position]
            axis.text(column, row, readable_token(tokens.loc[layer, position]), ha="center", va="center",
                      fontsize=6.5, color="white" if probability > 0.55 else "black",
                      fontweight="bold" if correct.loc[layer, position] else "normal")
    context = rows.drop_duplicates("position").set_index("position")
    axis.set_xticks(range(len(positions)))
    axis.set_xticklabels([f"{readable_token(context.loc[p, 'token'])}\n→ {readable_token(context.loc[p, 'next_token'])}"
                          for p in positions], fontsize=8)
    axis.xaxis.tick_top()
    axis.set_yticks(range(len(cells.index)))
    axis.set_yticklabels([str(layer) for layer in cells.index], fontsize=6.5)
    if index == 0:
        axis.set_ylabel("exit layer $l$ (0 = embeddings)")
    axis.set_title(f"({chr(97 + index)}) {variant}: top-1 token per layer", fontsize=9)
    axis.grid(False)
    return image


def _draw_movement(axis, table: pd.DataFrame, position: int, variants: list[str], movement: str, panel: int) -> None:
    """D_l per layer at one traced position, one line per variant."""
    for variant in variants:
        rows = table[(table["variant"] == variant) & (table["position"] == position) & (table["layer"] > 0)]
        rows = rows.sort_values("layer")
        axis.plot(rows["layer"], rows[movement], color=model_colour(0), label=variant, markersize=2.5,
                  linewidth=1.2, **variant_style(variant))
    context = table[table["position"] == position].iloc[0]
    axis.set_title(f"({chr(97 + panel)}) D$_l$ at "
                   f"{readable_token(context['token'])} → {readable_token(context['next_token'])}", fontsize=9)
    axis.set_xlabel("layer $l$")
    # D_1 is an order of magnitude above the rest; a log scale keeps the last layers' rise visible.
    axis.set_yscale("log")
    if panel == len(variants):
        axis.set_ylabel("$D_l$ (log scale)")
        axis.legend(fontsize=7, title="variant", title_fontsize=7)
    axis.xaxis.get_major_locator().set_params(integer=True)
