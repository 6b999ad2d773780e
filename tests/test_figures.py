"""Figures plot exactly their tables' numbers (Figs. 3/8 and 5/6/9/10; Figs. 4 and 7 in test_sentence.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hsconv.figures.movement import plot_movement
from hsconv.figures.per_layer import off_scale_exits, plot_per_layer


def _per_layer_table(path):
    layers = np.arange(5)
    rows = []
    for variant, scale in (("base", 1.0), ("distilled", 0.5)):
        values = scale * np.array([3e40, 2e6, 1e5, 300.0, 40.0])  # exit 0 astronomically high, as on WikiText
        rows += [{"model": "m", "variant": variant, "task": "wikitext", "metric": "word_perplexity", "layer": layer,
                  "value": value, "stderr": np.nan, "n_samples": 1} for layer, value in zip(layers, values)]
    frame = pd.DataFrame(rows)
    frame.to_parquet(path)
    return frame


def test_per_layer_figure_plots_its_table_and_names_off_scale_exits(tmp_path):
    table = _per_layer_table(tmp_path / "t.parquet")
    figure = plot_per_layer(tmp_path / "t.parquet", tmp_path / "f.pdf", tmp_path / "f.png", {"m": "model m"},
                            "wikitext", "word_perplexity", "Fig. 6")
    axis = figure.axes[0]
    for line, variant in zip(axis.lines, ("base", "distilled")):
        expected = table[table["variant"] == variant].sort_values("layer")
        np.testing.assert_array_equal(line.get_xdata(), expected["layer"])
        np.testing.assert_array_equal(line.get_ydata(), expected["value"])  # off-scale points are still plotted
    assert axis.get_ylim()[1] < 3e40  # ... but the axis shows the other exits
    notes = [text.get_text() for text in axis.texts]
    assert notes == ["exit 0 off scale: base 3.0e+40, distilled 1.5e+40"]
    assert axis.get_title().endswith("1 document")
    assert list(off_scale_exits(table)["layer"].unique()) == [0]
    assert off_scale_exits(table[table["layer"] > 0]).empty


def test_movement_figure_plots_its_table(tmp_path):
    rows = [{"model": "m", "variant": variant, "dataset": "lambada", "final_norm": "pre_norm", "layer": layer,
             "movement_mean": 0.1 * layer + offset, "ci_low": 0.1 * layer + offset - 0.01,
             "ci_high": 0.1 * layer + offset + 0.01, "ci_level": 0.95, "n_tokens": 100, "n_documents": 4}
            for variant, offset in (("base", 0.0), ("distilled", 0.05)) for layer in range(1, 5)]
    table = pd.DataFrame(rows)
    table.to_parquet(tmp_path / "t.parquet")
    figure = plot_movement(tmp_path / "t.parquet", tmp_path / "f.pdf", tmp_path / "f.png", {"m": "model m"},
                           "lambada", "pre_norm", title="Fig. 8")
    lines = figure.axes[0].lines
    for line, variant in zip(lines, ("base", "distilled")):
        np.testing.assert_allclose(line.get_ydata(), table[table["variant"] == variant]["movement_mean"])
    assert figure.texts[0].get_text().startswith("Fig. 8: hidden-state movement")


def test_early_exit_figure_plots_its_tables(tmp_path):
    from hsconv.early_exit import shallowest_exits
    from hsconv.figures.early_exit import plot_early_exit

    rows = []
    for variant, accuracy in (("base", [0.0, 0.1, 0.3, 0.58, 0.6]), ("tuned_lens", [0.05, 0.3, 0.5, 0.59, 0.6])):
        rows += [{"model": "m", "variant": variant, "task": "lambada", "metric": "acc", "layer": layer,
                  "value": value, "stderr": 0.01, "n_samples": 100} for layer, value in enumerate(accuracy)]
    evaluation = pd.DataFrame(rows)
    evaluation.to_parquet(tmp_path / "evaluation.parquet")
    exits = shallowest_exits(evaluation, (0.05,))
    exits.to_parquet(tmp_path / "exits.parquet")
    figure = plot_early_exit(tmp_path / "evaluation.parquet", tmp_path / "exits.parquet", tmp_path / "f.pdf",
                             tmp_path / "f.png", {"m": "model m"}, tolerance=0.05)
    axis = figure.axes[0]
    curves = [line for line in axis.lines if line.get_marker() != "*"]
    stars = [line for line in axis.lines if line.get_marker() == "*"]
    for line, variant in zip(curves, ("base", "tuned_lens")):
        expected = evaluation[evaluation["variant"] == variant]
        np.testing.assert_allclose(line.get_xdata(), expected["layer"] / 4)
        np.testing.assert_allclose(line.get_ydata(), expected["value"])
    # the stars are the table's shallowest exits: layer 3 (0.58 >= 0.57) for base, 3 (0.59) for the tuned lens
    assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in stars] == [(0.75, 0.58), (0.75, 0.59)]
    assert list(exits["layer"]) == [3, 3]
    assert [text.get_text() for text in axis.get_legend().get_texts()] == [
        "base", "base: first exit within 5% (layer 3)", "base, tuned lens",
        "base, tuned lens: first exit within 5% (layer 3)"]
