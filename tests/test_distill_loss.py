"""The memory-efficient self-distillation loss against a plain float64 implementation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hsconv.distill.loss import (RecomputedTarget, hidden_state_penalty, layer_weights, reference_loss,
                                self_distillation_loss)
from hsconv.readout import decoder_states, final_norm_module
from hsconv.models import build_tiny_model

SPEC = {"architecture": "llama", "hidden_size": 32, "intermediate_size": 64, "num_layers": 3, "num_heads": 4,
        "num_kv_heads": 2, "max_position_embeddings": 64, "seed": 0}


def make_pair(tied: bool, architecture: str = "llama"):
    """A student and a frozen target that differs from it (as after a few training steps)."""
    student, _ = build_tiny_model({**SPEC, "architecture": architecture, "tie_word_embeddings": tied})
    student = student.double()
    target = copy.deepcopy(student).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return student, target


def batch():
    torch.manual_seed(2)
    input_ids = torch.randint(0, 256, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0  # a padded row
    return input_ids, mask


def loss_and_grads(loss_fn, student, target, **settings):
    input_ids, mask = batch()
    student.zero_grad()
    result = decoder_states(student, input_ids, mask)
    pre_norm = result["states"][:-1] + [result["pre_norm_last"]]
    with torch.no_grad():
        target_hidden = decoder_states(target, input_ids, mask)["states"][-1]
    terms = loss_fn(pre_norm, final_norm_module(student), student.get_output_embeddings(),
                    RecomputedTarget(target_hidden, target.get_output_embeddings()), mask, **settings)
    terms.total.backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    return terms, grads


@pytest.mark.parametrize("direction", ["student_target", "target_student"])
@pytest.mark.parametrize("convention", ["hf", "pre_norm"])
@pytest.mark.parametrize("tied", [True, False])
def test_fused_loss_equals_float64_reference(direction, convention, tied):
    student, target = make_pair(tied)
    settings = dict(alpha=0.7, k=0.25, direction=direction, movement_convention=convention)
    expected, expected_grads = loss_and_grads(reference_loss, student, target, **settings)
    # Chunks of 4 tokens: the 18 real tokens span several chunks, the last one partial.
    fused, fused_grads = loss_and_grads(self_distillation_loss, student, target, chunk_tokens=4, **settings)
    for name in ("total", "zeta1", "zeta2", "kl", "step"):
        torch.testing.assert_close(getattr(fused, name).double(), getattr(expected, name).double(), rtol=1e-5,
                                   atol=1e-12, msg=name)
    assert fused.tokens == expected.tokens == 18
    assert expected_grads.keys() == fused_grads.keys()
    assert ("lm_head.weight" in fused_grads) is (not tied)  # a tied head's gradient lands on the embedding
    for name, gradient in expected_grads.items():
        torch.testing.assert_close(fused_grads[name], gradient, rtol=1e-5, atol=1e-10, msg=name)
    assert expected.zeta1 > 0 and expected.zeta2 > 0


@pytest.mark.parametrize("convention", ["hf", "pre_norm"])
def test_scale_free_zeta2_is_one_minus_cosine_and_ignores_the_last_states_scale(convention):
    """zeta2_measure cosine_distance: ζ2 = Σ w_l mean_t (1 − cos(h_{l−1}, h_l)), by hand in float64; fused equals
    reference; and scaling the final norm's gain (which scales the hf h_L) changes the paper's ζ2 but not this one."""
    student, target = make_pair(tied=False)
    settings = dict(alpha=0.7, k=0.25, movement_convention=convention, zeta2_measure="cosine_distance")
    expected, expected_grads = loss_and_grads(reference_loss, student, target, **settings)
    fused, fused_grads = loss_and_grads(self_distillation_loss, student, target, chunk_tokens=4, **settings)
    torch.testing.assert_close(fused.zeta2, expected.zeta2, rtol=1e-9, atol=1e-12)
    for name, gradient in expected_grads.items():
        torch.testing.assert_close(fused_grads[name], gradient, rtol=1e-5, atol=1e-10, msg=name)
    input_ids, mask = batch()
    with torch.no_grad():
        result = decoder_states(student, input_ids, mask)
    states = result["states"][:-1] + [result["states"][-1] if convention == "hf" else result["pre_norm_last"]]
    real = mask.bool()
    by_hand = [(1 - torch.nn.functional.cosine_similarity(a[real], b[real], dim=-1)).mean()
               for a, b in zip(states[:-1], states[1:])]
    weights = torch.softmax(0.25 * torch.arange(len(states), dtype=torch.float64), 0)[1:]
    torch.testing.assert_close(fused.step, torch.stack(by_hand), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fused.zeta2.detach(), (weights * torch.stack(by_hand)).sum(), rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        final_norm_module(student).weight.mul_(3.0)
    scaled, _ = loss_and_grads(self_distillation_loss, student, target, chunk_tokens=4, **settings)
    paper, _ = loss_and_grads(self_distillation_loss, student, target, chunk_tokens=4,
                              **{**settings, "zeta2_measure": "relative_step"})
    torch.testing.assert_close(scaled.step, fused.step, rtol=1e-9, atol=1e-12)
    if convention == "hf":
        with torch.no_grad():
            final_norm_module(student).weight.div_(3.0)
        unscaled, _ = loss_and_grads(self_distillation_loss, student, target, chunk_tokens=4,
                                     **{**settings, "zeta2_measure": "relative_step"})
        assert abs(paper.step[-1] - unscaled.step[-1]) > 0.1 * unscaled.step[-1]


def test_rise_penalty_by_hand():
    """zeta2_penalty rise: Σ_{l≥2} w_l max(0, s_l − s_{l−1}), the rises only; step: Σ_{l≥1} w_l s_l."""
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    steps = torch.tensor([0.5, 0.2, 0.6], dtype=torch.float64, requires_grad=True)
    rise = hidden_state_penalty(steps, weights, "rise")
    assert rise.item() == pytest.approx(0.4 * (0.6 - 0.2))  # 0.2 -> 0.6 rises; 0.5 -> 0.2 falls, not penalised
    rise.backward()
    # only the rising pair is pulled: the larger step down, the one before it up; the first step is left alone
    torch.testing.assert_close(steps.grad, torch.tensor([0.0, -0.4, 0.4], dtype=torch.float64))
    assert hidden_state_penalty(steps.detach(), weights, "step").item() == pytest.approx(0.2 * 0.5 + 0.3 * 0.2 + 0.4 * 0.6)
    shrinking = torch.tensor([0.5, 0.4, 0.1], dtype=torch.float64)
    assert hidden_state_penalty(shrinking, weights, "rise").item() == 0.0
    with pytest.raises(ValueError, match="zeta2_penalty 'rises' is not one of step, rise"):
        hidden_state_penalty(steps, weights, "rises")


@pytest.mark.parametrize(("convention", "measure"), [("hf", "relative_step"), ("pre_norm", "cosine_distance")])
def test_rise_penalty_fused_equals_float64_reference(convention, measure):
    """The rise penalty through the fused loss and through the reference: the same ζ2 (the rises of the logged
    steps, by hand) and the same gradients."""
    student, target = make_pair(tied=True)
    settings = dict(alpha=0.7, k=0.25, movement_convention=convention, zeta2_measure=measure, zeta2_penalty="rise")
    expected, expected_grads = loss_and_grads(reference_loss, student, target, **settings)
    fused, fused_grads = loss_and_grads(self_distillation_loss, student, target, chunk_tokens=4, **settings)
    weights = layer_weights(len(expected.step), 0.25)
    by_hand = sum(float(weights[layer]) * max(0.0, float(expected.step[layer - 1] - expected.step[layer - 2]))
                  for layer in range(2, len(expected.step) + 1))
    assert by_hand > 0  # the tiny model has a rise to penalise
    assert expected.zeta2.item() == pytest.approx(by_hand, rel=1e-12)
    torch.testing.assert_close(fused.zeta2.double(), expected.zeta2.double(), rtol=1e-9, atol=1e-12)
    for name, gradient in expected_grads.items():
        torch.testing.assert_close(fused_grads[name], gradient, rtol=1e-5, atol=1e-10, msg=name)


def test_float32_fused_loss_close_to_float64():
    student, target = make_pair(tied=True)
    expected, expected_grads = loss_and_grads(reference_loss, student, target, alpha=1.0, k=0.25)
    fused, fused_grads = loss_and_grads(self_distillation_loss, student.float(), target.float(), alpha=1.0, k=0.25,
                                        chunk_tokens=5)
    assert abs(fused.total.item() - expected.total.item()) <= 1e-4 * expected.total.item()
    for name, gradient in expected_grads.items():
        error = (fused_grads[name].double() - gradient).norm() / gradient.norm()
        assert error < 1e-4, name


def test_large_k_reduces_to_last_layer_kl():
    """α = 0 and k → ∞: all weight on layer L, so ζ = KL(q_L, q_target) of the model's own output."""
    weights = layer_weights(5, k=200.0)
    assert weights[-1] == pytest.approx(1.0) and weights[:-1].sum() < 1e-80
    student, target = make_pair(tied=True)
    terms, _ = loss_and_grads(self_distillation_loss, student, target, alpha=0.0, k=200.0, chunk_tokens=8)
    input_ids, mask = batch()
    with torch.no_grad():
        logq = torch.log_softmax(student(input_ids, attention_mask=mask).logits, -1)
        logp = torch.log_softmax(target(input_ids, attention_mask=mask).logits, -1)
    last_layer_kl = (logq.exp() * (logq - logp)).sum(-1)[mask.bool()].mean()
    torch.testing.assert_close(terms.total.detach(), last_layer_kl, rtol=1e-9, atol=1e-12)


def test_weights_sum_to_one_and_grow_with_depth():
    weights = layer_weights(30, k=0.25)
    assert weights.sum().item() == pytest.approx(1.0)
    assert torch.all(weights[1:] > weights[:-1])
    # geometric series: w_L = (1 − e^{−k}) / (1 − e^{−k(L+1)})
    assert weights[-1].item() == pytest.approx((1 - math.exp(-0.25)) / (1 - math.exp(-0.25 * 31)), rel=1e-12)


def test_qwen2_untied_head_with_identical_target_has_zero_kl():
    student, _ = build_tiny_model({**SPEC, "architecture": "qwen2", "tie_word_embeddings": False})
    student = student.double()
    terms, _ = loss_and_grads(self_distillation_loss, student, copy.deepcopy(student), alpha=0.0, k=1e4)
    assert terms.kl[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert torch.all(terms.kl[:-1] > 0)


def test_bad_settings_are_named():
    student, target = make_pair(tied=True)
    with pytest.raises(ValueError, match="kl_direction 'sideways'"):
        loss_and_grads(self_distillation_loss, student, target, alpha=1.0, k=0.25, direction="sideways")


def sampled_zeta1_and_gradient(student, target, draws: int, **settings):
    """ζ1 (α = 0, so ζ = ζ1) and its gradient, flattened, for ``draws`` independent draws of exits."""
    values, gradients = [], []
    generator = torch.Generator().manual_seed(0)
    for _ in range(draws):
        terms, grads = loss_and_grads(self_distillation_loss, student, target, alpha=0.0, k=0.25,
                                      generator=generator, **settings)
        values.append(terms.zeta1.item())
        gradients.append(torch.cat([grads[name].flatten() for name in sorted(grads)]))
    return torch.tensor(values, dtype=torch.float64), torch.stack(gradients)


@pytest.mark.parametrize("scheme", ["uniform", "weighted", "uniform_keep_last", "stratified_keep_last"])
def test_exit_sampling_is_unbiased_for_the_loss_and_its_gradient(scheme):
    """Over many draws on one batch, the mean sampled ζ1 and gradient match the full ones within their standard
    error; and the draws really differ (a sampler that always returned every exit would pass trivially)."""
    student, target = make_pair(tied=False)
    # 3 layers: 4 exits, of which 2 are sampled per draw
    full, full_grads = loss_and_grads(self_distillation_loss, student, target, alpha=0.0, k=0.25)
    full_gradient = torch.cat([full_grads[name].flatten() for name in sorted(full_grads)])
    draws = 400
    values, gradients = sampled_zeta1_and_gradient(student, target, draws, exit_samples=2, exit_sampling=scheme)
    assert values.std() > 1e-3 * values.mean()
    z = (values.mean() - full.zeta1.item()) / (values.std() / math.sqrt(draws))
    assert abs(z) < 4, f"sampled ζ1 mean {values.mean():.6f} vs full {full.zeta1.item():.6f} (z = {z:.2f})"
    directions = torch.randn(3, full_gradient.numel(), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    projected, expected = gradients @ directions.t(), directions @ full_gradient
    z = (projected.mean(0) - expected) / (projected.std(0) / math.sqrt(draws))
    assert z.abs().max() < 4, f"gradient projections: z = {z.tolist()}"


def test_exit_sampling_with_every_exit_is_the_exact_loss_and_marks_unsampled_exits():
    student, target = make_pair(tied=True)
    settings = dict(alpha=0.7, k=0.25, movement_convention="hf")
    exact, exact_grads = loss_and_grads(self_distillation_loss, student, target, **settings)
    every, every_grads = loss_and_grads(self_distillation_loss, student, target, exit_samples=4, **settings)
    assert every.total.item() == exact.total.item() and every.exits == [0, 1, 2, 3]
    for name, gradient in exact_grads.items():
        assert torch.equal(every_grads[name], gradient), name
    sampled, _ = loss_and_grads(self_distillation_loss, student, target, exit_samples=1,
                                generator=torch.Generator().manual_seed(5), **settings)
    assert len(sampled.exits) == 1 and sampled.kl.isnan().sum() == 3
    torch.testing.assert_close(sampled.kl[sampled.exits[0]], exact.kl[sampled.exits[0]], rtol=1e-10, atol=0)
    # ζ2 stays exact whichever exits ζ1 used (the hf convention normalises h_L even when L is not sampled).
    torch.testing.assert_close(sampled.zeta2, exact.zeta2, rtol=1e-12, atol=0)


def test_top_k_target_keeps_the_largest_entries_and_the_rest_as_one_bucket():
    from hsconv.distill.loss import dense_from_top_k, top_k_target

    torch.manual_seed(0)
    log_probs = torch.log_softmax(3 * torch.randn(5, 40, dtype=torch.float64), dim=-1)
    values, ids, rest = top_k_target(log_probs, 8)
    dense = dense_from_top_k(values, ids, rest, 40)
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(dense.gather(-1, ids), log_probs.gather(-1, ids))
    kept = torch.zeros_like(log_probs, dtype=torch.bool).scatter_(-1, ids, True)
    # each left-out token gets the mean of the left-out mass
    expected_other = (log_probs.exp() * ~kept).sum(-1) / 32
    torch.testing.assert_close(dense[~kept].view(5, 32).exp(), expected_other[:, None].expand(5, 32))
    # keeping every token reproduces the distribution exactly
    full = dense_from_top_k(*top_k_target(log_probs, 39), 40)
    assert (full - log_probs).abs().max() < 1e-6


def cached_loss_and_grads(student, target, top_k: int, **settings):
    """ζ against the target's top-k cache (formed as the cache stage forms it: last normalised state, head)."""
    from hsconv.distill.loss import TopKTarget, top_k_target

    input_ids, mask = batch()
    with torch.no_grad():
        hidden = decoder_states(target, input_ids, mask)["states"][-1]
        log_probs = torch.log_softmax(target.get_output_embeddings()(hidden), dim=-1)
    cached = TopKTarget(*top_k_target(log_probs, top_k))
    student.zero_grad()
    result = decoder_states(student, input_ids, mask)
    pre_norm = result["states"][:-1] + [result["pre_norm_last"]]
    terms = self_distillation_loss(pre_norm, final_norm_module(student), student.get_output_embeddings(), cached,
                                   mask, **settings)
    terms.total.backward()
    return terms, {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}, cached


@pytest.mark.parametrize("direction", ["student_target", "target_student"])
def test_cached_target_with_one_token_in_the_bucket_is_the_exact_loss(direction):
    """k = V − 1: the folded bucket holds one token, so the folded KL is the KL, and ζ and every gradient equal the
    recomputed target's."""
    student, target = make_pair(tied=False)
    vocab = target.get_output_embeddings().weight.shape[0]
    settings = dict(alpha=0.7, k=0.25, direction=direction, chunk_tokens=4)
    exact, exact_grads = loss_and_grads(self_distillation_loss, student, target, **settings)
    cached, cached_grads, _ = cached_loss_and_grads(student, target, vocab - 1, **settings)
    torch.testing.assert_close(cached.kl, exact.kl, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cached.total, exact.total, rtol=1e-9, atol=1e-12)
    for name, gradient in exact_grads.items():
        torch.testing.assert_close(cached_grads[name], gradient, rtol=1e-7, atol=1e-12, msg=name)


@pytest.mark.parametrize("direction", ["student_target", "target_student"])
def test_cached_top_k_loss_equals_autograd_of_the_folded_kl(direction):
    """k = 5 of 256: the closed-form folded KL and its gradient against plain autograd through the materialised
    log-softmax of every exit (float64), and below the exact loss only by what the folding loses."""
    from hsconv.distill.loss import folded_kl

    student, target = make_pair(tied=True)
    settings = dict(alpha=0.0, k=0.25, direction=direction, chunk_tokens=5)
    terms, grads, cached = cached_loss_and_grads(student, target, 5, **settings)

    input_ids, mask = batch()
    student.zero_grad()
    result = decoder_states(student, input_ids, mask)
    norm, head = final_norm_module(student), student.get_output_embeddings()
    states = result["states"][:-1] + [result["pre_norm_last"]]
    selected = cached.select(mask.bool())
    kl = torch.stack([folded_kl(torch.log_softmax(head(norm(state[mask.bool()])), -1), selected, direction).mean()
                      for state in states])
    zeta1 = (layer_weights(3, 0.25) * kl).sum()
    zeta1.backward()
    torch.testing.assert_close(terms.kl, kl.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(terms.zeta1, zeta1.detach(), rtol=1e-9, atol=1e-12)
    for name, parameter in student.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(grads[name], parameter.grad, rtol=1e-7, atol=1e-12, msg=name)
    # Folding never raises a KL (the data-processing inequality), and here it lowers every exit's.
    exact, _ = loss_and_grads(self_distillation_loss, student, target, **settings)
    assert torch.all(terms.kl < exact.kl)


def test_the_target_is_one_teacher_object():
    """The frozen model comes as one object, recomputed or cached; its parts loose (the old calling convention) are
    refused with a message that names both kinds."""
    student, target = make_pair(tied=True)
    input_ids, mask = batch()
    states = decoder_states(student, input_ids, mask)
    pre_norm = states["states"][:-1] + [states["pre_norm_last"]]
    with pytest.raises(TypeError, match="RecomputedTarget or a TopKTarget, not Tensor"):
        self_distillation_loss(pre_norm, final_norm_module(student), student.get_output_embeddings(),
                               states["states"][-1], mask, alpha=1.0, k=0.25)


def test_keep_last_sampling_always_computes_the_output_exit_at_its_own_weight():
    from hsconv.distill.loss import sample_exits

    weights = layer_weights(30, k=0.25)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        chosen, coefficients = sample_exits(weights, 4, "uniform_keep_last", generator)
        assert chosen[-1] == 30 and coefficients[-1] == weights[-1] and len(set(chosen.tolist())) == 4
        torch.testing.assert_close(coefficients[:-1], weights[chosen[:-1]] * 30 / 3)
    with pytest.raises(ValueError, match="needs exit_samples >= 2"):
        sample_exits(weights, 1, "uniform_keep_last", generator)


def test_exit_strata_cover_every_exit_once_in_contiguous_bands_of_about_equal_weight():
    from hsconv.distill.loss import exit_strata

    weights = layer_weights(30, k=0.25)[:-1]
    for bands in (1, 2, 3, 5, 7, 30, 40):
        strata = exit_strata(weights, bands)
        assert len(strata) == min(bands, 30) and all(len(band) >= 1 for band in strata)
        assert torch.cat(strata).tolist() == list(range(30))
        share = float(weights.sum()) / len(strata)
        # a band holds more than a share only where one exit alone does (the cut cannot split an exit)
        for band in strata:
            assert float(weights[band].sum()) <= share + float(weights[band].max()) + 1e-12
    # k = 0.25 puts the weight on the late exits: they get bands of their own, the early ones share one
    assert [len(band) for band in exit_strata(weights, 3)] == [26, 3, 1]


@pytest.mark.parametrize("scheme", ["uniform", "weighted", "uniform_keep_last", "stratified_keep_last"])
def test_every_scheme_draws_what_its_definition_says_and_averages_to_the_full_loss_exactly(scheme):
    """studies.exit_estimators enumerates each scheme's draws from its definition: the probabilities sum to 1, the
    mean estimate is Σ w_l KL_l exactly, and the sampler's draws come with those frequencies and coefficients."""
    from collections import Counter

    from studies.exit_estimators import draw_distribution, estimate_moments
    from hsconv.distill.loss import sample_exits

    weights = layer_weights(6, k=0.5)
    kl = torch.tensor([5.0, 4.0, 3.2, 2.0, 1.1, 0.6, 0.3], dtype=torch.float64)
    moments = estimate_moments(scheme, weights, kl, samples=3)
    assert moments["total_probability"] == pytest.approx(1.0, abs=1e-12)
    assert moments["mean"] == pytest.approx(moments["full_zeta1"], rel=1e-12) and moments["std"] > 0
    expected = {tuple(sorted(c.items())): p for p, c in draw_distribution(scheme, weights, 3)}
    generator, draws = torch.Generator().manual_seed(1), 20000
    counts = Counter()
    for _ in range(draws):
        chosen, coefficients = sample_exits(weights, 3, scheme, generator)
        counts[tuple(zip(chosen.tolist(), [round(c, 12) for c in coefficients.tolist()]))] += 1
    expected = {tuple((l, round(c, 12)) for l, c in key): p for key, p in expected.items()}
    assert set(counts) <= set(expected), set(counts) - set(expected)
    for outcome, probability in expected.items():
        spread = math.sqrt(draws * probability * (1 - probability))
        assert abs(counts[outcome] - draws * probability) < 5 * spread + 1, (outcome, counts[outcome], probability)


def test_stratified_sampling_spreads_less_than_uniform_on_a_falling_kl_profile():
    """On a KL profile like SmolLM2's (large at the shallow exits, falling towards the output) the stratified draw's
    exact spread is a fraction of the uniform keep-last one's: the heavy late exits are no longer left to chance."""
    from studies.exit_estimators import estimate_moments
    from hsconv.distill.loss import sample_exits

    weights = layer_weights(30, k=0.25)
    layers = torch.arange(31, dtype=torch.float64)
    kl = 9.0 * torch.exp(-layers / 10) + 0.3
    spread = {scheme: estimate_moments(scheme, weights, kl, samples=4)["std"]
              for scheme in ("uniform_keep_last", "stratified_keep_last")}
    assert spread["stratified_keep_last"] < 0.5 * spread["uniform_keep_last"], spread
    # one exit per band, the heavy ones every time, each weighted by its band's weight
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        chosen, coefficients = sample_exits(weights, 4, "stratified_keep_last", generator)
        assert chosen.tolist() == sorted(chosen.tolist()) and chosen[-2:].tolist() == [29, 30]
        assert 0 <= chosen[0] <= 25 and 26 <= chosen[1] <= 28
        torch.testing.assert_close(coefficients, torch.stack([weights[:26].sum(), weights[26:29].sum(),
                                                              weights[29], weights[30]]))
        seen.add(int(chosen[0]))
    assert len(seen) > 10  # the light early band really is sampled
    with pytest.raises(ValueError, match="needs exit_samples >= 2"):
        sample_exits(weights, 1, "stratified_keep_last", generator)


@pytest.mark.parametrize("direction", ["student_target", "target_student"])
def test_output_kl_weight_adds_beta_times_the_output_exits_kl(direction):
    """ζ1 + β KL_L: the fused loss equals the float64 reference with the term (values and gradients), and differs
    from the paper's loss by exactly β KL_L, in ζ1 and in the total, with the per-exit KLs unchanged."""
    student, target = make_pair(tied=True)
    settings = dict(alpha=0.7, k=0.25, direction=direction, movement_convention="pre_norm")
    expected, expected_grads = loss_and_grads(reference_loss, student, target, output_kl_weight=2.5, **settings)
    fused, fused_grads = loss_and_grads(self_distillation_loss, student, target, chunk_tokens=4,
                                        output_kl_weight=2.5, **settings)
    for name in ("total", "zeta1", "zeta2", "kl"):
        torch.testing.assert_close(getattr(fused, name).double(), getattr(expected, name).double(), rtol=1e-5,
                                   atol=1e-12, msg=name)
    for name, gradient in expected_grads.items():
        torch.testing.assert_close(fused_grads[name], gradient, rtol=1e-5, atol=1e-10, msg=name)
    paper, paper_grads = loss_and_grads(self_distillation_loss, student, target, chunk_tokens=4, **settings)
    assert paper.kl[-1] > 0
    torch.testing.assert_close(fused.zeta1 - paper.zeta1, 2.5 * paper.kl[-1], rtol=1e-10, atol=0)
    torch.testing.assert_close(fused.total - paper.total, 2.5 * paper.kl[-1], rtol=1e-10, atol=0)
    torch.testing.assert_close(fused.kl, paper.kl, rtol=1e-12, atol=0)
    assert any(not torch.allclose(fused_grads[name], paper_grads[name]) for name in paper_grads)


@pytest.mark.parametrize("scheme", ["uniform", "weighted", "uniform_keep_last", "stratified_keep_last"])
def test_output_kl_weight_with_sampled_exits_always_computes_the_output_exit_and_stays_unbiased(scheme):
    """Every draw computes the output exit (appended when the draw left it out) with β on top of its sampled
    coefficient, so that E[Σ coefficient_l KL_l] = Σ w_l KL_l + β KL_L: checked exactly over per-exit KLs."""
    from hsconv.distill.loss import sample_exits, with_output_anchor

    weights = layer_weights(5, k=0.25)
    kl = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.2], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    draws, estimates, appended = 20000, [], 0
    for _ in range(draws):
        drawn, drawn_coefficients = sample_exits(weights, 2, scheme, generator)
        chosen, coefficients = with_output_anchor(drawn, drawn_coefficients, 5, 0.75)
        assert chosen[-1] == 5 and len(set(chosen.tolist())) == len(chosen)
        appended += int(5 not in drawn.tolist())
        estimates.append(float((coefficients * kl[chosen]).sum()))
    estimates = torch.tensor(estimates, dtype=torch.float64)
    expected = float((weights * kl).sum() + 0.75 * kl[-1])
    z = (estimates.mean() - expected) / (estimates.std() / math.sqrt(draws))
    assert abs(z) < 4, f"mean {estimates.mean():.5f} vs {expected:.5f} (z = {z:.2f})"
    assert scheme.endswith("keep_last") or appended > 0  # the append path was exercised
    every, every_coefficients = with_output_anchor(*sample_exits(weights, None), 5, 0.75)
    assert every.tolist() == list(range(6))
    torch.testing.assert_close(every_coefficients, torch.cat([weights[:-1], weights[-1:] + 0.75]))
    assert with_output_anchor(*sample_exits(weights, None), 5, 0.0)[1].equal(weights)


@pytest.fixture
def compiled_kernels(monkeypatch):
    """Every chunk through the compiled kernels (a test model's are below the size that compiles); yields the count
    of their calls, so that a test can tell they ran."""
    import hsconv.distill.loss as loss

    calls = {"count": 0}
    compiled = dict(loss._COMPILED)

    def counted(kernel):
        def call(*args):
            calls["count"] += 1
            return compiled[kernel](*args)
        return call

    monkeypatch.setattr(loss, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(loss, "_COMPILED", {kernel: counted(kernel) for kernel in compiled})
    yield calls
    assert not loss._compile_failed, "torch.compile failed: the eager kernels ran instead"


@pytest.mark.parametrize("direction", ["student_target", "target_student"])
def test_compiled_kernels_equal_the_float64_reference(direction, compiled_kernels):
    student, target = make_pair(tied=False)
    settings = dict(alpha=0.7, k=0.25, direction=direction, movement_convention="pre_norm")
    expected, expected_grads = loss_and_grads(reference_loss, student, target, **settings)
    fused, fused_grads = loss_and_grads(self_distillation_loss, student, target, chunk_tokens=4, **settings)
    assert compiled_kernels["count"] == 5 * (1 + 4)  # 5 chunks: the teacher's, and each of the 4 exits'
    for name in ("total", "zeta1", "kl"):
        torch.testing.assert_close(getattr(fused, name), getattr(expected, name), rtol=1e-5, atol=1e-12, msg=name)
    for name, gradient in expected_grads.items():
        torch.testing.assert_close(fused_grads[name], gradient, rtol=1e-5, atol=1e-10, msg=name)


def test_compiled_kernels_in_bf16_match_the_eager_ones_within_bf16_rounding(compiled_kernels):
    """The trainer's case: a bf16 student; the kernels take bf16 logits and give bf16 gradients, computing in float32."""
    student, target = make_pair(tied=True)
    student, target = student.bfloat16(), target.bfloat16()
    settings = dict(alpha=0.0, k=0.25, chunk_tokens=8)  # ζ1 alone: the gradients the kernels make
    compiled, compiled_grads = loss_and_grads(self_distillation_loss, student, target, **settings)
    assert compiled_kernels["count"] > 0
    import hsconv.distill.loss as loss

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loss, "COMPILE_MIN_ELEMENTS", 1 << 62)
        eager, eager_grads = loss_and_grads(self_distillation_loss, student, target, **settings)
    # bf16 rounds to 2^-8 relative: the two kernels' results may differ by that much and no more
    torch.testing.assert_close(compiled.total.detach(), eager.total.detach(), rtol=4e-3, atol=0)
    for name, gradient in eager_grads.items():
        error = (compiled_grads[name].float() - gradient.float()).norm() / gradient.float().norm().clamp_min(1e-30)
        assert error <= 1e-2, name
