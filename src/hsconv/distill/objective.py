"""The module DeepSpeed trains: the student plus a frozen target, mapping a batch of token ids to ζ.

The target (the frozen pretrained model) is held outside the module's registered children, so DeepSpeed neither
optimises, casts nor partitions it; it runs without autograd and only its last normalised state is kept, from
which the loss forms q_target one chunk of tokens at a time. With a teacher cache (``teacher_top_k``) there is no
target model at all: the batch's cached top-k distribution is passed in instead.
"""

from __future__ import annotations

import torch

from hsconv.distill.loss import LossTerms, RecomputedTarget, TopKTarget, reference_loss, self_distillation_loss
from hsconv.settings import LOSS_IMPLEMENTATIONS, LossSettings  # noqa: F401 (LossSettings is imported from here too)
from hsconv.readout import decoder_states, lens_states, readout



class SelfDistillation(torch.nn.Module):
    def __init__(self, student: torch.nn.Module, target: torch.nn.Module | None, settings: LossSettings,
                 compile_kernels: bool | None = None):
        super().__init__()
        self.compile_kernels = compile_kernels
        self.student = student
        if (target is None) != (settings.teacher_top_k is not None):
            raise ValueError("a target model is needed exactly when the teacher is not read from a cache")
        if target is not None:
            target.eval().requires_grad_(False)
        # A plain attribute holder keeps the target out of .parameters(), .to(), state_dict() and ZeRO.
        self._target = (target,)
        self.settings = settings
        student_readout = readout(student)
        self.final_norm, self.head, self.softcap = (student_readout.final_norm, student_readout.head,
                                                    student_readout.softcap)

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
        if self.target is None:
            target = cached_target
        else:
            with torch.no_grad():
                target_hidden = decoder_states(self.target, input_ids, attention_mask)["states"][-1]
            target = RecomputedTarget(target_hidden, self.target.get_output_embeddings())
        settings = self.settings
        common = dict(mask=attention_mask, alpha=settings.alpha, k=settings.k, direction=settings.kl_direction,
                      movement_convention=settings.movement_convention, softcap=self.softcap,
                      zeta2_measure=settings.zeta2_measure, zeta2_penalty=settings.zeta2_penalty,
                      output_kl_weight=settings.output_kl_weight)
        if settings.implementation == "reference":
            return reference_loss(pre_norm, self.final_norm, self.head, target, **common)
        generator = None
        if settings.exit_samples is not None and exit_seed is not None:
            generator = torch.Generator().manual_seed(exit_seed)
        return self_distillation_loss(pre_norm, self.final_norm, self.head, target,
                                      chunk_tokens=settings.chunk_tokens, exit_samples=settings.exit_samples,
                                      exit_sampling=settings.exit_sampling, generator=generator,
                                      compile_kernels=self.compile_kernels, **common)
