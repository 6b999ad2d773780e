"""studies.position_convergence: S_model and the last-layer ratio by band of token position, against a hand count."""

from __future__ import annotations

import pandas as pd
import pytest

from studies.position_convergence import position_convergence


def dump(movements_by_position: dict[int, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"position": position, "layer": layer + 1, "movement_pre_norm": value}
                         for position, movements in movements_by_position.items()
                         for layer, value in enumerate(movements)])


def test_bands_split_by_position_and_score_their_own_mean_movements():
    # positions 0 and 1: D = 0.4, 0.2, 0.3 and 0.2, 0.2, 0.5 -> mean 0.3, 0.2, 0.4: one fall of 0.1, one rise of 0.2
    # position 5 (the open-ended band): D = 0.5, 0.3, 0.1, only falls
    table = position_convergence(dump({0: [0.4, 0.2, 0.3], 1: [0.2, 0.2, 0.5], 5: [0.5, 0.3, 0.1]}), [0, 2])
    assert table["positions"].tolist() == ["0-1", "2-"]
    assert table["tokens"].tolist() == [2, 1]
    assert table["s_model"].tolist() == pytest.approx([1 - 0.2 / 0.3, 1.0])
    assert table["last_layer_ratio"].tolist() == pytest.approx([0.4 / 0.2, 0.1 / 0.3])


def test_an_empty_band_is_left_out():
    table = position_convergence(dump({0: [0.3, 0.2], 9: [0.3, 0.1]}), [0, 2, 4])
    assert table["positions"].tolist() == ["0-1", "4-"]
