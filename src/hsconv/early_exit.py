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

from hsconv.io import atomic_path
from hsconv.models import MANIFEST, _save_hf, load_model

log = logging.getLogger(__name__)


def prune_model(model_dir: str | os.PathLike, keep_layers: int, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir``: the model of ``model_dir`` with only its first ``keep_layers`` decoder layers."""
    loaded = load_model(model_dir)
    model, total = loaded.model, loaded.num_layers
    if not 1 <= keep_layers <= total:
        raise ValueError(f"keep_layers={keep_layers} is out of range: model {loaded.name!r} has layers 1..{total}")
    decoder = model.get_decoder()
    decoder.layers = decoder.layers[:keep_layers]
    model.config.num_hidden_layers = keep_layers
    # Per-layer config lists (attention kinds in Qwen2 and newer Llama configs) must match the layer count.
    for key in ("layer_types",):
        if isinstance(getattr(model.config, key, None), list):
            setattr(model.config, key, getattr(model.config, key)[:keep_layers])
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        _save_hf(model, loaded.tokenizer, tmp)
        manifest = {"name": f"{loaded.name}-first{keep_layers}", "weights": None,
                    "source": {"kind": "pruned", "from": str(model_dir), "keep_layers": keep_layers,
                               "of_layers": total}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("%s: kept layers 1..%d of %d -> %s", loaded.name, keep_layers, total, out_dir)
    return out_dir
