"""The layer-relevance study: a skipped block against a model built without it, the intact model against stock
lm-eval, the KL against a float64 recomputation, and the statistics worked out by hand."""

from __future__ import annotations

import copy
import re

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from conftest import TINY_SOURCE, shared_file

lm_eval = pytest.importorskip("lm_eval")

from hsconv.architectures import FAMILIES  # noqa: E402
from hsconv.evaluation.layer_skip import (  # noqa: E402
    INTACT,
    LayerSkipLM,
    configuration_pass,
    decoder_layers,
    intact_pass,
    measure_layer_relevance,
)
from hsconv.evaluation.per_layer import stock_tasks, write_task_data  # noqa: E402
from hsconv.layer_relevance import pruning_orders, relevance_tables, spearman  # noqa: E402
from hsconv.models import load_model, prepare_model  # noqa: E402
from hsconv.texts import prepare_texts  # noqa: E402

SOURCE = {**TINY_SOURCE, "max_position_embeddings": 256, "tie_word_embeddings": False}


def model_without_block(model, block: int):
    """An independent reference: a model built from its config with one layer fewer, every weight copied, the
    deleted block's left out and the later blocks' renumbered."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    config.num_hidden_layers -= 1
    if isinstance(getattr(config, "layer_types", None), list):
        del config.layer_types[block - 1]
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    blocks = FAMILIES[model.config.model_type].layers
    state = {}
    for name, tensor in model.state_dict().items():
        found = re.search(rf"\.{blocks}\.(\d+)\.", name)
        if found:
            index = int(found.group(1))
            if index == block - 1:
                continue
            if index > block - 1:
                name = name.replace(f".{blocks}.{index}.", f".{blocks}.{index - 1}.")
        state[name] = tensor
    reference.load_state_dict(state, strict=True)
    return reference.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2", "gemma2"])
def family_model(request, tmp_path_factory):
    architecture = request.param
    model_dir = prepare_model(architecture, {**SOURCE, "architecture": architecture},
                              tmp_path_factory.mktemp("skip") / architecture)
    return load_model(model_dir).model.eval()


def test_skipping_a_block_equals_the_model_built_without_it(family_model):
    input_ids = torch.tensor([list(b"The curious cat climbed the tree."), list(b"A small bird sat at the top!!!!!!")])
    with torch.no_grad():
        intact = intact_pass(family_model, input_ids)
        for block in range(1, family_model.config.num_hidden_layers + 1):
            reference = model_without_block(family_model, block).get_decoder()(input_ids=input_ids, use_cache=False)
            skipped = configuration_pass(family_model, input_ids, (block,))
            replayed = configuration_pass(family_model, input_ids, (block,), intact)
            torch.testing.assert_close(skipped, reference.last_hidden_state, rtol=1e-5, atol=1e-5)
            # the replayed prefix is the intact pass's own tensor: the same computation, to the bit
            assert torch.equal(replayed, skipped), block
    # and the model is itself again afterwards
    with torch.no_grad():
        again = family_model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    assert torch.equal(again, intact.normed_last)
    assert all("forward" not in vars(layer) for layer in decoder_layers(family_model))


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("relevance-texts")
    prepare_texts("lambada", "lambada", root / "lambada.parquet", path=str(shared_file("lambada_test.jsonl")),
                  subset_size=10)
    prepare_texts("wikitext", "wikitext", root / "wikitext.parquet", path=str(shared_file("wiki.test.raw")),
                  subset_size=1)
    return {"lambada": ("lambada", str(root / "lambada.parquet")),
            "wikitext": ("wikitext", str(root / "wikitext.parquet"))}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return prepare_model("tiny", SOURCE, tmp_path_factory.mktemp("relevance") / "tiny")


@pytest.fixture(scope="module")
def task_dict(texts, tmp_path_factory):
    root = tmp_path_factory.mktemp("relevance-tasks")
    files = {name: (kind, write_task_data(path, kind, root / f"{name}.jsonl")) for name, (kind, path) in texts.items()}
    return stock_tasks(files, root)[0]


def run(lm, task_dict):
    return lm_eval.evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=0, log_samples=True, verbosity="WARNING")


def responses(results):
    return {task: [sample["resps"] for sample in results["samples"][task]] for task in ("lambada_openai", "wikitext")}


def assert_same(ours, stock):
    for task in ours:
        for mine, theirs in zip(ours[task], stock[task], strict=True):
            for (a, *flag_a), (b, *flag_b) in zip(mine, theirs, strict=True):
                a, b = (a[0], b[0]) if isinstance(a, (tuple, list)) else (a, b)
                assert a == pytest.approx(b, rel=1e-5, abs=1e-5) and flag_a == flag_b, task


def test_intact_and_each_removal_through_lm_eval_equal_stock_lm_eval_on_the_built_model(model_dir, task_dict, tmp_path):
    """Intact: stock lm-eval on the model. Block l removed: stock lm-eval on a model directory built without it."""
    from lm_eval.models.huggingface import HFLM

    loaded = load_model(model_dir)
    lm = LayerSkipLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=64, batch_tokens=512)
    lm.configurations = [INTACT] + [(block,) for block in range(1, loaded.num_layers + 1)]
    assert_same(responses(run(lm, task_dict)), responses(run(HFLM(pretrained=str(model_dir), dtype="float32",
                                                                   device="cpu", batch_size=4), task_dict)))
    passes = lm.forward_passes
    for block in range(1, loaded.num_layers + 1):
        reference = tmp_path / f"without{block}"
        without = model_without_block(loaded.model, block)
        without.save_pretrained(reference)
        loaded.tokenizer.save_pretrained(reference)
        lm.configuration = (block,)
        stock = HFLM(pretrained=str(reference), dtype="float32", device="cpu", batch_size=4)
        assert_same(responses(run(lm, task_dict)), responses(run(stock, task_dict)))
    assert lm.forward_passes == passes  # every configuration came from the first batches' passes


def test_kl_to_the_intact_model_equals_a_float64_recomputation(model_dir):
    loaded = load_model(model_dir)
    lm = LayerSkipLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=64)
    lm.configurations = [INTACT, (2,), (1, 3)]
    context, continuation = tuple(b"The cat sat on the"), tuple(b" mat")
    lm._loglikelihood_tokens([(None, context, continuation)])
    window = torch.tensor([lm._window(context, continuation)])
    positions = slice(len(context) - 1, len(context) - 1 + len(continuation))
    with torch.no_grad():
        intact = torch.log_softmax(loaded.model(window).logits[0, positions].double(), dim=-1)
        for configuration in lm.configurations:
            normed = configuration_pass(loaded.model, window, configuration)
            removed = torch.log_softmax(loaded.model.get_output_embeddings()(normed)[0, positions].double(), dim=-1)
            expected = float((intact.exp() * (intact - removed)).sum())
            lm.configuration = configuration
            scored = lm.scored((context, continuation))
            assert scored.tokens == len(continuation)
            # lm-eval's float32 log-softmax: a KL of near distributions is a sum of differences of float32
            # log-probabilities (ulp ≈ 5e-7 at −5.5), so it agrees to about 1e-3 of itself, not to float64's digits
            assert scored.kl_sum == pytest.approx(expected, rel=2e-3, abs=1e-7), configuration
            assert (scored.kl_sum == 0) == (configuration == INTACT)


def test_spearman_by_hand():
    assert spearman(np.array([1, 2, 3, 4]), np.array([1, 3, 2, 4])) == pytest.approx(1 - 6 * 2 / (4 * 15))
    # ties take their average rank: ranks (1.5, 1.5, 3) against (1, 2, 3), Pearson = 1.5 / √(1.5 · 2)
    assert spearman(np.array([1, 1, 2]), np.array([1, 2, 3])) == pytest.approx(1.5 / np.sqrt(3))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 9)), rng.normal(size=(5, 9))
    np.testing.assert_allclose(spearman(x, y), [spearmanr(a, b).statistic for a, b in zip(x, y)])


def hand_case(acc_without_block_1=(1, 0)):
    """Two LAMBADA documents, a model of two blocks. Intact: both wrong. Block 1 removed: document 0 right."""
    outcomes, layers = [], []
    for removed, accs, kls in (("", (0, 0), (0, 0)), ("1", acc_without_block_1, (3, 1)), ("2", (0, 0), (1, 1))):
        for doc_id in (0, 1):
            outcomes.append({"model": "m", "variant": "base", "configuration": removed or "intact",
                             "removed": removed, "n_removed": int(bool(removed)), "task": "lambada",
                             "kind": "lambada", "doc_id": doc_id, "acc": float(accs[doc_id]),
                             "loglikelihood": -1.0, "kl_sum": float(kls[doc_id]), "kl_tokens": 1 + doc_id})
    for doc_id in (0, 1):
        for layer, movement in enumerate((0.0, 0.2, 0.1)):
            layers.append({"model": "m", "variant": "base", "task": "lambada", "kind": "lambada", "doc_id": doc_id,
                           "layer": layer, "movement_sum": movement * (1 + doc_id), "tokens": 1 + doc_id,
                           "movement_without_first_sum": movement * doc_id, "tokens_without_first": doc_id,
                           "norm_sum": (1.0 + layer) * (1 + doc_id)})
    return pd.DataFrame(outcomes), pd.DataFrame(layers)


def test_the_per_block_table_and_its_intervals_by_hand():
    outcomes, layers = hand_case()
    table, agreement, _ = relevance_tables(outcomes, layers, samples=2000, seed=1)
    first = table[table["layer"] == 1].iloc[0]
    # pooled over tokens: KL (3 + 1) / (1 + 2), movement 0.2 (both documents), norm growth 2 / 1
    assert first["removal_kl"] == pytest.approx(4 / 3) and first["movement"] == pytest.approx(0.2)
    assert first["block_influence"] == pytest.approx(0.4) and first["norm_growth"] == pytest.approx(2.0)
    # resampling two documents gives KL 3/1, 4/3 or 1/2, each all-same draw with probability 1/4
    assert (first["removal_kl_low"], first["removal_kl_high"]) == pytest.approx((0.5, 3.0))
    # accuracy difference: +1 on document 0, 0 on document 1: 0.5, and resamples of 0, 0.5 or 1
    assert first["difference"] == pytest.approx(0.5)
    assert (first["difference_low"], first["difference_high"]) == pytest.approx((0.0, 1.0))
    # two blocks: movement (0.2, 0.1) against KL (4/3, 2/3) agree in rank: ρ = 1
    row = agreement[agreement["measure"] == "movement"].iloc[0]
    assert row["spearman"] == pytest.approx(1.0)


def test_pruning_is_ordered_on_the_even_documents_only():
    outcomes, layers = hand_case()
    # on document 0 (even) removing block 2 is the smaller change; on document 1 (odd) removing block 1 is
    outcomes.loc[(outcomes["removed"] == "1") & (outcomes["doc_id"] == 1), "kl_sum"] = 0.0
    assert pruning_orders(outcomes, layers, 2)["removal_kl"] == [2, 1]
    layers.loc[(layers["doc_id"] == 1) & (layers["layer"] == 2), "movement_sum"] = 9.0  # odd: ignored
    assert pruning_orders(outcomes, layers, 2)["block_influence"] == [2, 1]


def test_the_stage_writes_every_removal_and_the_held_out_prunings(model_dir, texts, tmp_path):
    provenance = measure_layer_relevance(str(model_dir), texts, tmp_path / "documents.parquet",
                                         tmp_path / "layers.parquet", "tiny", "base", prune_max_layers=2,
                                         batch_tokens=1024)
    documents = pd.read_parquet(tmp_path / "documents.parquet")
    num_layers = load_model(model_dir).num_layers
    singles = documents[documents["n_removed"] <= 1]
    assert sorted(singles["removed"].unique()) == ["", *map(str, range(1, num_layers + 1))]
    pruned = documents[documents["n_removed"] == 2]
    assert not pruned.empty and (pruned["doc_id"] % 2 == 1).all()
    for order in provenance["orders"].values():
        assert sorted(order) == list(range(1, num_layers + 1))
        assert ",".join(map(str, sorted(order[:2]))) in set(pruned["removed"])
    layers = pd.read_parquet(tmp_path / "layers.parquet")
    assert set(layers["layer"]) == set(range(num_layers + 1))


def test_the_figure_draws_a_data_set_without_held_out_documents(model_dir, texts, tmp_path):
    """One WikiText article (doc 0) ranks the blocks and leaves nothing to score the prunings on: the panel says so."""
    from hsconv.figures.layer_relevance import plot_layer_relevance
    from hsconv.layer_relevance import tabulate_layer_relevance

    measure_layer_relevance(str(model_dir), texts, tmp_path / "d.parquet", tmp_path / "l.parquet", "tiny", "base",
                            prune_max_layers=2, batch_tokens=1024, limits={"lambada": 4})
    tabulate_layer_relevance([str(tmp_path / "d.parquet")], [str(tmp_path / "l.parquet")], tmp_path / "r",
                             tmp_path / "a", tmp_path / "p", "test", bootstrap_samples=20)
    assert set(pd.read_parquet(tmp_path / "p.parquet")["task"]) == {"lambada"}
    plot_layer_relevance(tmp_path / "r.parquet", tmp_path / "p.parquet", tmp_path / "f.pdf", tmp_path / "f.png",
                         {"tiny": "tiny Llama"})
    assert (tmp_path / "f.pdf").read_bytes().startswith(b"%PDF")
