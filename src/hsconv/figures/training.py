"""Loss curves of a self-distillation run, from the trainer's per-step and per-layer logs."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt

from hsconv.errors import InputError
from hsconv.figures.style import PALETTE, apply_style, save_figure
from hsconv.flags import flag, flags
from hsconv.io import read_input_table


@flags(steps_path=flag("the per-step training log", name="--log"),
       layers_path=flag("the per-step, per-layer log", name="--layers"), pdf_out=flag(name="--pdf"),
       png_out=flag(name="--png"))
def plot_training(steps_path: str | os.PathLike, layers_path: str | os.PathLike, pdf_out: str | os.PathLike,
                  png_out: str | os.PathLike, title: str) -> None:
    steps = read_input_table(steps_path, "training log", ["step"], made_by="distill").sort_values("step")
    layers = read_input_table(layers_path, "per-layer training log", made_by="distill")
    if steps.empty or layers.empty:
        raise InputError(f"{steps_path} or {layers_path} holds no training steps")
    apply_style()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    terms = [("zeta", r"$\zeta = \zeta_1 + \alpha\,\zeta_2$", "-"), ("zeta1", r"$\zeta_1$ (weighted KL)", "--"),
             ("zeta2", r"$\zeta_2$ (weighted hidden-state steps)", ":")]
    for index, (column, label, style) in enumerate(terms):
        axes[0].plot(steps["tokens"], steps[column], style, color=PALETTE[index], label=label, marker="o",
                     markersize=5 - index, linewidth=2 - 0.4 * index)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("training tokens")
    axes[0].set_ylabel("loss (log scale; KL in nats)")
    axes[0].set_title("(a) loss per optimizer step", fontsize=10)
    axes[0].legend(fontsize=8)

    first, last = layers["step"].min(), layers["step"].max()
    # The last layer's KL starts at exactly 0 (the student is the target), so KL gets a scale that shows zero.
    for column, axis, ylabel, scale in (("kl", axes[1], r"KL$(q_l, q_\mathrm{target})$ (nats; symlog scale)",
                                         dict(value="symlog", linthresh=1e-4)),
                                        ("hidden_step", axes[2],
                                         r"$\|h_l - h_{l-1}\|^2 / \|h_{l-1}\|^2$ (log scale)", dict(value="log"))):
        for index, (step, label) in enumerate(((first, f"step {first}"), (last, f"step {last}"))):
            rows = layers[layers["step"] == step].dropna(subset=[column]).sort_values("layer")
            axis.plot(rows["layer"], rows[column], color=PALETTE[3 + index], marker="o", markersize=3,
                      linestyle="-" if index else "--", label=label)
        axis.set_yscale(**scale)
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.set_xlabel("layer $l$")
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=8)
    axes[1].set_title("(b) logit-lens KL per layer (batch mean)", fontsize=10)
    axes[2].set_title("(c) hidden-state step per layer (batch mean)", fontsize=10)
    total = int(steps["tokens"].iloc[-1])
    figure.suptitle(f"{title}: {len(steps)} optimizer steps, {total:,} tokens", fontsize=11)
    figure.tight_layout()
    save_figure(figure, pdf_out, png_out)
