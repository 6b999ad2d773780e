"""An lm-evaluation-harness model that scores requests at any exit layer through the logit lens.

``LogitLensLM`` is lm-eval's own ``HFLM`` with one method replaced: ``_loglikelihood_tokens``, the kernel that turns
(context tokens, continuation tokens) into (log-likelihood, is-greedy). Tokenisation, context windows, rolling
log-likelihood for perplexity tasks and metric aggregation stay lm-eval's. The kernel runs one forward pass per
batch, keeps every layer's hidden state at the scored positions only, and for each exit l = 0..L computes
log p(continuation) from softcap(LMHead(FinalNorm(h_l))) (softcap: Gemma's, the identity elsewhere; the last exit
uses the pre-norm h_L, so the final norm is applied once, exactly as the model does). The results for all exits are memoised, so evaluating L+1 exits costs one forward
pass plus the heads at the scored positions; ``exit_layer`` chooses which exit the harness sees.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import pad_and_concat

from hsconv.errors import InputError
from hsconv.readout import decoder_states, lens_states, readout

log = logging.getLogger(__name__)

MODEL_NAME = "hsconv-logit-lens"


class ExitLayerError(InputError):
    """An exit layer outside 0..L."""


@register_model(MODEL_NAME)
class LogitLensLM(HFLM):
    def __init__(self, pretrained, exit_layer: int | None = None, head_chunk_tokens: int = 1024,
                 head_vocab_block: int = 2048, tuned_lens: str | None = None, **kwargs):
        super().__init__(pretrained=pretrained, **kwargs)
        if self.backend != "causal":
            raise InputError(f"the logit lens needs a decoder-only model; {type(self.model).__name__} is "
                             f"{self.backend}")
        self.readout = readout(self.model)
        self.num_layers = self.model.config.num_hidden_layers
        # Rows × vocabulary block of the head product (1024 × 2048: 8 MB of float32 logits, which stay in cache).
        self.head_chunk_tokens, self.head_vocab_block = head_chunk_tokens, head_vocab_block
        # With a tuned lens, exit l reads LMHead(FinalNorm(T_l(h_l))) instead (hsconv.tuned_lens).
        self.tuned_lens = None
        if tuned_lens is not None:
            from hsconv.tuned_lens import TunedLens

            self.tuned_lens = TunedLens.load(tuned_lens).to(self.device)
            if self.tuned_lens.num_layers != self.num_layers:
                raise InputError(f"the tuned lens in {tuned_lens} has {self.tuned_lens.num_layers} translators; "
                                 f"the model has {self.num_layers} layers")
        self._memo: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self.forward_passes = 0
        self.exit_layer = self.num_layers if exit_layer is None else exit_layer
        self.scored_exits = list(range(self.num_layers + 1))

    @property
    def exit_layer(self) -> int:
        return self._exit_layer

    @exit_layer.setter
    def exit_layer(self, layer: int) -> None:
        if not 0 <= int(layer) <= self.num_layers:
            raise ExitLayerError(f"exit layer {layer} is out of range: {type(self.model).__name__} has exits "
                                 f"0..{self.num_layers} (0 = embeddings, {self.num_layers} = the model's output)")
        self._exit_layer = int(layer)

    @property
    def scored_exits(self) -> list[int]:
        """The exits each forward pass scores (all, by default); fewer make the head's work that much smaller."""
        return self._scored_exits

    @scored_exits.setter
    def scored_exits(self, exits: list[int]) -> None:
        exits = sorted(set(int(layer) for layer in exits))
        if not exits or not 0 <= exits[0] <= exits[-1] <= self.num_layers:
            raise ExitLayerError(f"scored exits {exits} are not a non-empty subset of 0..{self.num_layers}")
        self._scored_exits = exits
        self._memo.clear()  # scores memoised for other exits hold NaN where these need numbers

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        keys = [(tuple(context), tuple(continuation)) for _, context, continuation in requests]
        if self._exit_layer not in self.scored_exits:
            raise ExitLayerError(f"exit {self._exit_layer} is not among the scored exits {self.scored_exits}")
        missing = list(dict.fromkeys(key for key in keys if key not in self._memo))
        if missing:
            batch_size = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 1)
            self._score_all_exits(missing, batch_size)
        return [(float(self._memo[key][0][self._exit_layer]), bool(self._memo[key][1][self._exit_layer]))
                for key in keys]

    @torch.no_grad()
    def _score_all_exits(self, keys: list[tuple], batch_size: int) -> None:
        # Longest first, as lm-eval does: batches pad little and memory problems show at once.
        order = sorted(range(len(keys)), key=lambda i: -(len(keys[i][0]) + len(keys[i][1])))
        total_tokens = sum(len(self._window(context, continuation)) for context, continuation in keys)
        started, tokens_done = time.perf_counter(), 0
        for start in range(0, len(order), batch_size):
            batch = [keys[i] for i in order[start:start + batch_size]]
            padded, spans = self._padded_batch(batch)
            # HFLM calls the model without an attention mask (right padding never reaches earlier positions).
            result = decoder_states(self.model, padded, None)
            self.forward_passes += 1
            pre_norm = lens_states(result)
            rows = torch.cat([torch.full((stop - begin,), row, dtype=torch.long) for row, (begin, stop)
                              in enumerate(spans)])
            positions = torch.cat([torch.arange(begin, stop) for begin, stop in spans])
            targets = torch.cat([torch.tensor(continuation, dtype=torch.long) for _, continuation in batch])
            scored = self._score_positions(pre_norm, rows, positions, targets.to(self.device))
            logprob = np.full((self.num_layers + 1, len(targets)), np.nan)  # NaN at exits not scored
            greedy = np.zeros((self.num_layers + 1, len(targets)), dtype=bool)
            logprob[self.scored_exits], greedy[self.scored_exits] = scored
            offsets = np.cumsum([0] + [stop - begin for begin, stop in spans])
            for index, key in enumerate(batch):
                piece = slice(offsets[index], offsets[index + 1])
                self._memo[key] = (logprob[:, piece].sum(axis=1), greedy[:, piece].all(axis=1))
            tokens_done += sum(stop for _, stop in spans)  # the windows' lengths
            rate = tokens_done / (time.perf_counter() - started)
            log.info("%d exits: %d/%d requests scored, %d/%d tokens, %.0f tokens/s, ~%.0f s left",
                     len(self.scored_exits), min(start + batch_size, len(order)), len(order), tokens_done,
                     total_tokens, rate, (total_tokens - tokens_done) / max(rate, 1e-9))

    def _padded_batch(self, batch: list[tuple]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The requests' windows, right-padded into one batch, and each one's scored span (begin, stop)."""
        inputs, spans = [], []
        for context, continuation in batch:
            if not context or not continuation:
                raise InputError("lm-eval passed an empty context or continuation")
            window = self._window(context, continuation)
            inputs.append(torch.tensor(window, dtype=torch.long, device=self.device))
            spans.append((len(window) - len(continuation), len(window)))
        return pad_and_concat(max(len(x) for x in inputs), inputs, padding_side="right"), spans

    def _window(self, context: tuple, continuation: tuple) -> tuple:
        """Exactly HFLM's window: the last max_length + 1 tokens, minus the final one."""
        return (context + continuation)[-(self.max_length + 1):][:-1]

    def _score_positions(self, states, rows, positions, targets) -> tuple[np.ndarray, np.ndarray]:
        """log p(target) and whether it is the argmax, at each of ``scored_exits``, for the scored positions only."""
        exits, count = len(self.scored_exits), len(targets)
        selected = []
        for layer in self.scored_exits:
            state = states[layer]
            inputs = state[rows.to(state.device), positions.to(state.device)]
            selected.append(inputs if self.tuned_lens is None else self.tuned_lens(layer, inputs))
        # All exits' rows go through the head together, in chunks of head_chunk_tokens: each head product reads the
        # whole V × d weight, so a LAMBADA batch (a few target tokens) costs one read for all exits, not one each.
        selected = torch.cat(selected)
        targets = targets.repeat(exits)
        logprob = np.empty(exits * count, dtype=np.float64)
        greedy = np.empty(exits * count, dtype=bool)
        for start in range(0, exits * count, self.head_chunk_tokens):
            chunk = slice(start, start + self.head_chunk_tokens)
            # HFLM's log-softmax at the target, computed block by block over the vocabulary (Readout.score_targets)
            logprob_chunk, top_token = self.readout.score_targets(selected[chunk], targets[chunk],
                                                                  self.head_vocab_block, self.softmax_dtype)
            logprob[chunk] = logprob_chunk.double().cpu().numpy()
            greedy[chunk] = (top_token == targets[chunk]).cpu().numpy()  # the argmax of z is the argmax of log p
        return logprob.reshape(exits, count), greedy.reshape(exits, count)
