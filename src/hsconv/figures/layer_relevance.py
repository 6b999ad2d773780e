"""Layer relevance: a block's movement D_l beside what removing it does, and the greedy prunings, per model."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from hsconv.errors import InputError
from hsconv.figures.per_layer import TASK_LABELS
from hsconv.figures.style import PALETTE, apply_style, save_figure, variant_label, variant_style
from hsconv.flags import Labels, flag, flags
from hsconv.io import read_input_table

METRIC_CHANGE_LABELS = {"acc": "accuracy change (points)", "word_perplexity": "word perplexity change (%)"}
ORDER_LABELS = {"block_influence": "smallest block influence (ShortGPT)", "removal_kl": "smallest removal KL"}
ORDER_MARKERS = {"block_influence": "o", "removal_kl": "s"}


@flags(table_path=flag(name="--table"), pruning_path=flag(name="--pruning"), pdf_out=flag(name="--pdf"),
       png_out=flag(name="--png"), models=flag("NAME=LABEL, in order", name="--model"))
def plot_layer_relevance(table_path: str | os.PathLike, pruning_path: str | os.PathLike, pdf_out: str | os.PathLike,
                         png_out: str | os.PathLike, models: Labels) -> plt.Figure:
    """One column per model. Rows: D_l per block (the first data set); the KL of the intact model's output to the
    output with block l removed, with its bootstrap band, per data set (log scale); then, per data set, the metric's
    change when the n least relevant blocks by each order are removed together (held-out documents)."""
    table = read_input_table(table_path, "layer-relevance table", made_by="tabulate-layer-relevance")
    pruning = read_input_table(pruning_path, "layer-pruning table", made_by="tabulate-layer-relevance")
    missing = [name for name in models if name not in set(table["model"])]
    if missing:
        raise InputError(f"{table_path} has no rows for model(s) {missing}")
    tasks = sorted(table["task"].unique())
    apply_style()
    rows = 2 + len(tasks)
    figure, axes = plt.subplots(rows, len(models), figsize=(6.4 * len(models), 3.0 * rows), squeeze=False)
    for column, (name, label) in enumerate(models.items()):
        of_model = table[table["model"] == name]
        _movement_panel(axes[0][column], of_model[of_model["task"] == tasks[0]], label)
        _removal_panel(axes[1][column], of_model, tasks, label)
        for offset, task in enumerate(tasks):
            _pruning_panel(axes[2 + offset][column], pruning[(pruning["model"] == name) & (pruning["task"] == task)],
                           f"({chr(99 + offset)}) {label}", data_label(of_model[of_model["task"] == task]))
        num_layers = int(of_model["layer"].max())
        for axis in axes[:2, column]:
            axis.set_xlabel(f"block l (1..{num_layers})")
        for axis in axes[:, column]:
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle("Layer relevance: movement beside the effect of removing each block "
                    "(base solid, self-distilled dashed)", fontsize=11)
    figure.tight_layout()
    save_figure(figure, pdf_out, png_out)
    return figure


def data_label(frame) -> str:
    """The data set as a reader knows it (LAMBADA, WikiText-2), with the config's name where it says more."""
    task, kind = frame["task"].iloc[0], frame["kind"].iloc[0]
    known = TASK_LABELS.get(kind, kind)
    return known if task == kind else f"{known} ({task})"


def _movement_panel(axis, movement, label: str) -> None:
    for variant, frame in movement.groupby("variant", sort=True):
        style = variant_style(variant)
        axis.plot(frame["layer"], frame["movement"], color=PALETTE[0], label=f"{variant_label(variant)}: D_l",
                  markersize=3, **style)
        axis.plot(frame["layer"], frame["movement_without_first"], color=PALETTE[7], markersize=2,
                  label=f"{variant_label(variant)}: first position left out", **style)
    axis.set_yscale("log")  # block 1 moves the embedding ~20x more than any later block
    axis.set_ylabel("movement $D_l$ (= BI/2)")
    axis.set_title(f"(a) {label}: movement of block l, {data_label(movement)}", fontsize=10)
    axis.legend(fontsize=7)


def _removal_panel(axis, of_model, tasks: list[str], label: str) -> None:
    for index, task in enumerate(tasks):
        for variant, frame in of_model[of_model["task"] == task].groupby("variant", sort=True):
            axis.plot(frame["layer"], frame["removal_kl"], color=PALETTE[1 + index], markersize=3,
                      label=f"{data_label(frame)}, {variant_label(variant)}", **variant_style(variant))
            axis.fill_between(frame["layer"], frame["removal_kl_low"], frame["removal_kl_high"],
                              color=PALETTE[1 + index], alpha=0.15, linewidth=0)
    axis.set_yscale("log")
    axis.set_ylabel("KL(intact ‖ removed)\n(nats per scored token)")
    axis.set_title(f"(b) {label}: removing block l alone (95% band over documents)", fontsize=10)
    axis.legend(fontsize=7)


def _pruning_panel(axis, frame, title: str, data: str) -> None:
    for (variant, order), curve in frame.groupby(["variant", "order"], sort=True):
        # accuracy in points; perplexity relative to the intact model's, in percent
        scale = 100.0 if (curve["metric"] == "acc").all() else 100.0 / curve["intact_value"]
        colour = PALETTE[3 + (order == "removal_kl")]
        axis.plot(curve["n_removed"], scale * curve["difference"], color=colour, markersize=4,
                  label=f"{variant_label(variant)}, {ORDER_LABELS[order]}",
                  **(variant_style(variant) | {"marker": ORDER_MARKERS[order]}))
        axis.fill_between(curve["n_removed"], scale * curve["difference_low"], scale * curve["difference_high"],
                          color=colour, alpha=0.12, linewidth=0)
    axis.axhline(0, color="black", linewidth=0.6)
    if frame.empty:  # one document: it ranked the blocks, none is left to score the prunings on
        axis.text(0.5, 0.5, "no held-out (odd-numbered) document", transform=axis.transAxes, ha="center")
    else:
        axis.legend(fontsize=7)
    metric = frame["metric"].iloc[0] if len(frame) else ""
    axis.set_ylabel(METRIC_CHANGE_LABELS.get(metric, metric or "change"))
    axis.set_xlabel("blocks removed together (n)")
    axis.set_title(f"{title}: the n least relevant removed, {data} (held-out half)", fontsize=10)
