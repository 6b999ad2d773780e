"""One plotting style for every figure: a hue per model, solid for base and dashed for distilled."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from hsconv.io import atomic_path  # noqa: E402

VARIANT_LINESTYLES = {"base": "-", "distilled": "--", "tuned_lens": ":"}
VARIANT_MARKERS = {"base": "o", "distilled": "s", "tuned_lens": "^"}
# The tuned lens is the base model read through learned translators (hsconv.tuned_lens), not a third model.
VARIANT_LABELS = {"tuned_lens": "base, tuned lens"}
# Colour-blind safe, and the markers keep variants apart in greyscale.
PALETTE = sns.color_palette("colorblind")


def apply_style() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
    plt.rcParams.update({"pdf.fonttype": 42, "ps.fonttype": 42, "savefig.bbox": "tight", "figure.dpi": 100})


def model_colour(index: int):
    return PALETTE[index % len(PALETTE)]


def variant_label(variant: str) -> str:
    return VARIANT_LABELS.get(variant, variant)


def variant_style(variant: str) -> dict:
    return {"linestyle": VARIANT_LINESTYLES.get(variant, ":"), "marker": VARIANT_MARKERS.get(variant, "^")}


def save_figure(figure, pdf_path: str | os.PathLike, png_path: str | os.PathLike | None = None) -> None:
    """Vector PDF plus a PNG for quick viewing, both written atomically."""
    pdf_path = Path(pdf_path)
    png_path = Path(png_path) if png_path else pdf_path.with_suffix(".png")
    with atomic_path(pdf_path) as tmp:
        figure.savefig(tmp, format="pdf", metadata={"CreationDate": None})  # same data, same bytes
    with atomic_path(png_path) as tmp:
        figure.savefig(tmp, format="png", dpi=200)
    plt.close(figure)
