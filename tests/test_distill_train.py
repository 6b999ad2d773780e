"""The DeepSpeed trainer through its command (the entry point the rule uses), on tiny models on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from hsconv.corpus import CorpusError, pack_tokens, sample_corpus
from hsconv.distill.loss import layer_weights
from hsconv.distill.train import (DistillSettings, LossSettings, TrainingError, distill, lr_factor, micro_batches,
                                  resolve_zero_stage)
from hsconv.errors import InputError
from hsconv.models import load_model, prepare_model

from conftest import TINY_SOURCE, shared_file

SETTINGS = {"batch_size": 8, "micro_batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 1, "checkpoint_every": 2,
            "max_steps": 5, "zero_stage": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus"
    sample_corpus({"kind": "jsonl", "path": str(shared_file("fineweb_edu_10BT_150docs.jsonl"))}, path, documents=20)
    return path


def make_model(root, corpus, name="tiny", sequence_length=64, **source):
    model_dir = prepare_model(name, {**TINY_SOURCE, **source}, root / name)
    tokens = root / f"{name}-tokens.parquet"
    pack_tokens(corpus, model_dir, tokens, sequence_length, sequence_length * 48)
    return model_dir, tokens


def run_distill(root, model_dir, tokens, tag, settings=SETTINGS, env=None, extra=()):
    outputs = {"out": root / tag / "model", "log_out": root / tag / "steps.parquet",
               "layers_out": root / tag / "layers.parquet", "checkpoints": root / tag / "checkpoints"}
    command = [sys.executable, "-m", "hsconv.cli", "distill", "--model-dir", str(model_dir), "--tokens", str(tokens),
               "--settings", json.dumps(settings), "--name", tag]
    for key, path in outputs.items():
        command += [f"--{key.replace('_', '-')}", str(path)]
    result = subprocess.run([*command, *extra], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    return result, outputs


def test_zero2_run_killed_and_resumed_matches_an_uninterrupted_run(tmp_path, corpus):
    model_dir, tokens = make_model(tmp_path, corpus)
    whole, whole_out = run_distill(tmp_path, model_dir, tokens, "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "ZeRO stage 2" in whole.stderr

    killed, killed_out = run_distill(tmp_path, model_dir, tokens, "killed", env={"HSCONV_KILL_AFTER_STEP": "3"})
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL: no cleanup ran
    assert not killed_out["out"].exists() and not killed_out["log_out"].exists()
    resumed, _ = run_distill(tmp_path, model_dir, tokens, "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint step0000002 (step 2 of 5)" in resumed.stderr

    expected, actual = (load_file(outputs["out"] / "model.safetensors") for outputs in (whole_out, killed_out))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    pd.testing.assert_frame_equal(pd.read_parquet(whole_out["log_out"]).drop(columns=["seconds", "tokens_per_second"]),
                                  pd.read_parquet(killed_out["log_out"]).drop(columns=["seconds", "tokens_per_second"]))

    # Training moved the weights, and the result is an ordinary model directory.
    base = load_file(model_dir / "model.safetensors")
    assert any(not torch.equal(base[name], expected[name]) for name in expected)
    loaded = load_model(whole_out["out"])
    assert loaded.manifest["variant"] == "distilled" and loaded.manifest["training"]["distill"]["zero_stage"] == 2
    steps = pd.read_parquet(whole_out["log_out"])
    assert steps["step"].tolist() == [1, 2, 3, 4, 5]
    assert steps["tokens"].tolist() == [512 * step for step in range(1, 6)]
    assert steps["lr"].iloc[0] == pytest.approx(1e-3) and steps["lr"].is_monotonic_decreasing
    layers = pd.read_parquet(whole_out["layers_out"])
    assert len(layers) == 5 * (TINY_SOURCE["num_layers"] + 1)
    # The first step starts from the target itself: its own output has KL 0 to the target.
    assert layers.query("step == 1 and layer == 3")["kl"].item() == pytest.approx(0.0, abs=1e-6)
    weighted = layers.groupby("step").apply(lambda g: (g["weight"] * g["kl"]).sum(), include_groups=False)
    assert weighted.to_numpy() == pytest.approx(steps["zeta1"].to_numpy(), rel=1e-6)


def test_untied_qwen2_head_trains_under_zero1_with_one_sampled_exit(tmp_path, corpus):
    model_dir, tokens = make_model(tmp_path, corpus, name="qwen", architecture="qwen2", tie_word_embeddings=False)
    result, outputs = run_distill(tmp_path, model_dir, tokens, "qwen",
                                  settings={**SETTINGS, "max_steps": 2, "zero_stage": 1,
                                            "kl_direction": "target_student", "movement_convention": "pre_norm",
                                            "exit_samples": 1, "exit_sampling": "weighted"})
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = load_file(model_dir / "model.safetensors"), load_file(outputs["out"] / "model.safetensors")
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    # Two micro-batches per step, one exit each: at most two of the four exits have a KL logged per step.
    logged = pd.read_parquet(outputs["layers_out"]).groupby("step")["kl"].count()
    assert logged.between(1, 2).all(), logged
    assert pd.read_parquet(outputs["log_out"])["zeta1"].notna().all()


@pytest.mark.heavy  # three DeepSpeed runs per recipe (about a minute): CI runs it in its heavy tier
@pytest.mark.parametrize("recipe", [{"exit_sampling": "uniform"}, {"exit_sampling": "stratified_keep_last"},
                                    {"exit_sampling": "stratified_keep_last", "zeta2_penalty": "rise", "alpha": 2.0,
                                     "precision": "bfloat16", "zero_stage": "auto", "batch_size": 4}],
                         ids=["uniform", "stratified", "stratified-rise-bf16-zero-auto"])
def test_output_anchor_with_sampled_exits_resumes_bit_for_bit_and_logs_its_weight(tmp_path, corpus, recipe):
    """The sampled-anchor recipes (docs/findings.md §11–13) on a tiny model: killed after step 3 and resumed, each
    equals the uninterrupted run bit for bit; the output exit is computed in every step, logged with weight w_L + β."""
    model_dir, tokens = make_model(tmp_path, corpus)
    settings = {**SETTINGS, "output_kl_weight": 1.5, "exit_samples": 2, "frozen": ["embeddings", "final_norm"],
                "movement_convention": "pre_norm", **recipe}
    whole, whole_out = run_distill(tmp_path, model_dir, tokens, "whole", settings=settings)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed, killed_out = run_distill(tmp_path, model_dir, tokens, "killed", settings=settings,
                                     env={"HSCONV_KILL_AFTER_STEP": "3"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed, _ = run_distill(tmp_path, model_dir, tokens, "killed", settings=settings)
    assert resumed.returncode == 0 and "resumed from checkpoint step0000002" in resumed.stderr, resumed.stderr[-3000:]
    expected, actual = (load_file(outputs["out"] / "model.safetensors") for outputs in (whole_out, killed_out))
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    layers = pd.read_parquet(whole_out["layers_out"])
    output_exit = layers[layers["layer"] == TINY_SOURCE["num_layers"]]
    assert output_exit["kl"].notna().all() and len(output_exit) == 5
    weights = layer_weights(TINY_SOURCE["num_layers"], LossSettings().k).tolist()
    assert output_exit["weight"].tolist() == pytest.approx([weights[-1] + 1.5] * 5)
    assert layers[layers["layer"] == 0]["weight"].tolist() == pytest.approx([weights[0]] * 5)
    pd.testing.assert_frame_equal(layers, pd.read_parquet(killed_out["layers_out"]))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_frozen_parts_keep_their_pretrained_values_and_the_rest_trains(tmp_path, corpus, precision):
    """distill.frozen: the embeddings (with the tied head: one tensor) and the final norm's gain are left bit for bit
    as they were, every decoder layer still trains; in bf16 too, whose engine rounds the module's copies of the frozen
    parts (which have no float32 master)."""
    model_dir, tokens = make_model(tmp_path, corpus)
    result, outputs = run_distill(tmp_path, model_dir, tokens, "frozen",
                                  settings={**SETTINGS, "max_steps": 2, "frozen": ["embeddings", "final_norm"],
                                            "precision": precision, "zero_stage": "auto"})
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = load_file(model_dir / "model.safetensors"), load_file(outputs["out"] / "model.safetensors")
    frozen = {"model.embed_tokens.weight", "model.norm.weight"}
    assert frozen <= after.keys()
    for name in frozen:
        assert torch.equal(before[name], after[name]), name
    layers = [name for name in after if name.startswith("model.layers.")]
    assert layers and all(not torch.equal(before[name], after[name]) for name in layers if name.endswith("proj.weight"))
    training = load_model(outputs["out"]).manifest["training"]
    assert training["distill"]["frozen"] == ["embeddings", "final_norm"] and training["precision"] == precision
    # every step logs its gradient's norm, also where DeepSpeed keeps none (no ZeRO in float32)
    norms = pd.read_parquet(outputs["log_out"])["grad_norm"]
    assert np.isfinite(norms).all() and (norms > 0).all(), (training["zero_stage"], norms.tolist())


def test_another_seed_gives_another_run(tmp_path, corpus):
    """distill.seeds trains the same settings from seeds seed, seed + 1, …: another seed is another order of the
    packed sequences, so another run (the same seed twice gives the same run, as the resume test shows)."""
    model_dir, tokens = make_model(tmp_path, corpus)
    runs = {}
    for seed in (0, 1):
        result, outputs = run_distill(tmp_path, model_dir, tokens, f"seed{seed}",
                                      settings={**SETTINGS, "max_steps": 2, "seed": seed})
        assert result.returncode == 0, result.stderr[-3000:]
        runs[seed] = (load_file(outputs["out"] / "model.safetensors"), pd.read_parquet(outputs["log_out"]))
    assert any(not torch.equal(runs[0][0][name], runs[1][0][name]) for name in runs[0][0])
    assert not np.allclose(runs[0][1]["zeta"], runs[1][1]["zeta"])


@pytest.mark.heavy
def test_bfloat16_training_runs_on_cpu_close_to_float32(tmp_path, corpus):
    """The GPU default (DeepSpeed bf16: bf16 weights and activations, fp32 master weights) run here on the CPU, so the
    path is not dead code: the same steps in bf16 give finite losses near float32's, and float32 weights out. The
    bf16 default without accumulation (ZeRO auto = stage 1: DeepSpeed's bf16 optimizer, float32 gradient sums) trains
    what ZeRO-2 trains."""
    model_dir, tokens = make_model(tmp_path, corpus)
    settings = {**SETTINGS, "max_steps": 3, "checkpoint_every": 10}
    runs = {}
    for tag, extra in {"float32": {"precision": "float32"}, "bfloat16": {"precision": "bfloat16"},
                       "bfloat16-zero2-no-accumulation": {"precision": "bfloat16", "batch_size": 4},
                       "bfloat16-auto-no-accumulation": {"precision": "bfloat16", "batch_size": 4,
                                                         "zero_stage": "auto"}}.items():
        result, outputs = run_distill(tmp_path, model_dir, tokens, tag, {**settings, **extra})
        assert result.returncode == 0, result.stderr[-3000:]
        runs[tag] = (pd.read_parquet(outputs["log_out"]), load_file(outputs["out"] / "model.safetensors"))
    assert "bf16, ZeRO stage 1" in result.stderr
    assert load_model(outputs["out"]).manifest["training"]["zero_stage"] == 1
    steps32, steps16 = runs["float32"][0], runs["bfloat16"][0]
    for term in ("zeta", "zeta1", "zeta2"):
        assert np.isfinite(steps16[term]).all(), term
        # bf16 keeps 8 bits of mantissa: a few per cent on losses of this size, not orders of magnitude
        assert steps16[term].to_numpy() == pytest.approx(steps32[term].to_numpy(), rel=0.1, abs=1e-3), term
    for tag in ("bfloat16", "bfloat16-auto-no-accumulation"):
        assert all(tensor.dtype == torch.float32 for tensor in runs[tag][1].values())
    # ZeRO-1's bf16 optimizer and ZeRO-2 sum the same bf16 gradients into float32 masters: the same steps
    zero2, auto = runs["bfloat16-zero2-no-accumulation"], runs["bfloat16-auto-no-accumulation"]
    pd.testing.assert_frame_equal(zero2[0].drop(columns=["seconds", "tokens_per_second"]),
                                  auto[0].drop(columns=["seconds", "tokens_per_second"]), rtol=1e-5)
    base = load_file(model_dir / "model.safetensors")
    updates = {tag: torch.cat([(weights[name].double() - base[name].double()).flatten() for name in base])
               for tag, (_, weights) in (("zero2", zero2), ("auto", auto))}
    relative = ((updates["auto"] - updates["zero2"]).norm() / updates["zero2"].norm()).item()
    assert relative < 1e-3, f"ZeRO auto vs ZeRO-2: the updates differ by {relative:.2e} of their size"


@pytest.mark.parametrize("setting, world, bf16, accumulation, offload, stage", [
    ("auto", 1, False, 1, False, 0), ("auto", 2, False, 1, False, 2), ("auto", 1, True, 1, False, 1),
    ("auto", 4, True, 1, False, 1), ("auto", 1, True, 2, False, 2), ("auto", 1, False, 1, True, 2),
    ("auto", 1, True, 1, True, 2), (3, 1, True, 1, False, 3), (0, 4, False, 2, False, 0)])
def test_zero_stage_auto_partitions_only_where_it_pays(setting, world, bf16, accumulation, offload, stage):
    assert resolve_zero_stage(setting, world, bf16, accumulation, offload) == stage


def test_non_finite_loss_names_the_step_and_term(tmp_path, corpus):
    model_dir, tokens = make_model(tmp_path, corpus)
    model = load_model(model_dir).model
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    model.save_pretrained(model_dir)
    result, outputs = run_distill(tmp_path, model_dir, tokens, "broken")
    assert result.returncode == 1
    # The frozen target (the same broken weights) already outputs NaN, so every layer's KL is NaN from layer 0 on.
    assert "model 'broken', step 1, micro-batch 1: non-finite loss term KL at layer 0 = nan" in result.stderr
    assert not outputs["out"].exists()


def test_bad_settings_and_data_are_refused_before_training(tmp_path, corpus):
    model_dir, tokens = make_model(tmp_path, corpus)
    common = dict(model_dir=model_dir, tokens_path=tokens, out_dir=tmp_path / "m", log_out=tmp_path / "l.parquet",
                  layers_out=tmp_path / "x.parquet", checkpoint_dir=tmp_path / "c")
    with pytest.raises(TrainingError, match="batch_size=10 is not a multiple of micro_batch_size × ranks = 4 × 1"):
        distill(settings=DistillSettings.from_dict({"batch_size": 10, "micro_batch_size": 4}), **common)
    with pytest.raises(TrainingError, match="fewer than one batch of 128"):
        distill(settings=DistillSettings.from_dict({}), **common)
    with pytest.raises(TrainingError, match="unknown distillation setting"):
        DistillSettings.from_dict({"learning_rat": 1e-3})
    long_tokens = tmp_path / "long.parquet"
    pack_tokens(corpus, model_dir, long_tokens, 256, 256 * 4)  # the tiny model's context is 128
    with pytest.raises(CorpusError, match="more than the context length of model 'tiny' \\(128\\)"):
        distill(settings=DistillSettings.from_dict({"batch_size": 4}), **{**common, "tokens_path": long_tokens})
    empty = tmp_path / "empty.parquet"
    pd.read_parquet(tokens).head(0).to_parquet(empty)
    with pytest.raises(InputError, match=r"packed tokens holds no rows \(.*empty\.parquet\)"):
        distill(settings=DistillSettings.from_dict({}), **{**common, "tokens_path": empty})
    assert not (tmp_path / "m").exists()


def test_learning_rate_schedule_warms_up_then_follows_a_cosine():
    factors = [lr_factor(step, warmup_steps=2, total_steps=10, min_ratio=0.1) for step in range(10)]
    assert factors[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert all(a > b for a, b in zip(factors[2:], factors[3:]))
    assert lr_factor(10, 2, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(6, 2, 10, 0.0) == pytest.approx(0.5)  # half-way through the decay


def _damage(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.heavy
def test_a_damaged_checkpoint_is_named_and_the_newest_intact_one_is_resumed(tmp_path, corpus):
    model_dir, tokens = make_model(tmp_path, corpus)
    settings = {**SETTINGS, "max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 2}
    first, outputs = run_distill(tmp_path, model_dir, tokens, "run", settings)
    assert first.returncode == 0, first.stderr[-3000:]
    (root,) = outputs["checkpoints"].iterdir()  # one folder per settings hash
    assert sorted(p.name for p in root.glob("step*")) == ["step0000002", "step0000004"]
    assert all((root / tag / "sha256.json").is_file() for tag in ("step0000002", "step0000004"))
    damaged = sorted((root / "step0000004").rglob("*.pt"))[0]
    _damage(damaged)

    second, _ = run_distill(tmp_path, model_dir, tokens, "run", settings)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"not resuming from checkpoint step0000004: {damaged} does not match its checksum" in second.stderr
    assert "resumed from checkpoint step0000002 (step 2 of 4)" in second.stderr
    assert pd.read_parquet(outputs["log_out"])["step"].tolist() == [1, 2, 3, 4]

    for tag in ("step0000002", "step0000004"):
        _damage(sorted((root / tag).rglob("*.pt"))[0])
    third, _ = run_distill(tmp_path, model_dir, tokens, "run", settings)
    assert third.returncode != 0
    assert f"every checkpoint under {root} is damaged" in third.stderr and "delete the folder" in third.stderr


def test_an_unfinished_checkpoint_is_skipped_without_error(tmp_path):
    from hsconv.distill.train import _Checkpoints

    checkpoints = _Checkpoints(tmp_path, keep=2)
    (tmp_path / "step0000002").mkdir()
    (tmp_path / "step0000002" / "model.pt").write_bytes(b"half")
    assert checkpoints.problem("step0000002") == "it was not finished (no checksums)"
    assert checkpoints.newest_intact() is None  # nothing finished: start from the pretrained model


@pytest.mark.heavy
def test_teacher_cache_trains_without_a_target_model_and_matches_recomputing_it(tmp_path, corpus):
    """A cache of the frozen model's top V − 1 tokens (one token folded) stands for the recomputed target: the
    same losses and weights; a cache of few tokens trains too; a cache of other rows or k is refused by name."""
    from hsconv.distill.teacher import TeacherCacheError, write_teacher_cache

    model_dir, tokens = make_model(tmp_path, corpus)
    vocab = load_model(model_dir).model.get_output_embeddings().weight.shape[0]
    # float32 on every CPU (auto would be bf16 where it is native), as the cache below is written in float32
    settings = {**SETTINGS, "max_steps": 3, "precision": "float32"}
    recomputed, recomputed_out = run_distill(tmp_path, model_dir, tokens, "recomputed", settings=settings)
    assert recomputed.returncode == 0, recomputed.stderr[-3000:]

    cache = tmp_path / "cache"
    manifest = write_teacher_cache(model_dir, tokens, cache, vocab - 1, batch_size=4)
    # What the cache holds is the model's own output distribution, largest first.
    rows = pd.read_parquet(tokens)
    ids = torch.tensor(rows["input_ids"].iloc[5]).long()[None]
    with torch.no_grad():
        expected = torch.log_softmax(load_model(model_dir).model(ids).logits[0], -1)
    values, top_ids = np.load(cache / "values.npy")[5], np.load(cache / "ids.npy")[5]
    torch.testing.assert_close(torch.from_numpy(values), expected.gather(-1, torch.from_numpy(top_ids).long()),
                               rtol=1e-5, atol=1e-5)
    assert (np.diff(values, axis=-1) <= 0).all() and manifest["rows"] == len(rows)

    cached, cached_out = run_distill(tmp_path, model_dir, tokens, "cached",
                                     settings={**settings, "teacher_top_k": vocab - 1})
    assert cached.returncode == 2 and "teacher_top_k is set but no teacher cache was given" in cached.stderr
    cached, cached_out = run_distill(tmp_path, model_dir, tokens, "cached", settings={**settings,
                                     "teacher_top_k": vocab - 1}, extra=["--teacher-cache", str(cache)])
    assert cached.returncode == 0, cached.stderr[-3000:]
    columns = ["zeta", "zeta1", "zeta2", "grad_norm"]
    pd.testing.assert_frame_equal(pd.read_parquet(cached_out["log_out"])[columns],
                                  pd.read_parquet(recomputed_out["log_out"])[columns], rtol=1e-5)
    expected, actual = (load_file(out["out"] / "model.safetensors") for out in (recomputed_out, cached_out))
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-5, msg=name)
    assert load_model(cached_out["out"]).manifest["training"]["teacher_cache"]["top_k"] == vocab - 1

    small = tmp_path / "cache8"
    write_teacher_cache(model_dir, tokens, small, 8)
    result, folded_out = run_distill(tmp_path, model_dir, tokens, "k8", settings={**settings, "teacher_top_k": 8},
                                     extra=["--teacher-cache", str(small)])
    assert result.returncode == 0, result.stderr[-3000:]
    folded = pd.read_parquet(folded_out["log_out"])
    assert (folded["zeta1"] < pd.read_parquet(recomputed_out["log_out"])["zeta1"]).all()  # folding lowers KL

    wrong_k, _ = run_distill(tmp_path, model_dir, tokens, "k16", settings={**settings, "teacher_top_k": 16},
                             extra=["--teacher-cache", str(small)])
    assert wrong_k.returncode == 2 and "keeps the top 8 tokens, the settings ask for teacher_top_k=16" in wrong_k.stderr
    other_tokens = tmp_path / "other.parquet"
    pack_tokens(corpus, model_dir, other_tokens, 64, 64 * 40)
    with pytest.raises(TeacherCacheError, match="written for other packed rows"):
        distill(model_dir, other_tokens, tmp_path / "m", tmp_path / "l.parquet", tmp_path / "x.parquet",
                tmp_path / "c", DistillSettings.from_dict({**settings, "teacher_top_k": 8}), teacher_cache=small)


@pytest.mark.parametrize("world, micro_batch_size", [(1, 4), (2, 4), (2, 2), (4, 1)])
def test_each_rank_reads_its_own_share_and_every_row_is_used_as_often_as_expected(world, micro_batch_size):
    n_rows, batch_size, epochs, seed = 37, 8, 3, 5
    steps_per_epoch = n_rows // batch_size
    uses = np.zeros((epochs, n_rows), dtype=int)
    for step in range(steps_per_epoch * epochs):
        shares = [micro_batches(n_rows, batch_size, micro_batch_size, seed, step, rank, world) for rank in range(world)]
        flat = [(index, rows) for share in shares for index, rows in share]
        # global micro-batch indices 0..n-1 in rank order; together the ranks' rows make the whole batch
        assert [index for index, _ in flat] == list(range(batch_size // micro_batch_size))
        rows = np.concatenate([rows for _, rows in flat])
        # the same rows, in the same order, as one process taking the whole batch in one micro-batch
        alone = np.concatenate([rows for _, rows in micro_batches(n_rows, batch_size, batch_size, seed, step, 0, 1)])
        np.testing.assert_array_equal(rows, alone)
        np.add.at(uses[step // steps_per_epoch], rows, 1)
    # an epoch uses each row at most once, all but the n_rows mod batch_size rows its permutation leaves at the end
    assert uses.max() == 1
    assert uses.sum(axis=1).tolist() == [steps_per_epoch * batch_size] * epochs
    # the rows left out differ between epochs (each epoch is its own permutation)
    assert len({tuple(np.flatnonzero(epoch == 0)) for epoch in uses}) == epochs


WORKFLOW = """
import os, subprocess, sys, time
from hsconv.lifetime import WORKFLOW_PID_ENV, workflow_identity
os.environ[WORKFLOW_PID_ENV] = workflow_identity()  # as the Snakefile does
# as Snakemake starts a job: a shell around the stage, its output to the job's log
subprocess.Popen(["bash", "-c", "set -euo pipefail; " + sys.argv[1] + " > " + sys.argv[2] + " 2>&1"])
time.sleep(600)
"""


def test_a_live_workflow_stays_alive_when_the_wall_clock_is_adjusted(monkeypatch):
    """The watch compares start times since boot: an NTP step moves Linux's boot time (derived from the wall clock)
    and with it every wall-clock start time, which made a live workflow look gone (a Slurm job in CI ended itself)."""
    import psutil

    from hsconv import lifetime

    started = float(lifetime.workflow_identity().rsplit(":", 2)[2])
    assert lifetime._alive(os.getpid(), started)
    if sys.platform == "linux":
        real_boot_time = psutil._psplatform.boot_time
        monkeypatch.setattr(psutil._psplatform, "boot_time", lambda: real_boot_time() + 2.0)
        assert lifetime._alive(os.getpid(), started)
    assert not lifetime._alive(os.getpid(), started - 60)  # a reused pid: another start
    assert not lifetime._alive(2**22 + 7, started)  # no such process


def test_a_stage_stops_when_the_workflow_that_started_it_is_killed(tmp_path, corpus):
    """SIGKILL the process that started the job (Snakemake here, which can then stop nothing): the stage notices within
    a few seconds and ends itself, so nothing is written after the workflow is gone."""
    import shlex
    import signal
    import time

    import psutil

    model_dir, tokens = make_model(tmp_path, corpus)
    outputs = {"out": tmp_path / "run" / "model", "log-out": tmp_path / "run" / "steps.parquet",
               "layers-out": tmp_path / "run" / "layers.parquet", "checkpoints": tmp_path / "run" / "checkpoints"}
    stage = [sys.executable, "-m", "hsconv.cli", "distill", "--model-dir", str(model_dir), "--tokens", str(tokens),
             "--settings", json.dumps({**SETTINGS, "max_steps": 2}), *[part for option, path in outputs.items()
                                                                        for part in (f"--{option}", str(path))]]
    log = tmp_path / "distill.log"
    workflow = subprocess.Popen([sys.executable, "-c", WORKFLOW, shlex.join(stage), str(log)],
                                env={**os.environ, "HSCONV_MIN_STEP_SECONDS": "120"})
    try:
        deadline = time.monotonic() + 180
        while "no checkpoint in" not in (log.read_text() if log.exists() else ""):
            assert workflow.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        jobs = [process for process in psutil.Process(workflow.pid).children(recursive=True)]
        assert any("hsconv.cli" in " ".join(process.cmdline()) for process in jobs)
        workflow.send_signal(signal.SIGKILL)
        workflow.wait()
        gone, alive = psutil.wait_procs(jobs, timeout=15)
        assert not alive, [process.cmdline() for process in alive]
    finally:
        workflow.kill()
    assert "the workflow that started this job (Snakemake, pid" in log.read_text()
    assert not outputs["out"].exists() and not outputs["log-out"].exists()


@pytest.mark.heavy  # three DeepSpeed runs that compile (about two minutes): CI runs it in its heavy tier
def test_compiled_training_matches_eager_within_bf16_rounding_and_resumes_bit_for_bit(tmp_path, corpus):
    """``compile: always`` (what ``auto`` picks for a real model): the layers and the loss's kernels compiled. The
    same bf16 steps as eager up to bf16 rounding, and a killed compiled run resumes to the uninterrupted one's bytes."""
    model_dir, tokens = make_model(tmp_path, corpus)
    settings = {**SETTINGS, "batch_size": 4, "zero_stage": "auto", "precision": "bfloat16"}
    runs = {}
    for tag, mode in (("eager", "never"), ("compiled", "always")):
        result, outputs = run_distill(tmp_path, model_dir, tokens, tag, {**settings, "compile": mode})
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("compiled" if mode == "always" else "eager") in result.stderr.split("ZeRO stage")[1].splitlines()[0]
        runs[tag] = (pd.read_parquet(outputs["log_out"]), load_file(outputs["out"] / "model.safetensors"), outputs)
    assert load_model(runs["compiled"][2]["out"]).manifest["training"]["compiled"] is True
    eager_steps, compiled_steps = runs["eager"][0], runs["compiled"][0]
    for term in ("zeta", "zeta1", "zeta2"):
        # bf16 keeps 8 bits of mantissa; the compiled kernels round and sum in another order
        assert compiled_steps[term].to_numpy() == pytest.approx(eager_steps[term].to_numpy(), rel=2e-2), term
    base = load_file(model_dir / "model.safetensors")
    updates = {tag: torch.cat([(runs[tag][1][name].double() - base[name].double()).flatten() for name in base])
               for tag in runs}
    relative = ((updates["compiled"] - updates["eager"]).norm() / updates["eager"].norm()).item()
    print(f"compiled vs eager: the updates differ by {relative:.2e} of their size")
    assert relative < 5e-2, f"compiled vs eager: the updates differ by {relative:.2e} of their size"

    compiled_settings = {**settings, "compile": "always"}
    killed, killed_out = run_distill(tmp_path, model_dir, tokens, "killed", compiled_settings,
                                     env={"HSCONV_KILL_AFTER_STEP": "3"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed, _ = run_distill(tmp_path, model_dir, tokens, "killed", compiled_settings)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint step0000002" in resumed.stderr
    actual = load_file(killed_out["out"] / "model.safetensors")
    for name, expected in runs["compiled"][1].items():
        assert torch.equal(expected, actual[name]), name
