"""The logit-lens lm-eval model against stock lm-eval and an independent per-layer computation."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import TINY_SOURCE, shared_file

lm_eval = pytest.importorskip("lm_eval")

from hsconv.errors import InputError  # noqa: E402
from hsconv.evaluation.lens_model import ExitLayerError, LogitLensLM  # noqa: E402
from hsconv.evaluation.per_layer import (  # noqa: E402
    evaluate_per_layer,
    stock_tasks,
    write_task_data,
)
from hsconv.models import prepare_model  # noqa: E402
from hsconv.texts import prepare_texts  # noqa: E402


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    lambada = prepare_texts("lambada", "lambada", root / "lambada.parquet",
                            path=str(shared_file("lambada_test.jsonl")), subset_size=24)
    wikitext = prepare_texts("wikitext", "wikitext", root / "wikitext.parquet",
                             path=str(shared_file("wiki.test.raw")), subset_size=1)
    return {"lambada": ("lambada", str(root / "lambada.parquet")),
            "wikitext": ("wikitext", str(root / "wikitext.parquet"))}, lambada, wikitext


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 256 positions: WikiText needs several rolling windows, so lm-eval's windowing is exercised too.
    source = {**TINY_SOURCE, "max_position_embeddings": 256, "tie_word_embeddings": False}
    return prepare_model("tiny", source, tmp_path_factory.mktemp("lens") / "tiny")


@pytest.fixture(scope="module")
def task_dict(texts, tmp_path_factory):
    root = tmp_path_factory.mktemp("taskdata")
    data_files = {name: (kind, write_task_data(path, kind, root / f"{name}.jsonl"))
                  for name, (kind, path) in texts[0].items()}
    return stock_tasks(data_files, root)[0]


def run(lm, task_dict):
    return lm_eval.evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=0, log_samples=True, verbosity="WARNING")


def test_stock_tasks_keep_lm_evals_config_and_read_our_file(texts, tmp_path):
    """Loaded through lm-eval's public API (a YAML including the stock one): the prompts and metrics are the stock
    YAML's, only the data source is ours, and two sets of one kind get two tasks."""
    import yaml
    from lm_eval.tasks import TaskManager

    (name, (kind, path)), = [(n, v) for n, v in texts[0].items() if v[0] == "lambada"]
    files = {"a": (kind, write_task_data(path, kind, tmp_path / "a.jsonl")),
             "b": (kind, write_task_data(path, kind, tmp_path / "b.jsonl", limit=5))}
    loaded, names = stock_tasks(files, tmp_path)
    assert names == {"a": "lambada_openai_a", "b": "lambada_openai_b"}
    stock = yaml.safe_load(Path(TaskManager().task_index["lambada_openai"].yaml_path).read_text())
    for task_name, count in [("lambada_openai_a", len(pd.read_parquet(path))), ("lambada_openai_b", 5)]:
        config = loaded["tasks"][task_name].config
        assert (config.doc_to_text, config.doc_to_target) == (stock["doc_to_text"], stock["doc_to_target"])
        assert [m["metric"] for m in config.metric_list] == [m["metric"] for m in stock["metric_list"]]
        assert config.dataset_path == "json" and len(list(loaded["tasks"][task_name].test_docs())) == count


def test_stock_task_found_in_its_folder_is_the_one_lm_evals_full_index_names():
    """Each stock task's YAML is looked up by indexing its folder alone; it must be the file that lm-eval's index of
    every task names, and a folder that is not there falls back to that index."""
    from lm_eval.tasks import TaskManager

    from hsconv.evaluation.per_layer import STOCK_TASKS, _stock_task_entry

    full_index = TaskManager().task_index
    for stock, _, folder in STOCK_TASKS.values():
        assert _stock_task_entry(stock, folder).yaml_path == full_index[stock].yaml_path, stock
    assert _stock_task_entry("lambada_openai", "no_such_folder").yaml_path == full_index["lambada_openai"].yaml_path


def test_last_exit_equals_stock_lm_eval(model_dir, task_dict):
    from lm_eval.models.huggingface import HFLM

    stock = run(HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4), task_dict)
    lens = LogitLensLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4)
    ours = run(lens, task_dict)
    assert ours["results"]["lambada_openai"]["acc,none"] == stock["results"]["lambada_openai"]["acc,none"]
    for task, metric in [("lambada_openai", "perplexity"), ("wikitext", "word_perplexity"),
                         ("wikitext", "byte_perplexity"), ("wikitext", "bits_per_byte")]:
        assert ours["results"][task][f"{metric},none"] == pytest.approx(stock["results"][task][f"{metric},none"],
                                                                        rel=1e-6), (task, metric)
    assert_same_responses(ours, stock)  # per request, too


def assert_same_responses(ours: dict, stock: dict) -> None:
    """The same log-likelihood and greedy flag for every request of both tasks."""
    for task in ("lambada_openai", "wikitext"):
        for mine, theirs in zip(ours["samples"][task], stock["samples"][task], strict=True):
            for (a, *flag_a), (b, *flag_b) in zip(mine["resps"], theirs["resps"], strict=True):
                a, b = (a[0], b[0]) if isinstance(a, (tuple, list)) else (a, b)
                assert a == pytest.approx(b, rel=1e-6, abs=1e-6) and flag_a == flag_b, task


def test_all_exits_from_one_forward_pass_per_batch(model_dir, task_dict):
    lens = LogitLensLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4)
    run(lens, task_dict)
    passes = lens.forward_passes
    assert passes > 0
    for layer in range(lens.num_layers):
        lens.exit_layer = layer
        run(lens, task_dict)
    assert lens.forward_passes == passes


def test_requests_built_once_give_lm_evals_own_results_at_every_exit(model_dir, task_dict):
    """evaluate_exits (requests built once, each exit's responses through the task's own process_results and
    aggregation) against lm_eval.evaluate run anew at each exit: the same metrics, standard errors, sample counts
    and per-document metrics."""
    from hsconv.evaluation.per_layer import evaluate_exits

    lens = LogitLensLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4)
    exits = list(range(lens.num_layers + 1))
    ours = dict(evaluate_exits(lens, task_dict, exits, bootstrap_iters=50, log_samples=True))
    for layer in exits:
        lens.exit_layer = layer
        stock = run_with_stderr(lens, task_dict)
        for task, values in stock["results"].items():
            numbers = {key: value for key, value in values.items() if "," in key}
            assert isinstance(numbers["perplexity_stderr,none" if "lambada" in task else "word_perplexity,none"],
                              float)
            assert {key: ours[layer]["results"][task][key] for key in numbers} == numbers, (layer, task)
            assert ours[layer]["n-samples"][task] == stock["n-samples"][task]
            for mine, theirs in zip(ours[layer]["samples"][task], stock["samples"][task], strict=True):
                assert mine["doc_id"] == theirs["doc_id"]
                assert all(mine[metric] == theirs[metric] for metric in theirs["metrics"])


def run_with_stderr(lm, task_dict):
    return lm_eval.evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=50, log_samples=True, verbosity="WARNING")


def test_intermediate_exit_equals_hand_computed_logit_lens(model_dir, texts):
    """Exit l: log-softmax(head(final_norm(output_hidden_states[l]))) at the target tokens, computed here by hand."""
    datasets, lambada, _ = texts
    lens = LogitLensLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4, exit_layer=1)
    model, tokenizer = lens.model, lens.tokenizer
    requests = []
    for context, target in zip(lambada["context"][:6], lambada["target"][:6]):
        # lm-eval's lambada_openai: context = all but the last word, target = " " + last word
        requests.append(((context, " " + target), tokenizer.encode(context), tokenizer.encode(" " + target)))
    got = lens._loglikelihood_tokens(requests)
    for (_, context_ids, target_ids), (logprob, greedy) in zip(requests, got):
        # lm-eval's window: the last max_length + 1 tokens, minus the final one (byte tokens overflow 256)
        window = (context_ids + target_ids)[-(lens.max_length + 1):][:-1]
        with torch.no_grad():
            hidden = model(torch.tensor([window]), output_hidden_states=True).hidden_states[1]
            logits = model.lm_head(model.model.norm(hidden)).double().log_softmax(-1)[0]
        positions = range(len(window) - len(target_ids), len(window))
        expected = sum(logits[p, t].item() for p, t in zip(positions, target_ids))
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert greedy == all(logits[p].argmax().item() == t for p, t in zip(positions, target_ids))


@pytest.mark.parametrize("bias, softcap, vocab_block", [(False, None, 7), (True, None, 16), (False, 3.0, 5),
                                                          (False, None, 1000)])
def test_blocked_target_scores_equal_a_float64_log_softmax(bias, softcap, vocab_block):
    """Readout.score_targets (the lens's kernel: the vocabulary in blocks, an online logsumexp) against log_softmax of
    the whole logits in float64, with a bias, a softcap, a last block shorter than the others and one block larger
    than the vocabulary; and the argmax is the first maximal token, ties included."""
    from hsconv.readout import Readout

    torch.manual_seed(0)
    vocab, width, rows = 37, 12, 40
    head = torch.nn.Linear(width, vocab, bias=bias)
    readout = Readout(torch.nn.LayerNorm(width), head, softcap)
    states, targets = 4 * torch.randn(rows, width), torch.randint(0, vocab, (rows,))
    with torch.no_grad():
        head.weight[9] = head.weight[30]  # tokens 9 and 30 tie everywhere (in different blocks for the small ones)
        if bias:
            head.bias[9] = head.bias[30]
        logprob, top_token = readout.score_targets(states, targets, vocab_block)
        logits = readout(states).double()
    expected = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(logprob.double(), expected, rtol=0, atol=1e-5)
    assert torch.equal(top_token, logits.argmax(-1))
    assert (top_token == 9).any() and (top_token != 30).all()  # 30 only ever ties with 9, which comes first


def test_per_layer_table_and_bad_input(model_dir, texts, tmp_path):
    datasets = texts[0]
    table = evaluate_per_layer(model_dir, datasets, tmp_path / "eval.parquet", tmp_path / "eval.json", model="tiny",
                               variant="base", batch_size=4, bootstrap_iters=100,
                               documents_out=tmp_path / "documents.parquet")
    assert set(table["layer"]) == set(range(TINY_SOURCE["num_layers"] + 1))
    # every document's outcome, aggregated as lm-eval does, gives the table's corpus numbers at every exit
    documents = pd.read_parquet(tmp_path / "documents.parquet")
    for layer, rows in documents.groupby("layer"):
        at = table[table["layer"] == layer].set_index(["task", "metric"])["value"]
        lambada, wikitext = rows[rows["task"] == "lambada"], rows[rows["task"] == "wikitext"]
        assert len(lambada) == 24 and lambada["doc_id"].is_unique
        assert lambada["acc"].mean() == pytest.approx(at["lambada", "acc"], abs=1e-12)
        assert math.exp(-lambada["loglikelihood"].mean()) == pytest.approx(at["lambada", "perplexity"], rel=1e-9)
        assert math.exp(-wikitext["loglikelihood"].sum() / wikitext["words"].sum()) == pytest.approx(
            at["wikitext", "word_perplexity"], rel=1e-9)
    accuracy = table.query("task == 'lambada' and metric == 'acc'")
    assert len(accuracy) == TINY_SOURCE["num_layers"] + 1 and accuracy["n_samples"].eq(24).all()
    assert accuracy["stderr"].between(0, 1).all()
    bits = table.query("task == 'wikitext' and metric == 'bits_per_byte'").set_index("layer")["value"]
    byte_ppl = table.query("task == 'wikitext' and metric == 'byte_perplexity'").set_index("layer")["value"]
    assert (2 ** bits).to_numpy() == pytest.approx(byte_ppl.to_numpy(), rel=1e-9)
    assert (tmp_path / "eval.json").stat().st_size > 0
    assert pd.read_parquet(tmp_path / "eval.parquet")["value"].notna().all()

    with pytest.raises(ExitLayerError, match="exit layer 9 is out of range: LlamaForCausalLM has exits 0..3"):
        evaluate_per_layer(model_dir, datasets, tmp_path / "x.parquet", tmp_path / "x.json", model="tiny",
                           variant="base", layers=[0, 9])
    with pytest.raises(InputError, match=r"evaluation texts not found \(.*none\.parquet\)"):
        evaluate_per_layer(model_dir, {"lambada": ("lambada", str(tmp_path / "none.parquet"))},
                           tmp_path / "y.parquet", tmp_path / "y.json", model="tiny", variant="base")
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "y.parquet").exists()


def test_final_norm_is_found_in_each_layout_or_the_class_is_named():
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, MistralConfig,
                              MistralForCausalLM)

    from hsconv.readout import final_norm_module

    small = dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(**small))
    assert final_norm_module(neox) is neox.gpt_neox.final_layer_norm
    mistral = MistralForCausalLM(MistralConfig(**small, num_key_value_heads=1))
    assert final_norm_module(mistral) is mistral.model.norm
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    assert final_norm_module(gpt2) is gpt2.transformer.ln_f
    del gpt2.transformer.ln_f
    with pytest.raises(ValueError, match="cannot find the final norm of GPT2LMHeadModel"):
        final_norm_module(gpt2)


@pytest.mark.parametrize("keep", [1, 2])
def test_a_pruned_model_under_stock_lm_eval_equals_the_logit_lens_at_that_exit(model_dir, task_dict, tmp_path, keep):
    """Early exit for real: the model cut after layer l, evaluated by stock lm-eval (HFLM), scores every request as
    the logit lens does at exit l of the whole model."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoConfig

    from hsconv.early_exit import prune_model

    pruned = prune_model(model_dir, keep, tmp_path / "pruned")
    stock = run(HFLM(pretrained=str(pruned), dtype="float32", device="cpu", batch_size=4), task_dict)
    assert AutoConfig.from_pretrained(pruned).num_hidden_layers == keep
    lens = LogitLensLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4, exit_layer=keep)
    ours = run(lens, task_dict)
    assert ours["results"]["lambada_openai"]["acc,none"] == stock["results"]["lambada_openai"]["acc,none"]
    assert ours["results"]["wikitext"]["word_perplexity,none"] == pytest.approx(
        stock["results"]["wikitext"]["word_perplexity,none"], rel=1e-6)
    for task in ("lambada_openai", "wikitext"):
        for mine, theirs in zip(ours["samples"][task], stock["samples"][task]):
            for (a, *_), (b, *_) in zip(mine["resps"], theirs["resps"]):
                a, b = (a[0], b[0]) if isinstance(a, (tuple, list)) else (a, b)
                assert a == pytest.approx(b, rel=1e-6, abs=1e-6)
    # and it is not the whole model's answer
    full = run(HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4), task_dict)
    assert full["results"]["wikitext"]["word_perplexity,none"] != stock["results"]["wikitext"]["word_perplexity,none"]


def test_the_stock_stage_on_a_pruned_model_equals_the_lens_table_at_that_exit(model_dir, texts, tmp_path):
    """The workflow's path: prune-model by fraction, evaluate-layers --stock, tabulate against the lens table."""
    from hsconv.early_exit import prune_model, pruned_against_lens

    datasets = texts[0]
    pruned = prune_model(model_dir, None, tmp_path / "pruned", keep_fraction=0.6)  # round(0.6 × 3) = 2 layers
    stock = evaluate_per_layer(pruned, datasets, tmp_path / "stock.parquet", tmp_path / "stock.json", model="tiny",
                               variant="base", batch_size=4, bootstrap_iters=0, stock=True)
    assert set(stock["layer"]) == {2}
    lens = evaluate_per_layer(model_dir, datasets, tmp_path / "lens.parquet", tmp_path / "lens.json", model="tiny",
                              variant="base", batch_size=4, bootstrap_iters=0, layers=[1, 2])
    compared = pruned_against_lens(lens, stock)
    assert set(compared["metric"]) >= {"acc", "word_perplexity"}
    assert compared["relative_difference"].max() < 1e-6, compared


def test_pruning_refuses_a_layer_count_out_of_range(model_dir, tmp_path):
    from hsconv.early_exit import prune_model

    with pytest.raises(ValueError, match=r"keep_layers=4 is out of range: model 'tiny' has layers 1..3"):
        prune_model(model_dir, 4, tmp_path / "pruned")
    with pytest.raises(ValueError, match=r"keep_fraction=1.5 must be in \(0, 1\]"):
        prune_model(model_dir, None, tmp_path / "pruned", keep_fraction=1.5)
    assert not (tmp_path / "pruned").exists()


def test_data_sets_are_matched_by_kind_not_by_name(model_dir, texts, tmp_path, caplog):
    """A LAMBADA set named `lambada_small` and a WikiText set named `wiki_a` keep their names in every table and are
    still recognised as what they are: paired differences and early exits have rows for both (matching on the name
    once lost them without a word)."""
    from hsconv.early_exit import shallowest_exits
    from hsconv.paired import paired_differences

    lambada, wikitext = texts[0]["lambada"][1], texts[0]["wikitext"][1]
    datasets = {"lambada_small": ("lambada", lambada), "wiki_a": ("wikitext", wikitext)}
    tables, documents = [], []
    with caplog.at_level("INFO", logger="hsconv"):
        for variant in ("base", "distilled"):  # the same weights twice: the pairing, not the difference, is tested
            tables.append(evaluate_per_layer(model_dir, datasets, tmp_path / f"{variant}.parquet",
                                             tmp_path / f"{variant}.json", model="tiny", variant=variant,
                                             batch_size=4, bootstrap_iters=0, limits={"wiki_a": 1},
                                             documents_out=tmp_path / f"{variant}_documents.parquet"))
            documents.append(pd.read_parquet(tmp_path / f"{variant}_documents.parquet"))
    evaluation = pd.concat(tables, ignore_index=True)
    assert set(zip(evaluation["task"], evaluation["kind"])) == {("lambada_small", "lambada"), ("wiki_a", "wikitext")}
    paired = paired_differences(pd.concat(documents, ignore_index=True), samples=50)
    assert set(zip(paired["task"], paired["metric"])) == {("lambada_small", "acc"), ("wiki_a", "word_perplexity")}
    assert len(paired) == 2 * (TINY_SOURCE["num_layers"] + 1) and (paired["difference"] == 0).all()
    exits = shallowest_exits(evaluation, (0.05,))
    assert set(zip(exits["task"], exits["variant"])) == {(task, variant) for task in ("lambada_small", "wiki_a")
                                                         for variant in ("base", "distilled")}
    # progress a person can read: requests and tokens scored, with the time left
    progress = [record.getMessage() for record in caplog.records if "requests scored" in record.getMessage()]
    finished = re.match(r"(\d+) exits: (\d+)/\2 requests scored, (\d+)/\3 tokens, .* ~0 s left", progress[-1])
    assert finished and int(finished.group(1)) == TINY_SOURCE["num_layers"] + 1, progress[-3:]


def test_the_output_alone_through_the_lens_is_stock_lm_eval(model_dir, task_dict):
    """Scoring only the output exit (what the output study runs on large sets) gives stock HFLM's numbers request by
    request, and another exit is refused rather than read from a memo that never scored it."""
    from lm_eval.models.huggingface import HFLM

    from hsconv.evaluation.lens_model import ExitLayerError

    stock = run(HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4), task_dict)
    lens = LogitLensLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4)
    lens.scored_exits = [lens.num_layers]
    assert_same_responses(run(lens, task_dict), stock)
    lens.exit_layer = 1
    with pytest.raises(ExitLayerError, match="not among the scored exits"):
        run(lens, task_dict)
    # scoring every exit again forgets the output-only scores (NaN at exit 1), as a fresh lens would score it
    lens.scored_exits = range(lens.num_layers + 1)
    fresh = LogitLensLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4, exit_layer=1)
    assert_same_responses(run(lens, task_dict), run(fresh, task_dict))


def test_every_filter_of_a_task_is_aggregated_as_lm_eval_reports_it():
    """A task with two filters (as lm-eval's gsm8k has "strict-match" and "flexible-extract"): each filter's metric
    under its own key, aggregated over the documents by hand; the per-document outcomes refuse to pick one."""
    from types import SimpleNamespace

    from hsconv.errors import InputError
    from hsconv.evaluation.per_layer import _task_metrics, document_outcomes

    answers = {"strict": [1, 0, 0], "loose": [1, 1, 0]}  # per document: 1 where the filter's answer is right
    instances = [SimpleNamespace(doc_id=doc_id, idx=0, filtered_resps={key: values[doc_id]
                                                                       for key, values in answers.items()})
                 for doc_id in range(3)]
    task = SimpleNamespace(
        instances=instances, apply_filters=lambda: None, VERSION=1, eval_docs=[{}, {}, {}],
        doc_iterator=lambda rank, world_size: enumerate([{}, {}, {}]),
        process_results=lambda doc, responses: {"exact_match": float(responses[0])},
        aggregation=lambda: {"exact_match": lambda items: sum(items) / len(items)},
        dump_config=lambda: {"task_alias": "probe"})
    results = _task_metrics({"probe": task}, bootstrap_iters=0, log_samples=True)
    assert results["results"]["probe"]["exact_match,strict"] == pytest.approx(1 / 3)
    assert results["results"]["probe"]["exact_match,loose"] == pytest.approx(2 / 3)
    assert results["n-samples"]["probe"]["effective"] == 3
    assert {sample["filter"] for sample in results["samples"]["probe"]} == {"strict", "loose"}
    with pytest.raises(InputError, match="several filters"):
        document_outcomes(results, 0, {"probe": "probe"}, {"probe": "lambada"})
