"""Early exit as an actual smaller model: the first l decoder layers of a model, with its final norm and head.

Exit l of the logit lens reads LMHead(FinalNorm(h_l)); a model cut after layer l computes exactly that as its
output. So the lens's per-layer numbers are what a pruned model delivers, which the tests check with stock lm-eval
on the pruned model (the paper's stated next step: once hidden states converge, the last layers can go).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd

from hsconv.architectures import family_of_config
from hsconv.errors import InputError
from hsconv.flags import flag, flags, table_stem
from hsconv.io import atomic_path, read_input_table, write_table
from hsconv.models import MODEL_MANIFEST, load_model, save_hf
from hsconv.settings import EarlyExitSettings
from hsconv.tables import with_kind

log = logging.getLogger(__name__)


@flags(keep_layers=flag("decoder layers to keep, from the first", minimum=1, required=False),
       keep_fraction=flag("the fraction of the decoder layers to keep (rounded)", exclusiveMinimum=0, maximum=1),
       out_dir=flag("model directory to write", name="--out"))
def prune_model(model_dir: str | os.PathLike, keep_layers: int | None, out_dir: str | os.PathLike,
                keep_fraction: float | None = None) -> Path:
    """Write ``out_dir``: the model of ``model_dir`` with only its first ``keep_layers`` decoder layers (or
    :func:`kept_layers` of ``keep_fraction``)."""
    if (keep_layers is None) == (keep_fraction is None):
        raise InputError("give one of them", "--keep-layers, --keep-fraction")
    loaded = load_model(model_dir)
    model, total = loaded.model, loaded.num_layers
    if keep_layers is None:
        keep_layers = kept_layers(total, keep_fraction)
    if not 1 <= keep_layers <= total:
        raise InputError(f"keep_layers={keep_layers} is out of range: model {loaded.name!r} has layers 1..{total}")
    decoder, blocks = model.get_decoder(), family_of_config(model.config).layers
    setattr(decoder, blocks, getattr(decoder, blocks)[:keep_layers])
    model.config.num_hidden_layers = keep_layers
    # Per-layer config lists (attention kinds in Qwen2 and newer Llama configs) must match the layer count.
    for key in ("layer_types",):
        if isinstance(getattr(model.config, key, None), list):
            setattr(model.config, key, getattr(model.config, key)[:keep_layers])
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_hf(model, loaded.tokenizer, tmp)
        manifest = {"name": f"{loaded.name}-first{keep_layers}", "weights": None,
                    "source": {"kind": "pruned", "from": str(model_dir), "keep_layers": keep_layers,
                               "of_layers": total}}
        (tmp / MODEL_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("%s: kept layers 1..%d of %d -> %s", loaded.name, keep_layers, total, out_dir)
    return out_dir


# The quality each task's early exit is judged by, and which way is better.
QUALITY_METRICS = {("lambada", "acc"): "higher", ("wikitext", "word_perplexity"): "lower"}


def kept_layers(num_layers: int, keep_fraction: float) -> int:
    """The decoder layers a pruned model keeps: ``keep_fraction`` of ``num_layers``, rounded, at least one."""
    if not 0 < keep_fraction <= 1:
        raise InputError(f"keep_fraction={keep_fraction} must be in (0, 1]")
    return max(1, min(num_layers, round(keep_fraction * num_layers)))


def shallowest_exits(evaluation: pd.DataFrame, tolerances=(0.01, 0.05)) -> pd.DataFrame:
    """Per model, variant and quality metric, the shallowest exit whose value is within each relative tolerance of
    the full model's (the last exit): accuracy at least (1 − t)× the full accuracy, perplexity at most (1 + t)× the
    full perplexity. The exit is the first that qualifies, whether or not deeper ones dip out again (it is where an
    early-exit model would stop)."""
    rows = []
    evaluation = with_kind(evaluation)
    for (model, variant, task, kind, metric), curve in evaluation.groupby(["model", "variant", "task", "kind",
                                                                           "metric"]):
        direction = QUALITY_METRICS.get((kind, metric))
        if direction is None:
            continue
        curve = curve.set_index("layer")["value"].sort_index()
        total, full = int(curve.index.max()), float(curve.iloc[-1])
        for tolerance in tolerances:
            bound = full * (1 - tolerance) if direction == "higher" else full * (1 + tolerance)
            within = curve[curve >= bound] if direction == "higher" else curve[curve <= bound]
            layer = int(within.index.min())
            rows.append({"model": model, "variant": variant, "task": task, "kind": kind, "metric": metric,
                         "tolerance": tolerance, "full_value": full, "layer": layer, "num_layers": total,
                         "fraction_of_layers": layer / total, "value": float(curve[layer])})
    return pd.DataFrame(rows)


def pruned_against_lens(evaluation: pd.DataFrame, pruned: pd.DataFrame) -> pd.DataFrame:
    """The stock lm-eval numbers of pruned models beside the logit lens's at the same exit of the whole model."""
    keys = ["model", "variant", "task", "metric", "layer"]
    lens = evaluation[keys + ["value"]].rename(columns={"value": "logit_lens_value"})
    merged = pruned[keys + ["value", "n_samples"]].rename(columns={"value": "pruned_stock_value"}).merge(
        lens, on=keys, how="left", validate="one_to_one")
    if merged["logit_lens_value"].isna().any():
        missing = merged[merged["logit_lens_value"].isna()][keys].to_dict("records")
        raise InputError(f"no logit-lens value for the pruned model's exit: {missing}")
    difference = (merged["pruned_stock_value"] - merged["logit_lens_value"]).abs()
    scale = merged["logit_lens_value"].abs()
    # relative where the lens value is not zero (an accuracy of 0 compares absolutely)
    merged["relative_difference"] = difference / scale.where(scale > 0, 1.0)
    return merged


@flags("early_exit", evaluation_path=flag("the gathered per-layer evaluation table (Parquet)", name="--evaluation"),
       pruned_paths=flag("stock lm-eval tables of the pruned models", name="--pruned"),
       exits_stem=flag("Parquet; .csv and .md are written beside it", name="--exits-out", type=table_stem),
       pruned_stem=flag("Parquet; .csv and .md are written beside it", name="--pruned-out", type=table_stem))
def tabulate_early_exit(evaluation_path: str | os.PathLike, pruned_paths: list[str], exits_stem: str | os.PathLike,
                        pruned_stem: str | os.PathLike, config_hash: str,
                        tolerances=EarlyExitSettings.tolerances) -> None:
    """Write the shallowest-exit table and the pruned-models-vs-logit-lens table (Parquet, CSV, Markdown)."""
    needed = ["model", "variant", "task", "layer", "metric", "value"]
    evaluation = read_input_table(evaluation_path, "per-layer evaluation", needed, made_by="evaluate-layers")
    pruned = pd.concat([read_input_table(path, "stock evaluation of a pruned model", needed, made_by="evaluate-layers")
                        for path in pruned_paths], ignore_index=True)
    metadata = {"config_hash": config_hash, "inputs": [str(evaluation_path), *map(str, pruned_paths)]}
    write_table(shallowest_exits(evaluation, tolerances), exits_stem, {**metadata, "tolerances": list(tolerances)})
    write_table(pruned_against_lens(evaluation, pruned), pruned_stem, metadata)
