"""Per-layer hidden states from one forward pass, reduced to per-token movement between adjacent layers.

Keeping every layer's full hidden states would cost tokens × (L+1) × d floats (180 GB for LAMBADA on a 3B model),
so this stage keeps what the metrics need: for every real token and layer l = 1..L the movement
D_l = 1 − (1 + cos(h_{l−1}, h_l)) / 2, computed in float64, under both conventions for the last state
(``hf``: final norm applied, as ``output_hidden_states`` returns it; ``pre_norm``: the raw residual stream).
Beside them, at layer L only, the *norm floor* D(h_{L−1}, FinalNorm(h_{L−1})): what the final norm alone moves the
state before it, which bounds how small D_L(hf) can get whatever the last layer does (on SmolLM2 it is ≈ D_L(hf),
from one massive-activation dimension whose norm gain is negative).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from hsconv.errors import InputError
from hsconv.flags import Device, flag, flags
from hsconv.io import read_input_table, write_parquet
from hsconv.models import LoadedModel
from hsconv.names import Convention, ModelDtype, Overflow, choices
from hsconv.readout import final_norm_module, layer_states
from hsconv.settings import HiddenStatesSettings

log = logging.getLogger(__name__)

FINAL_NORM_CONVENTIONS = choices(Convention)
OVERFLOW_POLICIES = choices(Overflow)


class ContextLengthError(InputError):
    """A document longer than allowed under ``overflow: error``."""


@dataclass
class Segment:
    document: int
    segment: int
    token_ids: list[int]


def segment_documents(tokenizer, documents: list[int], texts: list[str], max_tokens: int,
                      overflow: str) -> tuple[list[Segment], dict]:
    """Tokenise documents; a document longer than ``max_tokens`` is refused, truncated or split, as set."""
    if overflow not in OVERFLOW_POLICIES:
        raise InputError(f"overflow {overflow!r} is not one of {', '.join(OVERFLOW_POLICIES)}")
    segments: list[Segment] = []
    stats = {"documents_over_max_tokens": 0, "tokens_dropped_by_truncation": 0}
    for document, ids in zip(documents, tokenizer(texts, add_special_tokens=True)["input_ids"]):
        if len(ids) > max_tokens:
            stats["documents_over_max_tokens"] += 1
            if overflow == "error":
                raise ContextLengthError(
                    f"document {document} has {len(ids)} tokens, more than max_tokens={max_tokens}; set "
                    f"hidden_states.overflow to 'truncate' or 'split', or lower the data set's size")
            if overflow == "truncate":
                stats["tokens_dropped_by_truncation"] += len(ids) - max_tokens
                ids = ids[:max_tokens]
        pieces = [ids[start:start + max_tokens] for start in range(0, len(ids), max_tokens)]
        segments.extend(Segment(document, index, piece) for index, piece in enumerate(pieces) if piece)
    return segments, stats


def movement(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """D = 1 − (1 + cos)/2 between two states along the last axis, in float64."""
    cosine = torch.nn.functional.cosine_similarity(previous.double(), current.double(), dim=-1, eps=1e-12)
    return (1.0 - cosine) / 2.0


def token_movement(loaded: LoadedModel, documents: list[int], texts: list[str],
                   max_tokens: int | None = HiddenStatesSettings.max_tokens,
                   overflow: Overflow = HiddenStatesSettings.overflow, batch_size: int = HiddenStatesSettings.batch_size,
                   exclude_special_tokens: bool = HiddenStatesSettings.exclude_special_tokens,
                   device: str = "cpu") -> tuple[pd.DataFrame, dict]:
    """Per-token, per-layer movement for every document: one row per (document, segment, position, layer)."""
    tokenizer = loaded.tokenizer
    limit = loaded.context_length
    if max_tokens is None:
        max_tokens = limit
    if max_tokens > limit:
        raise ContextLengthError(f"max_tokens={max_tokens} exceeds the context length of model "
                                 f"{loaded.name!r} ({limit} tokens)")
    segments, stats = segment_documents(tokenizer, documents, texts, max_tokens, overflow)
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)) if exclude_special_tokens else [],
                               dtype=torch.long)
    num_layers = loaded.num_layers
    # Longest first, so that each batch pads little and a memory problem shows in the first batch.
    order = sorted(range(len(segments)), key=lambda i: -len(segments[i].token_ids))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    pieces = []
    started, tokens_done, segments_done = time.perf_counter(), 0, 0
    total_tokens = sum(len(segment.token_ids) for segment in segments)
    for number, batch in enumerate(batches, start=1):
        measured, attention_mask = _measure_batch(loaded, [segments[i] for i in batch], special_ids, number, device)
        pieces.append(measured)
        tokens_done += int(attention_mask.sum())
        segments_done += len(batch)
        elapsed = time.perf_counter() - started
        # Batches run longest first, so the remaining time is estimated from tokens, not from batches.
        log.info("batch %d/%d: %d/%d segments of %d documents, %d/%d tokens, %.0f tokens/s, ~%.0f s left", number,
                 len(batches), segments_done, len(segments), len(documents), tokens_done, total_tokens,
                 tokens_done / elapsed, (total_tokens - tokens_done) / max(tokens_done / elapsed, 1e-9))
    if not pieces:
        raise InputError("no documents to measure")
    frame = pd.concat(pieces, ignore_index=True)
    frame = frame.sort_values(["document", "segment", "position", "layer"], kind="stable", ignore_index=True)
    stats.update(segments=len(segments), tokens_measured=int(len(frame) // max(num_layers, 1)),
                 num_layers=num_layers, max_tokens=max_tokens, overflow=overflow, batch_size=batch_size,
                 exclude_special_tokens=exclude_special_tokens, final_norm_conventions=list(FINAL_NORM_CONVENTIONS))
    return frame, stats


def _measure_batch(loaded: LoadedModel, segments: list, special_ids: torch.Tensor, number: int,
                   device: str) -> tuple[pd.DataFrame, torch.Tensor]:
    """One padded batch of segments through the model: every kept token's movement at every layer under both
    conventions, and the norm floor at the last; with the batch's attention mask."""
    model, num_layers = loaded.model, loaded.num_layers
    width = max(len(segment.token_ids) for segment in segments)
    input_ids = torch.full((len(segments), width), loaded.tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(segments), width), dtype=torch.long)
    for row, segment in enumerate(segments):
        input_ids[row, :len(segment.token_ids)] = torch.tensor(segment.token_ids)
        attention_mask[row, :len(segment.token_ids)] = 1
    result = layer_states(model, input_ids.to(device), attention_mask.to(device))
    states = result["states"]
    _check_finite(states, attention_mask.to(device), number, loaded.name)
    hf = torch.stack([movement(states[l - 1], states[l]) for l in range(1, num_layers + 1)], dim=-1).cpu()
    pre_norm = hf.clone()
    pre_norm[..., -1] = movement(states[-2], result["pre_norm_last"]).cpu()
    norm_floor = torch.full_like(hf, float("nan"))
    with torch.no_grad():
        norm_floor[..., -1] = movement(states[-2], final_norm_module(model)(states[-2])).cpu()
    keep = attention_mask.bool() & ~torch.isin(input_ids, special_ids)
    rows, positions = keep.nonzero(as_tuple=True)
    count = len(rows)
    batch_documents = torch.tensor([segment.document for segment in segments])[rows]
    batch_segments = torch.tensor([segment.segment for segment in segments])[rows]
    return pd.DataFrame({
        "document": np.repeat(batch_documents.numpy().astype(np.int32), num_layers),
        "segment": np.repeat(batch_segments.numpy().astype(np.int32), num_layers),
        "position": np.repeat(positions.numpy().astype(np.int32), num_layers),
        "token_id": np.repeat(input_ids[rows, positions].numpy().astype(np.int32), num_layers),
        "layer": np.tile(np.arange(1, num_layers + 1, dtype=np.int16), count),
        "movement_hf": hf[rows, positions].reshape(-1).numpy(),
        "movement_pre_norm": pre_norm[rows, positions].reshape(-1).numpy(),
        "norm_floor": norm_floor[rows, positions].reshape(-1).numpy(),
    }), attention_mask


def _check_finite(states: list[torch.Tensor], mask: torch.Tensor, batch: int, name: str) -> None:
    """Stop at the shallowest layer with an inf or NaN at a real token, naming it; float16's range (±65,504) is
    the usual cause in large models, whose residual stream grows with depth."""
    real = mask.bool()
    for layer, state in enumerate(states):
        if not torch.isfinite(state[real]).all():
            advice = ("float16 overflows above 65,504: load the model in bfloat16 or float32"
                      if state.dtype == torch.float16 else "check the model's weights")
            raise FloatingPointError(f"non-finite hidden state at layer {layer} in batch {batch} of model {name!r} "
                                     f"({str(state.dtype).removeprefix('torch.')}); {advice}")


@flags("hidden_states", texts_path=flag("Parquet written by prepare-texts", name="--texts"))
def dump_hidden_states(model_dir: str, texts_path: str, out: str | os.PathLike, variant: str = "base",
                       dataset: str | None = None, dtype: ModelDtype = "float32", device: Device = "cpu",
                       max_tokens: int | None = HiddenStatesSettings.max_tokens,
                       overflow: Overflow = HiddenStatesSettings.overflow,
                       batch_size: int = HiddenStatesSettings.batch_size,
                       exclude_special_tokens: bool = HiddenStatesSettings.exclude_special_tokens) -> pd.DataFrame:
    """Stage entry point: load the model once, measure every document of ``texts_path``, write Parquet."""
    from hsconv.models import load_model

    texts = read_input_table(texts_path, "evaluation texts", ["document", "text"], made_by="prepare-texts")
    loaded = load_model(model_dir, dtype=dtype, device=device)
    # No process-wide set_grad_enabled(False): layer_states already runs without autograd, and a caller in the same
    # process (a test, a notebook) may train afterwards.
    frame, stats = token_movement(loaded, texts["document"].tolist(), texts["text"].tolist(), max_tokens=max_tokens,
                                  overflow=overflow, batch_size=batch_size,
                                  exclude_special_tokens=exclude_special_tokens, device=device)
    stats.update(model=loaded.name, variant=variant, dataset=dataset, dtype=dtype, device=device,
                 model_source=loaded.manifest.get("source"))
    write_parquet(frame, out, {"hidden_states": stats})
    log.info("%s/%s on %s: %d tokens, %d layers -> %s", loaded.name, variant, dataset,
             stats["tokens_measured"], stats["num_layers"], out)
    return frame
