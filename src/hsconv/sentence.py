"""One sentence traced through every layer: the logit lens's top-1 token, the movement D_l, and a 3-D PCA.

Figs. 4 and 7 look at a single text (the paper's "The curious cat ... at the top.") rather than a data set.
One forward pass gives every layer's hidden state at every position; from it this stage writes two tidy tables:

- ``lens``: per position and exit layer l = 0..L, the logit lens's top-1 token and its probability, the
  probability of the token that really comes next, and D_l under both last-state conventions (Fig. 7);
- ``pca``: every (position, layer) state projected on the first three principal components of all layers'
  states together, with the variance each explains, under both conventions (Fig. 4).

The logit lens is LMHead(FinalNorm(h_l)), with the pre-norm h_L at the last exit, so exit L is the model's own
output. Only one layer's logits exist at a time. Special tokens (BOS) are left out, as in the dump stage. The PCA
also leaves out the sequence's first position by default: it is the attention sink, whose state carries "massive
activations" (SmolLM2: norm ~22,000 at layer 15 against ~170 elsewhere) that would decide the components alone.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
import torch

from hsconv.errors import InputError
from hsconv.flags import Device, flags
from hsconv.hidden_states import FINAL_NORM_CONVENTIONS, movement
from hsconv.io import write_parquet
from hsconv.models import LoadedModel
from hsconv.names import ModelDtype
from hsconv.readout import layer_states, lens_states, readout
from hsconv.settings import SentenceSettings

log = logging.getLogger(__name__)

PAPER_SENTENCE = ("The curious cat climbed up the tall tree, carefully balancing on each thin branch, until it "
                  "suddenly noticed a small bird sitting quietly at the top.")
PAPER_TARGET = " at the top"
COMPONENTS = 3


class SentenceError(InputError):
    """A sentence or target that cannot be traced; the message says which and why."""


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([token]) for token in ids]


def target_positions(tokenizer, ids: list[int], text: str, target: str) -> list[int]:
    """Indices of the tokens that spell the last occurrence of ``target`` in ``text``, in the model's tokenisation.

    Character ends come from decoding growing prefixes, which works for every tokenizer (no offset mapping
    needed). A token belongs to the target when it ends inside the target's span and after its start.
    """
    start = text.rfind(target)
    if start < 0 or not target.strip():
        raise SentenceError(f"target {target!r} does not occur in the sentence {text!r}")
    stop = start + len(target)
    special = set(tokenizer.all_special_ids)
    decoded_prefix = ""
    positions = []
    for index in range(len(ids)):
        if ids[index] in special:
            continue
        previous_end = len(decoded_prefix)
        decoded_prefix = tokenizer.decode([i for i in ids[:index + 1] if i not in special])
        if previous_end < stop and len(decoded_prefix) > start:
            positions.append(index)
    if not positions or positions[0] == 0:
        raise SentenceError(f"target {target!r} has no preceding token to predict it from in {text!r}")
    return positions


def principal_components(matrix: np.ndarray, count: int = COMPONENTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, the first ``count`` principal axes (columns, d × count) and their explained-variance ratios.

    Computed in float64 by SVD of the centred matrix. Each axis's sign is fixed so that its largest-magnitude
    loading is positive, which makes the projection reproducible across runs and libraries.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape[0] <= count:
        raise SentenceError(f"a PCA to {count} components needs more than {count} states, got {matrix.shape[0]}")
    mean = matrix.mean(axis=0)
    _, singular, rows = np.linalg.svd(matrix - mean, full_matrices=False)
    components = rows[:count].T
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(count)])
    components = components * signs
    variance = singular ** 2
    return mean, components, variance[:count] / variance.sum()


@torch.no_grad()
def trace_sentence(loaded: LoadedModel, text: str, target: str,
                   pca_exclude_first: bool = SentenceSettings.pca_exclude_first, device: str = "cpu"
                   ) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The ``lens`` and ``pca`` tables of one model for one sentence (see the module docstring)."""
    tokenizer, model = loaded.tokenizer, loaded.model
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if len(ids) > loaded.context_length:
        raise SentenceError(f"the sentence has {len(ids)} tokens, more than the context length of model "
                            f"{loaded.name!r} ({loaded.context_length})")
    targets = target_positions(tokenizer, ids, text, target)
    input_ids = torch.tensor([ids], device=device)
    result = layer_states(model, input_ids, torch.ones_like(input_ids))
    lens_inputs = lens_states(result)
    special = set(tokenizer.all_special_ids)
    keep = [index for index, token in enumerate(ids) if token not in special]
    texts = token_texts(tokenizer, ids)
    num_layers = loaded.num_layers

    model_readout = readout(model)
    next_ids = torch.tensor(ids[1:] + [-1], device=device)
    has_next = next_ids >= 0
    lens_rows = []
    for layer, state in enumerate(lens_inputs):
        # One layer's logits at a time: positions × vocabulary, never layers × positions × vocabulary.
        probabilities = torch.softmax(model_readout(state[0]).double(), dim=-1)
        top_prob, top_id = probabilities.max(dim=-1)
        next_prob = torch.where(has_next, probabilities.gather(1, next_ids.clamp(min=0)[:, None])[:, 0],
                                torch.nan)
        moves = {convention: torch.full((len(ids),), torch.nan, dtype=torch.float64) for convention in
                 FINAL_NORM_CONVENTIONS}
        if layer:
            moves["hf"] = movement(result["states"][layer - 1][0], result["states"][layer][0]).cpu()
            moves["pre_norm"] = movement(lens_inputs[layer - 1][0], lens_inputs[layer][0]).cpu()
        for position in keep:
            next_id = int(next_ids[position])
            lens_rows.append({
                "position": position, "token_id": ids[position], "token": texts[position],
                "next_token_id": next_id, "next_token": texts[position + 1] if next_id >= 0 else "",
                "predicts_target": position + 1 in targets, "layer": layer,
                "top1_id": int(top_id[position]), "top1_token": tokenizer.decode([int(top_id[position])]),
                "top1_prob": float(top_prob[position]), "next_token_prob": float(next_prob[position]),
                "movement_hf": float(moves["hf"][position]), "movement_pre_norm": float(moves["pre_norm"][position]),
            })
    lens = pd.DataFrame(lens_rows)

    in_pca = [position for position in keep if position > 0 or not pca_exclude_first]
    pca = pd.concat([_pca_table(convention, states, in_pca, texts)
                     for convention, states in (("hf", result["states"]), ("pre_norm", lens_inputs))],
                    ignore_index=True)
    info = {"text": text, "target": target, "token_ids": ids, "target_positions": targets,
            "num_layers": num_layers, "positions_kept": len(keep), "pca_exclude_first": pca_exclude_first,
            "pca_positions": len(in_pca)}
    return lens, pca, info


def _pca_table(convention: str, states: list[torch.Tensor], in_pca: list[int], texts: list[str]) -> pd.DataFrame:
    """Every layer's states at the chosen positions in the first principal components of them all (fitted jointly,
    so that the layers share one frame)."""
    layers = len(states)
    # rows: layer-major, every kept position of each layer
    matrix = torch.stack([state[0, in_pca] for state in states]).reshape(-1, states[0].shape[-1])
    mean, components, explained = principal_components(matrix.double().cpu().numpy())
    projected = (matrix.double().cpu().numpy() - mean) @ components
    frame = pd.DataFrame({
        "final_norm": convention,
        "layer": np.repeat(np.arange(layers), len(in_pca)),
        "position": np.tile(in_pca, layers),
        "token": np.tile([texts[i] for i in in_pca], layers),
    })
    for axis in range(COMPONENTS):
        frame[f"pc{axis + 1}"] = projected[:, axis]
    for axis in range(COMPONENTS):
        frame[f"explained_pc{axis + 1}"] = explained[axis]
    return frame


@flags("sentence", lens_out="per position and layer: top-1 token, probability, D_l",
       pca_out="per position and layer: the state's first 3 PCA coordinates")
def trace_sentence_stage(model_dir: str, text: str, target: str, lens_out: str | os.PathLike,
                         pca_out: str | os.PathLike, model: str, variant: str,
                         pca_exclude_first: bool = SentenceSettings.pca_exclude_first,
                         dtype: ModelDtype = "float32", device: Device = "cpu") -> None:
    """Stage entry point: load the model, trace the sentence, write the two tables."""
    from hsconv.models import load_model

    loaded = load_model(model_dir, dtype=dtype, device=device)
    lens, pca, info = trace_sentence(loaded, text, target, pca_exclude_first=pca_exclude_first, device=device)
    info.update(model=model, variant=variant, dtype=dtype)
    for frame, out in ((lens, lens_out), (pca, pca_out)):
        frame.insert(0, "variant", variant)
        frame.insert(0, "model", model)
        write_parquet(frame, out, {"sentence": info})
    predicted = lens[lens["predicts_target"] & (lens["layer"] == info["num_layers"])]
    log.info("%s/%s: %d tokens; last exit predicts %s for the target %r", model, variant, len(info["token_ids"]),
             [f"{row.top1_token!r} ({row.top1_prob:.2f})" for row in predicted.itertuples()], target)
