"""Does the convergence that distillation buys hold past the training sequences' length? S_model and the last-layer
ratio of hidden-state dumps, by bands of token position.

    python -m studies.position_convergence --dump base=results/hidden/smollm2-135m/base/wikitext.parquet \\
        --dump distilled=results/hidden/smollm2-135m/distilled/wikitext.parquet --bands 0 64 128 256 512 \\
        --out docs/findings/recipe/positions

The default trains on sequences of `packing.sequence_length` (128) tokens while WikiText is measured in windows of
up to `hidden_states.max_tokens` (1024): positions past 128 never enter the loss. For each dump and band of
positions [b_i, b_{i+1}) (the last open-ended): the tokens in it, the mean movement D_l of every layer over them, and
from it S_model and D_L / D_{L−1} (hsconv.metrics.convergence_score, as the convergence table computes them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from hsconv.metrics import convergence_score


def position_convergence(dump: pd.DataFrame, bands: list[int], convention: str = "pre_norm") -> pd.DataFrame:
    """One row per band of positions: tokens, S_model and the last-layer ratio of the band's mean movements."""
    column = f"movement_{convention}"
    edges = [*bands, np.inf]
    rows = []
    for start, stop in zip(edges[:-1], edges[1:]):
        band = dump[(dump["position"] >= start) & (dump["position"] < stop)]
        if band.empty:
            continue
        movement = band.groupby("layer")[column].mean().sort_index().to_numpy()
        rows.append({"positions": f"{start}-{'' if stop == np.inf else int(stop) - 1}",
                     "tokens": int((band["layer"] == band["layer"].max()).sum()),
                     "s_model": float(convergence_score(movement)),
                     "last_layer_ratio": float(movement[-1] / movement[-2])})
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", action="append", required=True, metavar="NAME=PATH",
                        help="a hidden-state dump (dump-hidden-states' Parquet), named")
    parser.add_argument("--bands", type=int, nargs="+", default=[0, 64, 128, 256, 512],
                        help="the bands' first positions (the first should be 0)")
    parser.add_argument("--convention", choices=["pre_norm", "hf"], default="pre_norm")
    parser.add_argument("--out", required=True, help="writes OUT.csv and OUT.md")
    args = parser.parse_args(argv)
    tables = []
    for item in args.dump:
        name, _, path = item.partition("=")
        dump = pd.read_parquet(path, columns=["position", "layer", f"movement_{args.convention}"])
        tables.append(position_convergence(dump, args.bands, args.convention).assign(dump=name, path=path))
    table = pd.concat(tables, ignore_index=True)[["dump", "positions", "tokens", "s_model", "last_layer_ratio", "path"]]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_suffix(".csv"), index=False)
    out.with_suffix(".md").write_text(table.drop(columns="path").to_markdown(index=False, floatfmt=".3f") + "\n")
    print(table.drop(columns="path").to_string(index=False))


if __name__ == "__main__":
    main()
