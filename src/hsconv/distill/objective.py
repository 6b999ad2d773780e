"""The module DeepSpeed trains: the student plus a frozen target, mapping a batch of token ids to ζ.

The target (the frozen pretrained model) is held outside the module's registered children, so DeepSpeed neither
optimises, casts nor partitions it; it runs without autograd and only its last normalised state is kept, from
which the loss forms q_target one chunk of tokens at a time. With a teacher cache (``teacher_top_k``) there is no
target model at all: the batch's cached top-k distribution is passed in instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsconv.distill.loss import (EXIT_SAMPLING, LossTerms, TopKTarget, check_settings, reference_loss,
                                 self_distillation_loss)
from hsconv.hidden_states import decoder_states, final_norm_module, lens_states

LOSS_IMPLEMENTATIONS = ("fused", "reference")


@dataclass(frozen=True)
class LossSettings:
    alpha: float = 1.0
    k: float = 0.25
    kl_direction: str = "student_target"
    movement_convention: str = "hf"
    chunk_tokens: int = 256
    implementation: str = "fused"
    exit_samples: int | None = None  # ζ1 on this many exits per forward pass (None: all, the exact loss)
    exit_sampling: str = "uniform"
    # The frozen model's distribution read from a cache of its k most likely tokens per position (written once by
    # `hsconv cache-teacher`), KL folded onto those k and one bucket; None: recomputed exactly in every step.
    teacher_top_k: int | None = None

    def __post_init__(self):
        check_settings(self.kl_direction, self.movement_convention)
        if self.implementation not in LOSS_IMPLEMENTATIONS:
            raise ValueError(f"loss implementation {self.implementation!r} is not one of "
                             f"{', '.join(LOSS_IMPLEMENTATIONS)}")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        if self.exit_samples is not None and self.exit_samples < 1:
            raise ValueError(f"exit_samples must be at least 1 (or null for every exit), got {self.exit_samples}")
        if self.exit_sampling not in EXIT_SAMPLING:
            raise ValueError(f"exit_sampling {self.exit_sampling!r} is not one of {', '.join(EXIT_SAMPLING)}")
        if self.exit_sampling == "uniform_keep_last" and self.exit_samples is not None and self.exit_samples < 2:
            raise ValueError("exit_sampling uniform_keep_last needs exit_samples >= 2 (the output exit and at least "
                             "one other)")
        if self.implementation == "reference" and self.exit_samples is not None:
            raise ValueError("exit_samples needs the fused loss (the reference loss computes every exit)")
        if self.teacher_top_k is not None and self.teacher_top_k < 1:
            raise ValueError(f"teacher_top_k must be at least 1 (or null to recompute the teacher), got "
                             f"{self.teacher_top_k}")
        if self.implementation == "reference" and self.teacher_top_k is not None:
            raise ValueError("teacher_top_k needs the fused loss (the reference loss recomputes the teacher)")


class SelfDistillation(torch.nn.Module):
    def __init__(self, student: torch.nn.Module, target: torch.nn.Module | None, settings: LossSettings):
        super().__init__()
        self.student = student
        if (target is None) != (settings.teacher_top_k is not None):
            raise ValueError("a target model is needed exactly when the teacher is not read from a cache")
        if target is not None:
            target.eval().requires_grad_(False)
        # A plain attribute holder keeps the target out of .parameters(), .to(), state_dict() and ZeRO.
        self._target = (target,)
        self.settings = settings
        self.final_norm = final_norm_module(student)
        self.head = student.get_output_embeddings()
        if self.head is None:
            raise ValueError(f"{type(student).__name__} has no output embeddings (LM head) to read layers through")

    @property
    def target(self) -> torch.nn.Module:
        return self._target[0]

    def register_for_zero3(self) -> None:
        """Under ZeRO-3 a parameter is gathered only while its own module runs; the loss reads the final norm and
        head outside their forward, so tie them to this module's forward instead."""
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        for module in (self.final_norm, self.head):
            for parameter in module.parameters():
                register_external_parameter(self, parameter)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, exit_seed: int | None = None,
                cached_target: TopKTarget | None = None) -> LossTerms:
        """``exit_seed`` seeds the draw of exits (when ``exit_samples`` is set), so that a resumed run draws the
        same exits as an uninterrupted one. ``cached_target``: the batch's rows of the teacher cache (with
        ``teacher_top_k``)."""
        if (cached_target is None) != (self.target is not None):
            raise ValueError("pass the batch's cached target exactly when the loss reads the teacher from a cache")
        states = decoder_states(self.student, input_ids, attention_mask)
        pre_norm = lens_states(states)
        target_hidden = target_head = None
        if self.target is not None:
            with torch.no_grad():
                target_hidden = decoder_states(self.target, input_ids, attention_mask)["states"][-1]
            target_head = self.target.get_output_embeddings()
        settings = self.settings
        common = dict(mask=attention_mask, alpha=settings.alpha, k=settings.k, direction=settings.kl_direction,
                      movement_convention=settings.movement_convention)
        if settings.implementation == "reference":
            return reference_loss(pre_norm, self.final_norm, self.head, target_hidden, target_head, **common)
        generator = None
        if settings.exit_samples is not None and exit_seed is not None:
            generator = torch.Generator().manual_seed(exit_seed)
        return self_distillation_loss(pre_norm, self.final_norm, self.head, target_hidden, target_head,
                                      chunk_tokens=settings.chunk_tokens, exit_samples=settings.exit_samples,
                                      exit_sampling=settings.exit_sampling, generator=generator,
                                      cached_target=cached_target, **common)
