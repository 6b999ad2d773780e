"""The tuned-lens baseline (Belrose et al., 2023): a learned affine translator per layer in front of the logit lens.

Self-distillation changes the model so that the plain logit lens reads good predictions from earlier layers. The
cheaper alternative a reviewer asks about first keeps the model frozen and learns, for each layer l < L, a translator
T_l(h) = h + A_l h + b_l so that LMHead(FinalNorm(T_l(h_l))) matches the model's own output distribution
(KL(p_L ‖ q_l), the tuned-lens objective). A, b start at zero, so an untrained tuned lens is the logit lens; the
last exit is the model's output and has no translator.

Training uses the packed self-distillation corpus (the frozen model's states come from one forward pass without
gradients; each layer's head product is back-propagated on its own, so one layer's logits live at a time).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hsconv.errors import InputError
from hsconv.flags import Device, flag, flags
from hsconv.io import atomic_path, write_parquet
from hsconv.readout import decoder_states, lens_states, readout
from hsconv.settings import TunedLensSettings

log = logging.getLogger(__name__)

WEIGHTS = "translators.safetensors"
SETTINGS = "tuned_lens.json"


class TunedLens(torch.nn.Module):
    """One zero-initialised affine translator per layer 0..L−1, applied as a residual: T_l(h) = h + A_l h + b_l."""

    def __init__(self, num_layers: int, hidden_size: int):
        super().__init__()
        self.num_layers = num_layers
        self.translators = torch.nn.ModuleList(torch.nn.Linear(hidden_size, hidden_size)
                                               for _ in range(num_layers))
        for translator in self.translators:
            torch.nn.init.zeros_(translator.weight)
            torch.nn.init.zeros_(translator.bias)

    def forward(self, layer: int, state: torch.Tensor) -> torch.Tensor:
        if layer == self.num_layers:  # the model's output
            return state
        translator = self.translators[layer]
        return state + translator(state.to(translator.weight.dtype)).to(state.dtype)

    def save(self, directory: str | os.PathLike, metadata: dict) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            save_file({name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()},
                      tmp / WEIGHTS)
            (tmp / SETTINGS).write_text(json.dumps({"num_layers": self.num_layers,
                                                    "hidden_size": self.translators[0].in_features, **metadata},
                                                   indent=1, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TunedLens":
        from safetensors.torch import load_file

        directory = Path(directory)
        settings = json.loads((directory / SETTINGS).read_text())
        lens = cls(settings["num_layers"], settings["hidden_size"])
        lens.load_state_dict(load_file(directory / WEIGHTS))
        return lens.eval().requires_grad_(False)


def layer_kl(model_readout, target_logprob: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_L ‖ q_l) for one layer's (translated) states."""
    logprob = torch.log_softmax(model_readout(state).float(), dim=-1)
    return (target_logprob.exp() * (target_logprob - logprob)).sum(-1).mean()


@flags("tuned_lens", tokens_path=flag("packed sequences (pack-tokens)", name="--tokens"),
       out_dir=flag("directory for the translators", name="--out"),
       log_out="held-out KL per layer before and after, training KL (Parquet)")
def train_tuned_lens(model_dir: str | os.PathLike, tokens_path: str | os.PathLike, out_dir: str | os.PathLike,
                     log_out: str | os.PathLike, steps: int = TunedLensSettings.steps,
                     batch_size: int = TunedLensSettings.batch_size,
                     learning_rate: float = TunedLensSettings.learning_rate,
                     holdout_sequences: int = TunedLensSettings.holdout_sequences, seed: int = TunedLensSettings.seed,
                     device: Device = "cpu",
                     micro_batch_size: int | None = TunedLensSettings.micro_batch_size) -> pd.DataFrame:
    """Train the translators of the model in ``model_dir`` on the packed sequences in ``tokens_path`` (the last
    ``holdout_sequences`` held out) and write them to ``out_dir``; ``log_out`` gets each layer's held-out KL for the
    logit lens (step 0) and the trained tuned lens, and the training KL per step. ``micro_batch_size`` sequences go
    through the model at a time (gradients accumulate), which bounds the vocabulary-sized logits in memory."""
    from hsconv.corpus import read_sequences
    from hsconv.models import context_length, load_model

    started = time.perf_counter()
    torch.manual_seed(seed)
    loaded = load_model(model_dir, "float32", device)
    model = loaded.model.requires_grad_(False)
    ids, _ = read_sequences(tokens_path, context_length(model.config), loaded.name)
    if len(ids) <= holdout_sequences:
        raise InputError(f"{tokens_path} has {len(ids)} sequences; the tuned lens needs more than the "
                         f"{holdout_sequences} held out")
    train_ids, held_out = ids[:-holdout_sequences], torch.from_numpy(ids[-holdout_sequences:]).to(device)
    model_readout = readout(model)
    lens = TunedLens(loaded.num_layers, model.config.hidden_size).to(device)
    optimizer = torch.optim.Adam(lens.parameters(), lr=learning_rate)
    rng = np.random.default_rng(seed)
    rows = [{"stage": "held_out", "step": 0, "layer": layer, "kl": value}
            for layer, value in enumerate(held_out_kl(model, lens, held_out))]
    for step in range(1, steps + 1):
        batch = torch.from_numpy(train_ids[rng.choice(len(train_ids), size=min(batch_size, len(train_ids)),
                                                      replace=False)]).to(device)
        optimizer.zero_grad(set_to_none=True)
        total = _accumulate_gradients(model, model_readout, lens, batch.split(micro_batch_size or len(batch)),
                                      loaded.num_layers)
        optimizer.step()
        rows.append({"stage": "train", "step": step, "layer": -1, "kl": total})
        if step == 1 or step % 10 == 0 or step == steps:
            log.info("step %d/%d: mean KL over layers %.4f", step, steps, total)
    rows += [{"stage": "held_out", "step": steps, "layer": layer, "kl": value}
             for layer, value in enumerate(held_out_kl(model, lens, held_out))]
    table = pd.DataFrame(rows)
    settings = {"model_dir": str(model_dir), "tokens": str(tokens_path), "steps": steps, "batch_size": batch_size,
                "micro_batch_size": micro_batch_size,
                "learning_rate": learning_rate, "holdout_sequences": holdout_sequences, "seed": seed,
                "train_tokens": int(min(batch_size, len(train_ids)) * steps * ids.shape[1])}
    lens.save(out_dir, {"training": settings})
    write_parquet(table, log_out, {"tuned_lens": settings})
    before, after = (table[(table["stage"] == "held_out") & (table["step"] == s)]["kl"].mean() for s in (0, steps))
    # Wall-clock time goes to the log only, so that a rerun writes the same bytes.
    log.info("%s: held-out KL(p_L || q_l) averaged over layers %.4f (logit lens) -> %.4f (tuned lens) in %.0f s",
             loaded.name, before, after, time.perf_counter() - started)
    return table


def _accumulate_gradients(model, model_readout, lens: TunedLens, micro_batches, num_layers: int) -> float:
    """The translators' gradients of the mean KL over layers and micro-batches, one layer's logits at a time; the
    step's loss."""
    total = 0.0
    for micro_batch in micro_batches:
        with torch.no_grad():
            states = lens_states(decoder_states(model, micro_batch, None))
            target = torch.log_softmax(model_readout(states[-1]).float(), dim=-1)
        for layer in range(num_layers):
            loss = layer_kl(model_readout, target, lens(layer, states[layer])) / (num_layers * len(micro_batches))
            loss.backward()
            total += float(loss.detach())
    return total


@torch.no_grad()
def held_out_kl(model, lens: TunedLens, input_ids: torch.Tensor) -> list[float]:
    """KL(p_L ‖ q_l) per layer 0..L−1 on held-out sequences (with zero translators: the logit lens's)."""
    model_readout = readout(model)
    states = lens_states(decoder_states(model, input_ids, None))
    target = torch.log_softmax(model_readout(states[-1]).float(), dim=-1)
    values = [float(layer_kl(model_readout, target, lens(layer, state))) for layer, state in enumerate(states[:-1])]
    if not all(math.isfinite(value) for value in values):
        raise FloatingPointError(f"non-finite held-out KL per layer: {values}")
    return values
