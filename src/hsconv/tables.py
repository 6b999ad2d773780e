"""The result tables: per-model pieces gathered into one table for machines (Parquet) and people (CSV, Markdown)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from hsconv.flags import flag, flags, table_stem
from hsconv.io import read_input_table, write_table


def with_kind(table: pd.DataFrame) -> pd.DataFrame:
    """The table with its `kind` column (what each data set is: `lambada`, `wikitext`), which consumers match on; a
    table written before the column existed named its data sets by their kind, so there the kind is the task."""
    return table if "kind" in table.columns else table.assign(kind=table["task"])


@flags(paths=flag(name="--inputs"), columns="keep and order these columns",
       out_stem=flag("the Parquet table; .csv and .md are written beside it", name="--out", type=table_stem))
def gather_tables(paths: list[str], out_stem: str | os.PathLike, config_hash: str, columns: list[str] | None = None,
                  ) -> pd.DataFrame:
    """Concatenate per-model tables into one result table (Parquet, CSV, Markdown) with the config hash."""
    frame = pd.concat([read_input_table(path, "table to gather", allow_empty=True) for path in paths],
                      ignore_index=True)
    if columns:
        frame = frame[columns]
    write_table(frame, Path(out_stem), {"config_hash": config_hash, "inputs": [str(p) for p in paths]})
    return frame
