"""Per-layer LAMBADA accuracy and WikiText perplexity through lm-evaluation-harness and the logit lens.

The tasks are lm-eval's stock ``lambada_openai`` and ``wikitext`` configs (prompts, targets, metrics, the WikiText
detokeniser and word/byte counts), loaded through lm-eval's public task API (a YAML that ``include``s the stock one)
with only the data source swapped for the texts the data stage wrote. Every exit is evaluated with
:class:`~hsconv.evaluation.lens_model.LogitLensLM`, whose memo makes all exits cost one forward pass per request
batch; :func:`evaluate_exits` builds lm-eval's requests once for all exits (``lm_eval.evaluate`` would rebuild them,
rendering every prompt template again, once per exit) and hands each exit's responses to the task's own filters,
``process_results`` and aggregations.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import pandas as pd

from hsconv.errors import InputError
from hsconv.flags import Datasets, Device, Limits, flag, flags
from hsconv.io import atomic_path, read_input_table, write_parquet
from hsconv.names import ModelDtype
from hsconv.settings import EvaluationSettings

log = logging.getLogger(__name__)

# Our data set kind -> (lm-eval's task, the document field its prompts read, the folder under lm_eval/tasks that
# holds its YAML: indexed alone, where indexing all ~10k task files would cost every evaluation job about 10 s)
STOCK_TASKS = {"lambada": ("lambada_openai", "text", "lambada"), "wikitext": ("wikitext", "page", "wikitext")}
METRICS = ("acc", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


class EvaluationDataError(InputError):
    """Evaluation texts that are missing or unusable; the message names the file."""


def write_task_data(texts_path: str | os.PathLike, kind: str, out: Path, limit: int | None = None) -> Path:
    """The data stage's texts (the first ``limit`` documents) as the jsonl that the stock task reads (``text`` for
    LAMBADA, ``page`` for WikiText)."""
    if kind not in STOCK_TASKS:
        raise EvaluationDataError(f"no lm-eval task for data set kind {kind!r}; supported: {', '.join(STOCK_TASKS)}")
    texts = read_input_table(texts_path, "evaluation texts", ["document", "text"], made_by="prepare-texts")
    field = STOCK_TASKS[kind][1]
    pd.DataFrame({field: texts["text"].head(limit)}).to_json(out, orient="records", lines=True, force_ascii=False)
    return out


def stock_tasks(data_files: dict[str, tuple[str, Path]], directory: Path) -> tuple[dict, dict[str, str]]:
    """lm-eval's stock task of each data set ({name: (kind, jsonl written by :func:`write_task_data`)}), reading that
    file instead of the hub, loaded through lm-eval's public API: a task YAML in ``directory`` that ``include``s the
    stock one and overrides only its data source, and ``TaskManager(include_path=directory).load``. Prompts,
    detokeniser and metrics stay lm-eval's. Returns lm-eval's task dict and each data set's task name (the stock name,
    suffixed with the data set's name where two sets share a kind)."""
    import yaml
    from lm_eval.tasks import TaskManager

    kinds = [kind for kind, _ in data_files.values()]
    task_names = {}
    for name, (kind, data_file) in data_files.items():
        stock, _, folder = STOCK_TASKS[kind]
        entry = _stock_task_entry(stock, folder)
        if entry is None or getattr(entry, "yaml_path", None) is None:
            import lm_eval

            raise EvaluationDataError(f"this lm-eval ({getattr(lm_eval, '__version__', '?')}) has no task {stock!r}",
                                      f"data set {name!r}", "install the lm-eval range pinned in pyproject.toml")
        task_names[name] = stock if kinds.count(kind) == 1 else f"{stock}_{name}"
        override = {"include": str(Path(entry.yaml_path).resolve()), "task": task_names[name], "dataset_path": "json",
                    "dataset_name": None, "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
                    "training_split": None, "validation_split": None, "test_split": "test", "fewshot_split": None}
        (directory / f"hsconv_{name}.yaml").write_text(yaml.safe_dump(override, sort_keys=False))
    manager = TaskManager(include_path=str(directory), include_defaults=False)  # our YAMLs only
    return manager.load(list(task_names.values())), task_names


@functools.lru_cache(maxsize=None)
def _stock_task_entry(stock: str, folder: str):
    """lm-eval's index entry of a stock task: its own folder indexed first (milliseconds), every task file of lm-eval
    only where a version keeps it elsewhere (about 10 s)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    own_folder = Path(lm_eval.__file__).parent / "tasks" / folder
    if own_folder.is_dir():
        entry = TaskManager(include_path=str(own_folder), include_defaults=False).task_index.get(stock)
        if entry is not None:
            return entry
    return TaskManager().task_index.get(stock)


def evaluate_exits(lm, task_dict: dict, exits: list[int], bootstrap_iters: int, log_samples: bool):
    """Yield (exit, results) for every exit, results shaped as ``lm_eval.evaluate`` returns them (``results``,
    ``n-samples``, ``configs``, ``versions``, and ``samples`` with each document's metrics when ``log_samples``).

    The requests are built once; per exit only the model's responses change (from the lens's memo), and the task's
    filters, ``process_results`` and aggregation (with lm-eval's standard errors) turn them into metrics, exactly as
    ``lm_eval.evaluate`` does for a single-rank run (a test holds the two equal)."""
    from collections import defaultdict

    tasks = task_dict["tasks"]
    by_type = defaultdict(list)
    for task in tasks.values():
        task.build_all_requests(limit=None, rank=0, world_size=1)
        for instance in task.instances:
            by_type[instance.request_type].append(instance)
    for layer in exits:
        lm.exit_layer = layer
        for request_type, instances in by_type.items():
            for instance, response in zip(instances, getattr(lm, request_type)(instances), strict=True):
                instance.resps = [response]
        yield layer, _task_metrics(tasks, bootstrap_iters, log_samples)


def _task_metrics(tasks: dict, bootstrap_iters: int, log_samples: bool) -> dict:
    """The tasks' metrics from the responses now in their instances, as ``lm_eval.evaluate`` computes them."""
    from lm_eval.api.metrics import stderr_for_metric

    results = {"results": {}, "n-samples": {}, "configs": {}, "versions": {}, "samples": {}}
    for name, task in tasks.items():
        by_filter = document_metrics(task)
        values, samples, count = {}, [], 0
        for filter_key, per_document in by_filter.items():  # every filter's metrics, as lm-eval reports them
            raw = {}
            for doc_id, metrics in per_document:
                for metric, value in metrics.items():
                    raw.setdefault(metric, []).append(value)
                if log_samples:  # the stock tasks have one filter ("none"); several are told apart
                    samples.append({"doc_id": doc_id, **({"filter": filter_key} if len(by_filter) > 1 else {}),
                                    **metrics})
            for metric, items in raw.items():
                aggregate = task.aggregation()[metric]
                values[f"{metric},{filter_key}"] = aggregate(items)
                stderr = stderr_for_metric(aggregate, bootstrap_iters) if bootstrap_iters > 0 else None
                values[f"{metric}_stderr,{filter_key}"] = stderr(items) if stderr and len(items) > 1 else "N/A"
            count = max([count, *(len(items) for items in raw.values())])
        config = dict(task.dump_config())
        results["results"][name] = {"alias": config.get("task_alias", name), **values}
        results["n-samples"][name] = {"original": len(task.eval_docs), "effective": count}
        results["configs"][name] = config
        results["versions"][name] = task.VERSION
        results["samples"][name] = samples
    return results


def document_metrics(task, doc_ids: set[int] | None = None) -> dict[str, list[tuple[int, dict]]]:
    """Per filter of the task (lm-eval runs each on the responses), each document's metrics (``process_results``)
    from the responses now in its instances, in the task's document order; only the documents in ``doc_ids`` where
    given."""
    task.apply_filters()
    by_document = _instances_by_document(task.instances)
    return {filter_key: [(doc_id, task.process_results(doc, [instance.filtered_resps[filter_key]
                                                             for instance in by_document[doc_id]]))
                         for doc_id, doc in task.doc_iterator(rank=0, world_size=1)
                         if doc_ids is None or doc_id in doc_ids]
            for filter_key in task.instances[0].filtered_resps}


def only_filter(by_filter: dict[str, list], task: str) -> list:
    """The one filter's per-document metrics: a document's outcome is one row, and which of several filters it should
    hold would be a choice to make."""
    if len(by_filter) != 1:
        raise InputError(f"task {task!r} has several filters ({', '.join(map(str, by_filter))}); per-document "
                         "outcomes need one")
    (per_document,) = by_filter.values()
    return per_document


def _instances_by_document(instances) -> dict[int, list]:
    """A task's instances by document, in request order (what ``process_results`` expects)."""
    grouped: dict[int, list] = {}
    for instance in instances:
        grouped.setdefault(instance.doc_id, []).append(instance)
    return {doc_id: sorted(group, key=lambda instance: instance.idx) for doc_id, group in grouped.items()}


def tidy_results(results: dict, layer: int, task_names: dict[str, str], kinds: dict[str, str]) -> list[dict]:
    """One row per (task, metric) from lm-eval's results dict, with the standard error where lm-eval has one. ``task``
    is the data set's name (any name the config gives it), ``kind`` what it is (`lambada`, `wikitext`): consumers that
    need to know which metric means what match on the kind."""
    rows = []
    for name, task in task_names.items():
        values = results["results"][task]
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        for metric in METRICS:
            key = f"{metric},none"
            if key not in values:
                continue
            stderr = values.get(f"{metric}_stderr,none")
            rows.append({"task": name, "kind": kinds[name], "lm_eval_task": task, "layer": layer, "metric": metric,
                         "value": float(values[key]),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
                         "n_samples": samples})
    return rows


@flags("evaluation", datasets=flag("evaluation texts written by prepare-texts; KIND is lambada or wikitext",
                                  name="--dataset", metavar="NAME=KIND=PARQUET"),
       limits=flag("evaluate only the first N documents of a data set", name="--limit", metavar="NAME=N"),
       out="tidy per-layer table (Parquet)", json_out="lm-eval's results for every exit (JSON)",
       documents_out="every document's outcome per exit (Parquet)",
       stock="lm-eval's own HFLM on the model's output (one exit), e.g. for a pruned model",
       tuned_lens="translators of train-tuned-lens in front of each exit",
       output_only="the model's output alone, through the lens: stock lm-eval's numbers, memory-bounded")
def evaluate_per_layer(model_dir: str | os.PathLike, datasets: Datasets, out: str | os.PathLike,
                       json_out: str | os.PathLike, model: str, variant: str,
                       layers: tuple[int, ...] | None = EvaluationSettings.layers,
                       batch_size: int = EvaluationSettings.batch_size, dtype: ModelDtype = "float32",
                       device: Device = "cpu",
                       bootstrap_iters: int = EvaluationSettings.bootstrap_iters, limits: Limits | None = None,
                       documents_out: str | os.PathLike | None = None, stock: bool = False,
                       tuned_lens: str | os.PathLike | None = None, output_only: bool = False) -> pd.DataFrame:
    """Evaluate every exit (or ``layers``) on ``datasets`` ({name: (kind, texts parquet)}), each cut to its first
    ``limits[name]`` documents where given; write a tidy table and lm-eval's result JSON, and with ``documents_out``
    every document's outcome per exit (what paired comparisons resample).

    ``stock`` evaluates the model as it is with lm-eval's own ``HFLM`` (one exit: its output), which is how a pruned
    model is checked against the logit lens. ``tuned_lens`` (a directory written by
    :func:`hsconv.tuned_lens.train_tuned_lens`) puts its translators in front of every exit but the last.
    ``output_only`` scores the output exit alone through the lens: the numbers of stock lm-eval (tested request by
    request), with the head read in blocks at the scored positions only, so that long documents in a batch never
    hold a batch × length × vocabulary logit tensor (stock ``HFLM`` does, which 20 WikiText articles in batches of
    8 at SmolLM2's 8,192-token window cannot fit in 24 GB)."""
    import lm_eval

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hsconv-lm-eval-") as tmp:
        data_files = {name: (kind, write_task_data(texts_path, kind, Path(tmp) / f"{name}.jsonl",
                                                   (limits or {}).get(name)))
                      for name, (kind, texts_path) in datasets.items()}
        lm, num_layers, exits = _exit_evaluator(model_dir, layers, batch_size, dtype, device, stock, tuned_lens,
                                                output_only)
        task_dict, task_names = stock_tasks(data_files, Path(tmp))
        kinds = {name: kind for name, (kind, _) in datasets.items()}
        rows, raw, documents = [], {}, []
        log_samples = documents_out is not None
        if stock:  # one exit, by lm-eval itself
            evaluations = ((layer, lm_eval.evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=bootstrap_iters,
                                                    log_samples=log_samples, verbosity="WARNING"))
                           for layer in exits)
        else:
            evaluations = evaluate_exits(lm, task_dict, exits, bootstrap_iters, log_samples)
        for layer, results in evaluations:
            rows.extend(tidy_results(results, layer, task_names, kinds))
            if documents_out is not None:
                documents.extend(document_outcomes(results, layer, task_names, kinds))
            raw[layer] = {key: results[key] for key in ("results", "n-samples", "versions", "configs")
                          if key in results}
            log.info("exit %d/%d: %s (%s forward passes so far)", layer, num_layers,
                     ", ".join(f"{r['task']} {r['metric']}={r['value']:.4g}" for r in rows if r["layer"] == layer),
                     getattr(lm, "forward_passes", "?"))
        table = _write_outputs(rows, raw, documents, out, json_out, documents_out, tmp, {
            "model": model, "variant": variant, "model_dir": str(model_dir), "batch_size": batch_size,
            "limits": limits or {}, "dtype": dtype, "device": device,
            "forward_passes": getattr(lm, "forward_passes", None), "exits": exits,
            **({"evaluator": "lm-eval HFLM (stock)"} if stock else {}),
            **({"tuned_lens": str(tuned_lens)} if tuned_lens is not None else {}),
            "datasets": {name: {"kind": kind, "texts": str(path)} for name, (kind, path) in datasets.items()}})
    log.info("%s/%s: %d exits in %.0f s -> %s", model, variant, len(exits), time.perf_counter() - started, out)
    return table


def _exit_evaluator(model_dir, layers, batch_size: int, dtype: str, device: str, stock: bool, tuned_lens,
                    output_only: bool):
    """The model lm-eval queries (stock ``HFLM``, or the lens), the model's layer count and the exits to score."""
    from hsconv.evaluation.lens_model import LogitLensLM
    from hsconv.models import weights_dir

    layers = None if layers is None else list(layers)
    if stock and (tuned_lens is not None or output_only):
        raise InputError("a stock evaluation reads the model's output with lm-eval's own model; a tuned lens "
                         "reads its layers, and --output-only reads the output through the lens")
    if stock:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=str(weights_dir(Path(model_dir))), dtype=dtype, device=device, batch_size=batch_size)
        num_layers = lm.model.config.num_hidden_layers
        if layers not in (None, [num_layers]):
            raise InputError(f"a stock evaluation has one exit, the model's output (layer {num_layers})")
        return lm, num_layers, [num_layers]
    lm = LogitLensLM(pretrained=str(weights_dir(Path(model_dir))), dtype=dtype, device=device,
                     batch_size=batch_size, tuned_lens=None if tuned_lens is None else str(tuned_lens))
    num_layers = lm.num_layers
    if output_only and layers is not None:
        raise InputError("give the exits to evaluate or ask for the output alone, not both")
    exits = [num_layers] if output_only else list(range(num_layers + 1)) if layers is None else layers
    for layer in exits:  # validate all before the first forward pass
        lm.exit_layer = layer
    lm.scored_exits = exits
    return lm, num_layers, exits


def _write_outputs(rows: list[dict], raw: dict, documents: list[dict], out, json_out, documents_out, task_dir: str,
                   provenance: dict) -> pd.DataFrame:
    """The tidy per-exit table, lm-eval's results as JSON and, where asked, every document's outcome per exit."""
    model, variant = provenance["model"], provenance["variant"]
    table = pd.DataFrame(rows)
    table.insert(0, "variant", variant)
    table.insert(0, "model", model)
    write_parquet(table, out, {"lm_eval": provenance})
    # lm-eval's task configs name the temporary data files and print functions with their memory address; a stable
    # placeholder and the bare function name keep reruns byte-identical.
    raw_text = json.dumps({"provenance": provenance, "per_exit": raw}, indent=1, default=str).replace(
        task_dir, "<task data>")
    raw_text = re.sub(r"(<function [\w.<>]+) at 0x[0-9a-f]+>", r"\1>", raw_text)
    with atomic_path(json_out) as tmp_json:
        tmp_json.write_text(raw_text)
    if documents_out is not None:
        frame = pd.DataFrame(documents)
        frame.insert(0, "variant", variant)
        frame.insert(0, "model", model)
        write_parquet(frame, documents_out, {"lm_eval": provenance})
    return table


def document_outcomes(results: dict, layer: int, task_names: dict[str, str], kinds: dict[str, str]) -> list[dict]:
    """Each document's contribution to the task's metrics at one exit, from lm-eval's logged samples: LAMBADA's
    correctness (``acc``) and target log-likelihood; WikiText's log-likelihood with its word and byte counts (the
    corpus perplexity is exp(−Σ loglikelihood / Σ words), so documents resample as (loglikelihood, words) pairs)."""
    rows = []
    for name, task in task_names.items():
        samples = results["samples"][task]
        only_filter({sample.get("filter"): samples for sample in samples}, task)
        for sample in samples:
            rows.append({"task": name, "kind": kinds[name], "layer": layer, "doc_id": int(sample["doc_id"]),
                         **outcome_fields(sample)})
    return rows


def outcome_fields(metrics: dict) -> dict:
    """A document's outcome from its lm-eval metrics: LAMBADA's correctness and target log-likelihood, WikiText's
    log-likelihood with its word and byte counts."""
    if "acc" in metrics:
        return {"acc": float(metrics["acc"]), "loglikelihood": float(metrics["perplexity"])}
    if "word_perplexity" in metrics:
        loglikelihood, words = metrics["word_perplexity"]
        return {"loglikelihood": float(loglikelihood), "words": int(words),
                "bytes": int(metrics["byte_perplexity"][1])}
    return {}
