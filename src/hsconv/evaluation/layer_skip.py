"""What removing a decoder block does: the model run with blocks skipped (the residual stream passes through them),
scored by lm-evaluation-harness against the intact model.

``LayerSkipLM`` is lm-eval's ``HFLM`` (through :class:`~hsconv.evaluation.lens_model.LogitLensLM`, for its window
and readout) with ``_loglikelihood_tokens`` replaced. For each batch of requests it runs the intact model once, keeps
every block's output, and then each *configuration* (a set of skipped blocks): blocks before the first skipped one
are not run again, their last output is replayed from the intact pass, so skipping block l costs L − l blocks, not L.
Every configuration is scored at the output exit (LAMBADA's targets, WikiText's tokens) with the KL of the intact
model's output distribution to it at the same positions; results are memoised per request and configuration, so
lm-eval's tasks turn them into per-document accuracy and word perplexity exactly as for the intact model.

Block numbering follows the paper: block l maps h_{l−1} to h_l, l = 1..L (``decoder_layers(model)[l − 1]``).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from hsconv.architectures import family_of_config
from hsconv.errors import InputError
from hsconv.evaluation.lens_model import LogitLensLM
from hsconv.flags import Datasets, Device, Limits, flag, flags
from hsconv.hidden_states import movement

log = logging.getLogger(__name__)

Configuration = tuple[int, ...]  # the skipped blocks, sorted; () is the intact model
INTACT: Configuration = ()


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's decoder blocks, in order (where they live is the family's, see hsconv.architectures)."""
    family = family_of_config(model.config)
    layers = getattr(model.get_decoder(), family.layers, None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise InputError(f"cannot find the decoder blocks of {type(model).__name__} (no module list "
                         f"{family.layers!r}, where the {family.name} family keeps them)")
    return layers


def _hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def skipped_blocks(model: torch.nn.Module, skipped: Configuration,
                   replay: torch.Tensor | None = None) -> Iterator[None]:
    """Run ``model`` with the blocks in ``skipped`` (1-based) passing their input through.

    With ``replay`` (h_{m−1} of the intact model for this batch, m = the first skipped block) blocks 1..m−1 are not
    computed: the first m − 2 pass their input through and block m − 1 returns ``replay``, which is what it would
    have computed, since nothing before block m changes. Each block keeps its own attributes (a family may read
    them, e.g. Qwen2's ``attention_type``): only its ``forward`` is replaced, on the instance, and restored."""
    layers = decoder_layers(model)
    replaced = {}
    overrides = {block: _pass_through for block in skipped}
    if replay is not None and skipped and skipped[0] > 1:
        first = skipped[0]
        overrides.update({block: _pass_through for block in range(1, first - 1)})
        overrides[first - 1] = lambda *args, **kwargs: replay
    try:
        for block, forward in overrides.items():
            if not 1 <= block <= len(layers):
                raise InputError(f"block {block} is out of range: the model has blocks 1..{len(layers)}")
            layer = layers[block - 1]
            replaced[block] = layer
            layer.forward = forward
        yield
    finally:
        for layer in replaced.values():
            del layer.forward  # the class's forward again


def _pass_through(*args, **kwargs) -> torch.Tensor:
    return _hidden_input(args, kwargs)


@dataclass
class IntactPass:
    """One batch through the intact model: every state h_0..h_L (pre-norm) and the output's normed last state."""

    states: list[torch.Tensor]
    normed_last: torch.Tensor


def intact_pass(model: torch.nn.Module, input_ids: torch.Tensor) -> IntactPass:
    """The intact model on a right-padded batch (no attention mask, as lm-eval's HFLM calls it); the blocks' outputs
    are captured by hooks, so h_L is the residual stream before the final norm."""
    layers = decoder_layers(model)
    states: list[torch.Tensor | None] = [None] * (len(layers) + 1)
    hooks = [layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: states.__setitem__(0, _hidden_input(args, kwargs)), with_kwargs=True)]
    for index, layer in enumerate(layers, start=1):
        hooks.append(layer.register_forward_hook(
            lambda module, args, output, index=index: states.__setitem__(
                index, output[0] if isinstance(output, tuple) else output)))
    try:
        normed = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
    return IntactPass(states, normed)


def configuration_pass(model: torch.nn.Module, input_ids: torch.Tensor, skipped: Configuration,
                       intact: IntactPass | None = None) -> torch.Tensor:
    """The normed last state of the model with ``skipped`` blocks, replaying the intact pass's h_{m−1} if given."""
    replay = intact.states[skipped[0] - 1] if intact is not None and skipped else None
    with skipped_blocks(model, skipped, replay):
        return model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state


@dataclass
class Scored:
    """One request under one configuration: lm-eval's (log-likelihood, is-greedy) and Σ KL(intact ‖ configuration)
    over its scored tokens."""

    loglikelihood: float
    greedy: bool
    kl_sum: float
    tokens: int


class LayerSkipLM(LogitLensLM):
    """lm-eval's HFLM whose output is that of the model with ``configuration``'s blocks skipped. Every configuration
    in ``configurations`` is computed for a request the first time any is asked for. Per request it also keeps the
    intact model's per-layer movement and norms (:meth:`layer_sums`), from the same forward pass."""

    def __init__(self, pretrained, batch_tokens: int = 8192, **kwargs):
        super().__init__(pretrained=pretrained, **kwargs)
        self.batch_tokens = batch_tokens
        self.configurations: list[Configuration] = [INTACT]
        self.configuration: Configuration = INTACT
        self._scored: dict[tuple, dict[Configuration, Scored]] = {}
        self._layer_sums: dict[tuple, np.ndarray] = {}
        self.requested: list[tuple] = []  # every request asked for since the caller last emptied it, in order
        self.forward_passes = 0

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        keys = [(tuple(context), tuple(continuation)) for _, context, continuation in requests]
        if self.configuration not in self.configurations:
            raise InputError(f"configuration {self.configuration} is not among those computed")
        missing = list(dict.fromkeys(key for key in keys if not set(self.configurations) <= set(self._scored.get(key, {}))))
        if missing:
            self._score(missing)
        self.requested.extend(keys)
        return [(self._scored[key][self.configuration].loglikelihood, self._scored[key][self.configuration].greedy)
                for key in keys]

    def scored(self, key: tuple) -> Scored:
        return self._scored[key][self.configuration]

    def layer_sums(self, key: tuple) -> np.ndarray:
        """Per layer 0..L: [Σ D_l, tokens, Σ D_l without the window's first position, those tokens, Σ ‖h_l‖] over the
        request's window (D at layer 0 is 0: it has no step before it)."""
        return self._layer_sums[key]

    def _batches(self, keys: list[tuple]) -> Iterator[list[tuple]]:
        """Longest first, as many requests as fit ``batch_tokens`` padded tokens (at least one)."""
        order = sorted(keys, key=lambda key: -len(self._window(*key)))
        batch: list[tuple] = []
        for key in order:
            width = len(self._window(*batch[0])) if batch else len(self._window(*key))
            if batch and width * (len(batch) + 1) > self.batch_tokens:
                yield batch
                batch = []
            batch.append(key)
        if batch:
            yield batch

    @torch.inference_mode()
    def _score(self, keys: list[tuple]) -> None:
        total_tokens = sum(len(self._window(*key)) for key in keys)
        started, tokens_done = time.perf_counter(), 0
        for batch in self._batches(keys):
            padded, spans = self._padded_batch(batch)
            intact = intact_pass(self.model, padded)
            self.forward_passes += 1
            for key, sums in zip(batch, self._movement_sums(intact, [stop for _, stop in spans])):
                self._layer_sums[key] = sums
            rows = torch.cat([torch.full((stop - begin,), row, dtype=torch.long) for row, (begin, stop)
                              in enumerate(spans)]).to(self.device)
            positions = torch.cat([torch.arange(begin, stop) for begin, stop in spans]).to(self.device)
            targets = torch.cat([torch.tensor(continuation, dtype=torch.long) for _, continuation in batch])
            finals = {}
            for configuration in self.configurations:
                normed = intact.normed_last if configuration == INTACT else \
                    configuration_pass(self.model, padded, configuration, intact)
                self.forward_passes += configuration != INTACT
                finals[configuration] = normed[rows, positions]
            del intact
            scores = self._score_positions_against_intact(finals, targets.to(self.device))
            offsets = np.cumsum([0] + [stop - begin for begin, stop in spans])
            for index, key in enumerate(batch):
                piece = slice(offsets[index], offsets[index + 1])
                self._scored.setdefault(key, {}).update({
                    configuration: Scored(float(logprob[piece].sum()), bool(greedy[piece].all()),
                                          float(kl[piece].sum()), int(piece.stop - piece.start))
                    for configuration, (logprob, greedy, kl) in scores.items()})
            tokens_done += sum(stop for _, stop in spans)
            rate = tokens_done / (time.perf_counter() - started)
            log.info("%d configurations: %d/%d tokens, %.0f tokens/s per configuration set, ~%.0f s left",
                     len(self.configurations), tokens_done, total_tokens, rate,
                     (total_tokens - tokens_done) / max(rate, 1e-9))

    def _movement_sums(self, intact: IntactPass, lengths: list[int]) -> list[np.ndarray]:
        """Each row's per-layer sums of D_l (pre-norm convention: the residual stream the blocks write), with and
        without its first position (the attention sink), and of the state's norm, over its real tokens."""
        states = intact.states
        width = states[0].shape[1]
        real = torch.arange(width, device=states[0].device)[None, :] < torch.tensor(lengths, device=states[0].device)[:, None]
        after_first = real.clone()
        after_first[:, 0] = False
        sums = np.zeros((len(lengths), len(states), 5))
        for layer, state in enumerate(states):
            norms = state.double().norm(dim=-1)
            sums[:, layer, 4] = (norms * real).sum(dim=1).cpu().numpy()
            sums[:, layer, 1] = real.sum(dim=1).cpu().numpy()
            sums[:, layer, 3] = after_first.sum(dim=1).cpu().numpy()
            if layer:
                step = movement(states[layer - 1], state)
                sums[:, layer, 0] = (step * real).sum(dim=1).cpu().numpy()
                sums[:, layer, 2] = (step * after_first).sum(dim=1).cpu().numpy()
        return list(sums)

    def _score_positions_against_intact(self, finals: dict, targets: torch.Tensor) -> dict:
        """Per configuration: log p(target), whether it is the argmax, and KL(p_intact ‖ p_configuration) at each scored
        position, in chunks of ``head_chunk_tokens`` rows so that one chunk's logits, for one configuration at a time,
        are all that exists of the vocabulary-sized ones."""
        count = len(targets)
        out = {configuration: (np.empty(count), np.empty(count, dtype=bool), np.empty(count))
               for configuration in finals}
        for start in range(0, count, self.head_chunk_tokens):
            chunk = slice(start, start + self.head_chunk_tokens)
            intact_logprobs = torch.log_softmax(self.readout.logits(finals[INTACT][chunk]), dim=-1,
                                                dtype=self.softmax_dtype)
            intact_probs = intact_logprobs.exp()
            for configuration, states in finals.items():
                logits = self.readout.logits(states[chunk])
                logprobs = intact_logprobs if configuration == INTACT else \
                    torch.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
                logprob, greedy, kl = out[configuration]
                logprob[chunk] = logprobs.gather(1, targets[chunk, None]).squeeze(1).double().cpu().numpy()
                greedy[chunk] = (logprobs.argmax(dim=-1) == targets[chunk]).cpu().numpy()  # as HFLM decides
                kl[chunk] = 0.0 if configuration == INTACT else \
                    (intact_probs * (intact_logprobs - logprobs)).sum(dim=-1).double().cpu().numpy()
        return out


def configuration_name(configuration: Configuration) -> str:
    return "intact" if not configuration else "removed " + ",".join(map(str, configuration))


def _evaluate(lm: LayerSkipLM, tasks: dict, configurations: list[Configuration], keep_document,
              with_layers: bool = False) -> tuple[list[dict], list[dict]]:
    """Each kept document's outcome under each configuration (lm-eval's metrics, and Σ KL to the intact model over
    its scored tokens); with ``with_layers``, the intact model's per-layer movement and norm sums per document."""
    from hsconv.evaluation.per_layer import document_metrics, only_filter, outcome_fields

    outcomes, layer_rows = [], []
    for configuration in configurations:
        lm.configuration = configuration
        for name, (kind, task) in tasks.items():
            instances = [instance for instance in task.instances if keep_document(instance.doc_id)]
            keys_by_document: dict[int, list[tuple]] = {}
            for request_type in dict.fromkeys(instance.request_type for instance in instances):
                group = [instance for instance in instances if instance.request_type == request_type]
                if request_type == "loglikelihood":  # one call: batched across documents, one request each
                    lm.requested.clear()
                    responses = lm.loglikelihood(group)
                    keys = [[key] for key in lm.requested]
                else:  # rolling: one call per document, so that its windows are known to be its own
                    responses, keys = [], []
                    for instance in group:
                        lm.requested.clear()
                        responses.extend(getattr(lm, request_type)([instance]))
                        keys.append(list(lm.requested))
                for instance, response, its_keys in zip(group, responses, keys, strict=True):
                    instance.resps = [response]
                    keys_by_document.setdefault(instance.doc_id, []).extend(its_keys)
            for doc_id, metrics in only_filter(document_metrics(task, set(keys_by_document)), name):
                scored = [lm.scored(key) for key in keys_by_document[doc_id]]
                outcomes.append({"configuration": configuration_name(configuration),
                                 "removed": ",".join(map(str, configuration)), "n_removed": len(configuration),
                                 "task": name, "kind": kind, "doc_id": int(doc_id), **outcome_fields(metrics),
                                 "kl_sum": sum(item.kl_sum for item in scored),
                                 "kl_tokens": sum(item.tokens for item in scored)})
                if with_layers and configuration == INTACT:
                    sums = sum(lm.layer_sums(key) for key in keys_by_document[doc_id])
                    layer_rows.extend({"task": name, "kind": kind, "doc_id": int(doc_id), "layer": layer,
                                       "movement_sum": row[0], "tokens": int(row[1]),
                                       "movement_without_first_sum": row[2], "tokens_without_first": int(row[3]),
                                       "norm_sum": row[4]} for layer, row in enumerate(sums))
    return outcomes, layer_rows


@flags("layer_relevance", datasets=flag("texts written by prepare-texts; KIND is lambada or wikitext",
                                       name="--dataset", metavar="NAME=KIND=PARQUET"),
       limits=flag("only the first N documents of a data set", name="--limit", metavar="NAME=N"),
       documents_out="each document's outcome per configuration (Parquet)",
       layers_out="the intact model's per-layer sums per document (Parquet)")
def measure_layer_relevance(model_dir: str, datasets: Datasets, documents_out: str,
                            layers_out: str, model: str, variant: str, prune_max_layers: int = 8,
                            batch_tokens: int = 8192, window_tokens: int | None = None, precision: str = "float32",
                            device: Device = "cpu", limits: Limits | None = None) -> dict:
    """Stage entry point: every block removed alone, then the greedy prunings, on ``datasets``
    ({name: (kind, texts parquet)}) through lm-eval's stock tasks; writes each document's outcome per configuration
    (``documents_out``) and the intact model's per-layer movement and norm sums per document (``layers_out``).

    The greedy prunings drop the n blocks of smallest block influence or of smallest removal KL, n = 1 ..
    ``prune_max_layers``; both orders are ranked on the even-numbered documents of every data set and the pruned
    models evaluated on the odd-numbered ones, so that no pruning is scored on the texts that chose it."""
    import pandas as pd

    from hsconv.evaluation.per_layer import stock_tasks, write_task_data
    from hsconv.layer_relevance import EVALUATED_HALF, RANKED_HALF, pruning_orders
    from hsconv.models import weights_dir
    from hsconv.precision import resolve_precision

    dtype = resolve_precision(precision, device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hsconv-layer-relevance-") as tmp:
        data_files = {name: (kind, write_task_data(path, kind, Path(tmp) / f"{name}.jsonl", (limits or {}).get(name)))
                      for name, (kind, path) in datasets.items()}
        # batch_size: how many of a document's rolling windows lm-eval hands over at once (batch_tokens then packs
        # them); LAMBADA's requests come in one call whatever it is.
        lm = LayerSkipLM(pretrained=str(weights_dir(Path(model_dir))), dtype=dtype, device=device, batch_size=64,
                         batch_tokens=batch_tokens, max_length=window_tokens)
        task_dict, task_names = stock_tasks(data_files, Path(tmp))
        tasks = {name: (kind, task_dict["tasks"][task_names[name]]) for name, (kind, _) in datasets.items()}
        for _, task in tasks.values():
            task.build_all_requests(limit=None, rank=0, world_size=1)
        num_layers = lm.num_layers
        singles = [INTACT] + [(block,) for block in range(1, num_layers + 1)]
        lm.configurations = singles
        outcomes, layer_rows = _evaluate(lm, tasks, singles, lambda doc_id: True, with_layers=True)
        log.info("%s/%s: every block removed alone, %.0f s", model, variant, time.perf_counter() - started)
        orders = pruning_orders(pd.DataFrame(outcomes), pd.DataFrame(layer_rows), num_layers)
        depth = min(prune_max_layers, num_layers - 1)
        prunings = list(dict.fromkeys(tuple(sorted(order[:n])) for order in orders.values()
                                      for n in range(2, depth + 1)))  # n = 1 is a single removal, already scored
        if prunings:
            lm.configurations = [INTACT, *prunings]
            pruned, _ = _evaluate(lm, tasks, prunings, lambda doc_id: doc_id % 2 == EVALUATED_HALF)
            outcomes.extend(pruned)
    provenance = {"model": model, "variant": variant, "model_dir": str(model_dir), "dtype": dtype,
                  "precision": precision, "device": device, "batch_tokens": batch_tokens,
                  "window_tokens": lm.max_length, "limits": limits or {},
                  "prune_max_layers": prune_max_layers, "forward_passes": lm.forward_passes,
                  "orders": {name: list(order) for name, order in orders.items()},
                  "halves": {"ranked": f"doc_id % 2 == {RANKED_HALF}", "evaluated": f"doc_id % 2 == {EVALUATED_HALF}"},
                  "datasets": {name: {"kind": kind, "texts": str(path)} for name, (kind, path) in datasets.items()}}
    _write_measurements(outcomes, layer_rows, documents_out, layers_out, provenance)
    log.info("%s/%s: %d configurations, %d forward passes, %.0f s -> %s", model, variant, len(singles) + len(prunings),
             lm.forward_passes, time.perf_counter() - started, documents_out)
    return provenance


def _write_measurements(outcomes: list[dict], layer_rows: list[dict], documents_out, layers_out,
                        provenance: dict) -> None:
    import pandas as pd

    from hsconv.io import write_parquet

    for rows, out in ((outcomes, documents_out), (layer_rows, layers_out)):
        frame = pd.DataFrame(rows)
        frame.insert(0, "variant", provenance["variant"])
        frame.insert(0, "model", provenance["model"])
        write_parquet(frame, out, {"layer_relevance": provenance})
