"""The self-distillation loss ζ = ζ1 + α ζ2 (paper eqs. 3–6), computed without all layers' vocabulary logits.

ζ1 = Σ_{l=0..L} w_l KL_l, the logit-lens distribution of every layer against the frozen model's output;
ζ2 = Σ_{l=1..L} w_l ‖h_l − h_{l−1}‖² / ‖h_{l−1}‖², the step between adjacent hidden states; w = softmax(k·l).
(``zeta2_measure: cosine_distance`` puts the scale-free 1 − cos(h_{l−1}, h_l) in place of the relative step;
``zeta2_penalty: rise`` penalises only Σ_{l=2..L} w_l max(0, s_l − s_{l−1}), a step larger than the one before it;
``output_kl_weight`` β adds β KL_L to ζ1, the output exit weighed again outside the layer weights.)
Both per-token quantities are averaged over the real (unpadded) tokens.

The naive ζ1 materialises (L+1) × tokens × vocabulary logits plus their softmax and gradients: 24 GB for SmolLM2 at
B=4, T=256. :class:`FusedLogitLensKL` instead walks over chunks of tokens and, inside a chunk, over layers; for
each (chunk, layer) it forms the logits, the KL and its gradient with respect to the logits in closed form, and
immediately turns that into the gradients of the normalised hidden state and of the head weight. Only one chunk's
logits exist at a time, so the loss's peak memory depends on the chunk size, not on L; the head is multiplied
three times per (chunk, layer), as autograd would, with no recomputation.

:func:`reference_loss` is the plain autograd version (every logit materialised), kept as the reference the tests
and the benchmark compare against.

The target can also come from a cache (:mod:`hsconv.distill.teacher`): the frozen model's k largest log-probabilities
per token and the log of the mass left over. KL is then taken between the two distributions folded onto k + 1
outcomes (the cached tokens and one bucket for all others), in closed form with its gradient, like the dense one.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hsconv.readout import cap_logits
from hsconv.settings import (  # noqa: F401 (re-exported)
    EXIT_SAMPLING, KEEP_LAST_SAMPLING, KL_DIRECTIONS, MOVEMENT_CONVENTIONS, ZETA2_MEASURES, ZETA2_PENALTIES,
    check_settings)



def layer_weights(num_layers: int, k: float, dtype=torch.float64) -> torch.Tensor:
    """w_l = exp(k·l) / Σ_{i=0..L} exp(k·i) for l = 0..L (eq. 6); a softmax, so stable for large k."""
    return torch.softmax(k * torch.arange(num_layers + 1, dtype=torch.float64), dim=0).to(dtype)


def sample_exits(weights: torch.Tensor, samples: int | None, scheme: str = "uniform",
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exits ζ1 is computed on, and their coefficients, such that E[Σ coeff_l KL_l] = Σ_l w_l KL_l.

    ``samples`` None (or ≥ L+1): every exit with coefficient w_l, the exact loss. ``uniform``: m distinct exits drawn
    without replacement, each included with probability m/(L+1), coefficient w_l·(L+1)/m. ``weighted``: m draws with
    replacement, p_l = w_l, each draw contributing w_l/(m·p_l) = 1/m (an exit drawn c times: c/m).
    ``uniform_keep_last``: the output exit L every time, with its own w_L (the term that holds the model's output to
    the target is then never missing nor inflated), and m − 1 of the exits 0..L−1 drawn uniformly without
    replacement, coefficient w_l·L/(m − 1) (m = 1: the output exit alone would be biased, so it needs m ≥ 2).
    ``stratified_keep_last``: the output exit every time at its own w_L, and one exit from each of m − 1 contiguous
    bands of 0..L−1 that hold equal shares of the weight (:func:`exit_strata`), drawn with probability w_l / W_band
    and weighted W_band: an exit heavier than a share is a band of its own, so the heavy late exits are always
    computed and the light early ones are sampled, and the estimate's spread is only the KL's within each band.
    """
    exits = weights.shape[0]
    if samples is None or samples >= exits:
        return torch.arange(exits), weights
    if scheme not in EXIT_SAMPLING:
        raise ValueError(f"exit_sampling {scheme!r} is not one of {', '.join(EXIT_SAMPLING)}")
    if scheme in KEEP_LAST_SAMPLING and samples < 2:
        raise ValueError(f"exit_sampling {scheme} needs exit_samples >= 2 (the output exit and at least one other)")
    if scheme == "uniform":
        chosen = torch.randperm(exits, generator=generator)[:samples].sort().values
        return chosen, weights[chosen] * (exits / samples)
    if scheme == "uniform_keep_last":
        others = torch.randperm(exits - 1, generator=generator)[:samples - 1].sort().values
        coefficients = torch.cat([weights[others] * ((exits - 1) / (samples - 1)), weights[-1:]])
        return torch.cat([others, torch.tensor([exits - 1])]), coefficients
    if scheme == "stratified_keep_last":
        others, coefficients = [], []
        for band in exit_strata(weights[:-1], samples - 1):
            band_weights = weights[band].double().cpu()
            pick = torch.multinomial(band_weights, 1, generator=generator)
            others.append(band[pick])
            coefficients.append(weights[band].sum().reshape(1))
        return torch.cat([*others, torch.tensor([exits - 1])]), torch.cat([*coefficients, weights[-1:]])
    draws = torch.multinomial(weights.double().cpu(), samples, replacement=True, generator=generator)
    chosen, counts = torch.unique(draws, return_counts=True)
    return chosen, (counts.double() / samples).to(weights)


def exit_strata(weights: torch.Tensor, bands: int) -> list[torch.Tensor]:
    """``bands`` contiguous runs of exit indices, each with at least one exit, cut where the cumulative weight passes
    1/bands, 2/bands, ... of the total (a deterministic function of the weights, so every rank and a resumed run
    cut the same)."""
    exits = weights.shape[0]
    bands = min(bands, exits)
    cumulative = torch.cumsum(weights.double().cpu(), 0)
    cuts, previous = [], 0
    for band in range(1, bands):
        cut = int(torch.searchsorted(cumulative, cumulative[-1] * band / bands)) + 1
        cut = min(max(cut, previous + 1), exits - (bands - band))
        cuts.append(cut)
        previous = cut
    edges = [0, *cuts, exits]
    return [torch.arange(start, end) for start, end in itertools.pairwise(edges)]


def with_output_anchor(chosen: torch.Tensor, coefficients: torch.Tensor, output_exit: int,
                       output_kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The exits and coefficients of ζ1 + β KL_L: β added to the output exit's coefficient, the exit appended (last,
    where the loss expects it) when the draw left it out."""
    if output_kl_weight == 0:
        return chosen, coefficients
    if int(chosen[-1]) != output_exit:
        chosen = torch.cat([chosen, torch.tensor([output_exit])])
        coefficients = torch.cat([coefficients, coefficients.new_zeros(1)])
    coefficients = coefficients.clone()
    coefficients[-1] += output_kl_weight
    return chosen, coefficients


@dataclass
class LossTerms:
    """ζ and its parts; ``kl`` (L+1 values, NaN at exits not sampled) and ``step`` (L values, layer 1..L) are
    detached, for logging. With exit sampling ``zeta1`` is the unbiased estimate, not the full sum."""

    total: torch.Tensor
    zeta1: torch.Tensor
    zeta2: torch.Tensor
    kl: torch.Tensor
    step: torch.Tensor
    tokens: int
    exits: list[int] | None = None  # the exits ζ1 was computed on; None: all


def top_k_target(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a teacher cache keeps per token: the k largest log-probabilities, their token ids, and the log of the
    probability mass left over (floored at float32's smallest normal number, so that it stays finite)."""
    values, ids = torch.topk(log_probs, k, dim=-1)
    # log Σ over the other tokens directly: 1 − Σ top-k cancels catastrophically when the top k hold nearly all.
    rest = torch.logsumexp(log_probs.scatter(-1, ids, float("-inf")), dim=-1)
    return values, ids, rest.clamp_min(math.log(torch.finfo(torch.float32).tiny))


@dataclass
class TopKTarget:
    """A cached teacher for a batch: the k largest log-probabilities per token (…, k), their token ids (…, k) and
    the log of the mass over all other tokens (…)."""

    values: torch.Tensor
    ids: torch.Tensor
    rest: torch.Tensor

    def select(self, mask: torch.Tensor) -> TopKTarget:
        mask = mask.to(self.values.device)
        return TopKTarget(self.values[mask], self.ids[mask], self.rest[mask])

    def chunk(self, start: int, stop: int, direction: str, compute: torch.dtype, softcap: float | None,
              compile_kernels: bool | None = None):
        """Tokens start..stop as the fused kernel reads them, and the KL (and logit gradient) against them."""
        return ({"ids": self.ids[start:stop], "logp_top": self.values[start:stop].to(compute),
                 "log_rest": self.rest[start:stop].to(compute)}, _folded_kl_and_logit_grad)


@dataclass
class RecomputedTarget:
    """The frozen model as the teacher, exactly: its last normalised state (…, d) and its head, from which q_target is
    formed one chunk of tokens at a time (never for every token at once)."""

    hidden: torch.Tensor
    head: torch.nn.Module

    def select(self, mask: torch.Tensor) -> RecomputedTarget:
        return RecomputedTarget(self.hidden[mask].detach(), self.head)

    def chunk(self, start: int, stop: int, direction: str, compute: torch.dtype, softcap: float | None,
              compile_kernels: bool | None = None):
        """:meth:`TopKTarget.chunk` for the recomputed teacher: the chunk's log p (and p, Σ p log p)."""
        bias = None if self.head.bias is None else self.head.bias.detach()
        logits = F.linear(self.hidden[start:stop], self.head.weight.detach(), bias)
        if softcap is None and _compiles(logits, compile_kernels):
            return _compiled_or_eager(_target_chunk, _target_chunk, logits, direction, compute), _kl_and_logit_grad
        return _target_chunk(cap_logits(logits.to(compute), softcap), direction, compute), _kl_and_logit_grad


# The teacher of ζ1: the frozen model recomputed each step, or its top-k read from a cache.
Target = RecomputedTarget | TopKTarget


def folded_kl(log_q: torch.Tensor, target: TopKTarget, direction: str) -> torch.Tensor:
    """KL between the student's distribution and the cached teacher's, both folded onto the teacher's k tokens plus
    one bucket for the rest: the plain autograd version (a reference for the fused kernel, and for benchmarks)."""
    q_top = log_q.gather(-1, target.ids)
    q_rest = torch.logsumexp(log_q.scatter(-1, target.ids, float("-inf")), dim=-1)
    student = torch.cat([q_top, q_rest.unsqueeze(-1)], dim=-1)
    teacher = torch.cat([target.values, target.rest.unsqueeze(-1)], dim=-1).to(student.dtype)
    first, second = (student, teacher) if direction == "student_target" else (teacher, student)
    return (first.exp() * (first - second)).sum(-1)


def dense_from_top_k(values: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor, vocab: int) -> torch.Tensor:
    """The full log-distribution a top-k cache stands for: the kept entries as they were, the left-over mass
    spread evenly over the other V − k tokens (one bucket), so that it sums to one."""
    other = rest - math.log(vocab - values.shape[-1])
    dense = other.unsqueeze(-1).expand(*values.shape[:-1], vocab).clone()
    return dense.scatter_(-1, ids, values)


# The fused kernel's vocabulary-sized arithmetic outside the head products (log-softmax, KL, its gradient, the scale
# and the cast) is five or six passes over a tokens × vocabulary buffer in eager mode; compiled, one or two: 15 ms
# instead of 72 ms per exit and 256 tokens of SmolLM2 in bf16 on a 2-core AMX Xeon (2026-12-08; the step's profile in
# BENCHMARKS.md shows what it did to the exit heads' phase). Compiling costs ~15 s once per process and shape, so
# by default (``compile_kernels`` None, distill's ``compile: auto``) only buffers at least this large use it (a test
# model's never do); ``TORCHDYNAMO_DISABLE=1`` turns it off, and where compiling fails the eager kernels are used from
# then on. A cached (top-k) teacher's folded kernel stays eager.
COMPILE_MIN_ELEMENTS = 1 << 22
_compile_failed = False


def use_compile(mode: str, chunk_tokens: int, vocab: int) -> bool:
    """Whether distillation's ``compile`` setting (auto, always, never) compiles at this chunk and vocabulary size."""
    return mode == "always" or (mode == "auto" and chunk_tokens * vocab >= COMPILE_MIN_ELEMENTS)


def _compiles(logits: torch.Tensor, compile_kernels: bool | None) -> bool:
    """``compile_kernels`` None: by the buffer's size."""
    wanted = logits.numel() >= COMPILE_MIN_ELEMENTS if compile_kernels is None else compile_kernels
    return wanted and not _compile_failed


def _exit_kl_and_scaled_grad(student_logits: torch.Tensor, target: dict, direction: str, scale: torch.Tensor,
                             compute: torch.dtype, out_dtype: torch.dtype):
    """:func:`_kl_and_logit_grad` followed by the exit's coefficient and the cast to the head's dtype, written as one
    expression for ``torch.compile`` to fuse (the eager in-place version is the reference it is tested against)."""
    logq = torch.log_softmax(student_logits.to(compute), dim=-1)
    q = logq.exp()
    if direction == "target_student":
        kl = target["neg_entropy"] - (target["p"] * logq).sum(-1)
        grad = q - target["p"]
    else:
        log_ratio = logq - target["logp"]
        kl = (q * log_ratio).sum(-1)
        grad = q * (log_ratio - kl.unsqueeze(-1))
    return kl, (grad * scale).to(out_dtype)


def _eager_exit_kl_and_scaled_grad(student_logits, target, direction, scale, compute, out_dtype, kl_and_grad=None,
                                   softcap=None):
    """The same in eager mode, in place, for any target's kernel (``kl_and_grad``, default the dense one) and
    through the family's softcap."""
    logits, slope = _capped_logits(student_logits.to(compute), softcap)
    kl, grad = (kl_and_grad or _kl_and_logit_grad)(logits, target, direction)
    if slope is not None:  # through the cap: d/dz c·tanh(z/c) = 1 − tanh²
        grad = grad.mul_(slope)
    return kl, grad.mul_(scale).to(out_dtype)


def _compiled_or_eager(kernel, eager, *args):
    """``kernel`` compiled, or where compiling fails (no C++ compiler, say) ``eager`` from then on."""
    global _compile_failed
    if _compile_failed:
        return eager(*args)
    try:
        return _COMPILED[kernel](*args)
    except Exception as error:  # noqa: BLE001 (torch.compile raises many kinds; any of them means: do not compile)
        _compile_failed = True
        warnings.warn(f"the fused loss runs eagerly: torch.compile failed ({type(error).__name__}: {error})",
                      RuntimeWarning, stacklevel=2)
        return eager(*args)


def _kl_and_logit_grad(student_logits: torch.Tensor, target: dict, direction: str):
    """Per-token KL and its gradient with respect to the student's logits, both in closed form.

    target_student = KL(q_target ‖ q_l) = Σ p (log p − log q):  ∂/∂z = q − p.
    student_target = KL(q_l ‖ q_target) = Σ q (log q − log p):  ∂/∂z = q ⊙ (log q − log p − KL).
    ``target`` holds the chunk's log p (and p, Σ p log p for target_student), shared by all layers. The logits are
    consumed: a chunk's vocabulary-sized buffers are reused in place, as they dominate the loss's time and memory.
    """
    logq = torch.log_softmax(student_logits, dim=-1)
    del student_logits
    if direction == "target_student":
        kl = target["neg_entropy"] - _rowwise_dot(target["p"], logq)
        return kl, logq.exp_().sub_(target["p"])
    q = logq.exp()
    log_ratio = logq.sub_(target["logp"])
    kl = _rowwise_dot(q, log_ratio)
    return kl, log_ratio.sub_(kl.unsqueeze(-1)).mul_(q)


def _folded_kl_and_logit_grad(student_logits: torch.Tensor, target: dict, direction: str):
    """:func:`_kl_and_logit_grad` against a cached top-k teacher, both distributions folded onto the k cached tokens
    and one bucket R for the others (Q_R, P_R: the student's and the teacher's mass there).

    student_target = Σ_k q log(q/p) + Q_R log(Q_R/P_R):  ∂/∂z = q ⊙ (r − KL), r = log(q/p) on the k, log(Q_R/P_R) off.
    target_student = Σ_k p log(p/q) + P_R log(P_R/Q_R):  ∂/∂z = q − p̂, p̂ = p on the k, q · P_R/Q_R off them.
    Q_R is a log-sum-exp over the other tokens, not 1 − Σ_k q, which cancels when the k hold nearly all the mass.
    """
    ids, logp_top, logp_rest = target["ids"], target["logp_top"], target["log_rest"]
    logq = torch.log_softmax(student_logits, dim=-1)
    del student_logits
    logq_top = logq.gather(-1, ids)
    floor = math.log(torch.finfo(logq.dtype).tiny)
    logq_rest = torch.logsumexp(logq.scatter(-1, ids, float("-inf")), dim=-1).clamp_min(floor)
    q = logq.exp_()
    if direction == "target_student":
        p_top = logp_top.exp()
        kl = (p_top * (logp_top - logq_top)).sum(-1) + logp_rest.exp() * (logp_rest - logq_rest)
        grad = q.mul_((1.0 - (logp_rest - logq_rest).exp()).unsqueeze(-1))
        return kl, grad.scatter_(-1, ids, logq_top.exp() - p_top)
    log_ratio = (logq_rest - logp_rest).unsqueeze(-1).expand_as(q).clone()
    log_ratio.scatter_(-1, ids, logq_top - logp_top)
    kl = _rowwise_dot(q, log_ratio)
    return kl, log_ratio.sub_(kl.unsqueeze(-1)).mul_(q)


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[t, v] b[t, v] without a vocabulary-sized temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _capped_logits(logits: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The family's output softcap c·tanh(z/c) and its slope 1 − tanh² (None: no cap, slope 1)."""
    if softcap is None:
        return logits, None
    capped = cap_logits(logits, softcap)
    return capped, 1.0 - (capped / softcap).square()


def _target_chunk(logits: torch.Tensor, direction: str, compute: torch.dtype) -> dict:
    logp = torch.log_softmax(logits.to(compute), dim=-1)
    if direction == "target_student":
        p = logp.exp()
        return {"p": p, "neg_entropy": _rowwise_dot(p, logp)}
    return {"logp": logp}


class FusedLogitLensKL(torch.autograd.Function):
    """Σ_l w_l · mean_t KL_l(t) over layers and tokens, with gradients computed in the forward, chunk by chunk.

    Inputs: ``normed`` (L+1, N, d): every layer's state after the final norm (the tokens already masked);
    ``head_weight`` (V, d) and ``head_bias`` (V or None); ``target``: the N tokens' teacher, a
    :class:`RecomputedTarget` (q_target formed one chunk at a time) or a :class:`TopKTarget` (KL folded onto its k).
    ``softcap``: the family's output cap on both models' logits (Gemma 2/3), None for none.
    ``compile_kernels``: the vocabulary-sized arithmetic compiled (True), eager (False), or by size (None).
    Returns ζ1 and the per-layer mean KL (not differentiable).
    """

    @staticmethod
    def forward(ctx, normed, head_weight, head_bias, weights, target: Target, direction, chunk_tokens, softcap=None,
                compile_kernels=None):
        layers, tokens, _ = normed.shape
        # Logits and softmax in float32 at least (bf16 logits lose the small probabilities KL depends on).
        compute = torch.promote_types(normed.dtype, torch.float32)
        need_weight_grad = ctx.needs_input_grad[1]
        need_bias_grad = head_bias is not None and ctx.needs_input_grad[2]
        grad_normed = torch.zeros_like(normed) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(head_weight.shape, dtype=compute, device=head_weight.device) \
            if need_weight_grad else None
        grad_bias = torch.zeros(head_bias.shape, dtype=compute, device=head_bias.device) if need_bias_grad else None
        kl_sums = torch.zeros(layers, dtype=torch.float64, device=normed.device)
        scale = weights.to(compute) / tokens
        for start in range(0, tokens, chunk_tokens):
            stop = min(start + chunk_tokens, tokens)
            chunk, kl_and_grad = target.chunk(start, stop, direction, compute, softcap, compile_kernels)
            for layer in range(layers):
                x = normed[layer, start:stop]
                logits = F.linear(x, head_weight, head_bias)
                if softcap is None and kl_and_grad is _kl_and_logit_grad and _compiles(logits, compile_kernels):
                    kl, grad_logits = _compiled_or_eager(
                        _exit_kl_and_scaled_grad, _eager_exit_kl_and_scaled_grad,
                        logits, chunk, direction, scale[layer], compute, head_weight.dtype)
                else:
                    kl, grad_logits = _eager_exit_kl_and_scaled_grad(logits, chunk, direction, scale[layer], compute,
                                                                     head_weight.dtype, kl_and_grad, softcap)
                del logits
                kl_sums[layer] += kl.sum().double()
                if grad_normed is not None:
                    grad_normed[layer, start:stop] = grad_logits @ head_weight
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.t().to(compute), x.to(compute))
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0).to(compute)
                del grad_logits
        kl_means = kl_sums / tokens
        ctx.save_for_backward(grad_normed, grad_weight, grad_bias)
        ctx.weight_dtype = head_weight.dtype
        ctx.has = (grad_normed is not None, grad_weight is not None, grad_bias is not None)
        ctx.mark_non_differentiable(kl_means)
        zeta1 = (weights.double() * kl_means).sum().to(compute)
        return zeta1, kl_means

    @staticmethod
    def backward(ctx, grad_zeta1, _grad_kl):
        grad_normed, grad_weight, grad_bias = ctx.saved_tensors
        has_normed, has_weight, has_bias = ctx.has
        g = grad_zeta1
        return (grad_normed * g.to(grad_normed.dtype) if has_normed else None,
                (grad_weight * g).to(ctx.weight_dtype) if has_weight else None,
                (grad_bias * g).to(ctx.weight_dtype) if has_bias else None,
                None, None, None, None, None, None)


def layer_steps(states: list[torch.Tensor], measure: str = "relative_step") -> torch.Tensor:
    """ζ2's step per layer l = 1..L, averaged over the (already masked) tokens; differentiable.
    ``relative_step``: ‖h_l − h_{l−1}‖² / ‖h_{l−1}‖² (eq. 5); ``cosine_distance``: 1 − cos(h_{l−1}, h_l)."""
    if measure not in ZETA2_MEASURES:
        raise ValueError(f"zeta2_measure {measure!r} is not one of {', '.join(ZETA2_MEASURES)}")
    steps = []
    compute = torch.promote_types(states[0].dtype, torch.float32)
    for previous, current in zip(states[:-1], states[1:]):
        previous, current = previous.to(compute), current.to(compute)
        if measure == "relative_step":
            step = (current - previous).pow(2).sum(-1) / previous.pow(2).sum(-1).clamp_min(1e-12)
        else:
            step = 1.0 - F.cosine_similarity(previous, current, dim=-1, eps=1e-12)
        steps.append(step.mean())
    return torch.stack(steps)


def hidden_state_penalty(step: torch.Tensor, weights: torch.Tensor, penalty: str = "step") -> torch.Tensor:
    """ζ2 from the per-layer steps s_1..s_L (each a mean over the batch's tokens) and the layer weights w_0..w_L.

    ``step``: Σ_{l=1..L} w_l s_l (eq. 5), every step pulled down. ``rise``: Σ_{l=2..L} w_l max(0, s_l − s_{l−1}),
    only where a step is larger than the one before it: the batch's own count of what S_model holds against a model
    (its rises between layers' mean movements), which leaves a large step alone as long as the next ones shrink.
    """
    if penalty not in ZETA2_PENALTIES:
        raise ValueError(f"zeta2_penalty {penalty!r} is not one of {', '.join(ZETA2_PENALTIES)}")
    weights = weights.to(step.dtype)
    if penalty == "step":
        return (weights[1:] * step).sum()
    return (weights[2:] * (step[1:] - step[:-1]).clamp_min(0.0)).sum()


def self_distillation_loss(pre_norm_states: list[torch.Tensor], final_norm: torch.nn.Module,
                           head: torch.nn.Linear, target: Target, mask: torch.Tensor, alpha: float, k: float,
                           direction: str = "student_target", movement_convention: str = "hf",
                           chunk_tokens: int = 256, exit_samples: int | None = None, exit_sampling: str = "uniform",
                           generator: torch.Generator | None = None, softcap: float | None = None,
                           zeta2_measure: str = "relative_step", output_kl_weight: float = 0.0,
                           zeta2_penalty: str = "step", compile_kernels: bool | None = None) -> LossTerms:
    """ζ for one batch.

    ``pre_norm_states``: h_0..h_L of the student, all before the final norm (B, T, d each); ``target``: the frozen
    model, a :class:`RecomputedTarget` (its last state after its final norm, (B, T, d), and its head) or a
    :class:`TopKTarget` (B, T, k) read from a teacher cache, against which ζ1 is folded (see :func:`folded_kl`);
    ``mask`` (B, T): the real tokens.
    ``movement_convention`` chooses h_L in ζ2: after the final norm (``hf``, as ``output_hidden_states`` gives it)
    or before it. q_L is always LMHead(FinalNorm(pre-norm h_L)): the final norm is never applied twice.
    ``exit_samples``/``exit_sampling``: ζ1 on a random subset of the exits (:func:`sample_exits`); ζ2 stays exact.
    ``softcap``: the family's output-logit cap (:class:`hsconv.readout.Readout`), applied to both models.
    ``output_kl_weight`` β: ζ1 + β KL_L, the output exit computed in every step (sampled or not), its coefficient
    raised by β; the sampled exits' estimate stays unbiased for the full ζ1 + β KL_L.
    ``compile_kernels``: see :class:`FusedLogitLensKL` (the trainer resolves its ``compile`` setting with
    :func:`use_compile`).
    """
    check_settings(direction, movement_convention)
    num_layers = len(pre_norm_states) - 1
    if not isinstance(target, (RecomputedTarget, TopKTarget)):
        raise TypeError(f"the target is a RecomputedTarget or a TopKTarget, not {type(target).__name__}")
    device = pre_norm_states[0].device
    weights = layer_weights(num_layers, k, dtype=torch.float64).to(device)
    mask = mask.bool()
    tokens = int(mask.sum())
    if tokens == 0:
        raise ValueError("the batch has no real tokens (every position is padding)")
    chosen, coefficients = with_output_anchor(*sample_exits(weights, exit_samples, exit_sampling, generator),
                                              num_layers, output_kl_weight)
    normed = torch.stack([final_norm(pre_norm_states[layer][mask]) for layer in chosen.tolist()])
    zeta1, chosen_kl = FusedLogitLensKL.apply(normed, head.weight, head.bias, coefficients.to(device),
                                              target.select(mask), direction, chunk_tokens, softcap,
                                              compile_kernels)
    kl = torch.full((num_layers + 1,), float("nan"), dtype=chosen_kl.dtype, device=chosen_kl.device)
    kl[chosen.to(kl.device)] = chosen_kl
    if movement_convention == "hf":
        last = normed[-1] if chosen[-1] == num_layers else final_norm(pre_norm_states[-1][mask])
    else:
        last = pre_norm_states[-1][mask]
    step = layer_steps([state[mask] for state in pre_norm_states[:-1]] + [last], zeta2_measure)
    zeta2 = hidden_state_penalty(step, weights, zeta2_penalty)
    total = zeta1 + alpha * zeta2
    return LossTerms(total=total, zeta1=zeta1, zeta2=zeta2, kl=kl.detach(), step=step.detach(), tokens=tokens,
                     exits=chosen.tolist())


def reference_loss(pre_norm_states: list[torch.Tensor], final_norm: torch.nn.Module, head: torch.nn.Linear,
                   target: RecomputedTarget, mask: torch.Tensor, alpha: float,
                   k: float, direction: str = "student_target", movement_convention: str = "hf",
                   softcap: float | None = None, zeta2_measure: str = "relative_step",
                   output_kl_weight: float = 0.0, zeta2_penalty: str = "step") -> LossTerms:
    """ζ the plain way: every layer's logits materialised at once, gradients by autograd. For tests and the
    benchmark's naive baseline; run it in float64 for an independent check of :func:`self_distillation_loss`."""
    check_settings(direction, movement_convention)
    num_layers = len(pre_norm_states) - 1
    mask = mask.bool()
    weights = layer_weights(num_layers, k, dtype=pre_norm_states[0].dtype).to(mask.device)
    normed = [final_norm(state) for state in pre_norm_states]
    logq = torch.log_softmax(cap_logits(torch.stack([head(state) for state in normed]), softcap), dim=-1)  # (L+1,B,T,V)
    logp = torch.log_softmax(cap_logits(target.head(target.hidden), softcap), dim=-1).unsqueeze(0)
    if direction == "target_student":
        per_token = (logp.exp() * (logp - logq)).sum(-1)
    else:
        per_token = (logq.exp() * (logq - logp)).sum(-1)
    kl = per_token[:, mask].mean(-1)
    zeta1 = (weights * kl).sum() + output_kl_weight * kl[-1]
    states = list(pre_norm_states)
    if movement_convention == "hf":
        states[-1] = normed[-1]
    step = layer_steps([state[mask] for state in states], zeta2_measure)
    zeta2 = hidden_state_penalty(step.to(weights.dtype), weights, zeta2_penalty)
    return LossTerms(total=zeta1 + alpha * zeta2, zeta1=zeta1, zeta2=zeta2, kl=kl.detach(), step=step.detach(),
                     tokens=int(mask.sum()))


# Compiled lazily, at a kernel's first call (torch.compile only wraps here).
_COMPILED = {kernel: torch.compile(kernel, dynamic=None) for kernel in (_exit_kl_and_scaled_grad, _target_chunk)}
