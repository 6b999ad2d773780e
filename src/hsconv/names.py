"""One name per concept: every closed set of names the config, the CLI and the tables share, as ``Literal`` types.

The settings dataclasses (:mod:`hsconv.settings`) annotate their fields with these, the CLI's choices are read from
them, and the schema's ``enum`` lists are tested equal to them (tests/test_config_schema.py). Torch-free.
"""

from __future__ import annotations

from typing import Literal, get_args

# Where h_L is read for D_L and ζ2: after the model's final norm (`hf`, HuggingFace's last hidden state) or before
# it (`pre_norm`). The config calls it `distill.movement_convention` (what ζ2 trains) and `final_norm` in figure and
# ablation sections (which one is shown); tables carry it in the column `convention`.
Convention = Literal["hf", "pre_norm"]
# The kinds of evaluation texts lm-eval scores (lambada_openai, wikitext); a data set's *name* is free, its kind one
# of these, and tables carry both (`task` holds the name, `kind` the kind).
EvaluationKind = Literal["lambada", "wikitext"]
# Kinds of text files prepare-texts reads: the evaluated kinds, and jsonl for any other text.
TextKind = Literal["lambada", "wikitext", "jsonl"]
SubsetMode = Literal["first", "sample"]
# What a data set is for: validation text is what every choice (recipe, learning rate, steps, α, β) reads; test
# text is what every claim reads, once per chosen setting. A check refuses the two overlapping (hsconv.config).
Split = Literal["validation", "test"]
# The frozen model is the `target` of ζ1 (eq. 4): KL(student || target) as the paper writes it, or the reverse.
KLDirection = Literal["student_target", "target_student"]
# ζ2's per-layer step: the paper's ‖h_l − h_{l−1}‖² / ‖h_{l−1}‖² (eq. 5), or the scale-free 1 − cos(h_{l−1}, h_l)
# (= 2 D_l), which a norm's gain cannot inflate or shrink.
Zeta2Measure = Literal["relative_step", "cosine_distance"]
# What ζ2 penalises in those steps: each step (the paper, eq. 5), or only a step larger than the one before it (the
# rise S_model counts against a model), which leaves large but shrinking steps alone.
Zeta2Penalty = Literal["step", "rise"]
ExitSampling = Literal["uniform", "weighted", "uniform_keep_last", "stratified_keep_last"]
LossImplementation = Literal["fused", "reference"]
TrainingPrecision = Literal["auto", "float32", "bfloat16"]
CompileMode = Literal["auto", "always", "never"]
# Parts of the student that distillation can leave as they are: the token embeddings (in tied models also the LM
# head) and the final norm's gain.
FrozenPart = Literal["embeddings", "final_norm"]
# Floating-point types a model is loaded in for measuring and evaluating.
ModelDtype = Literal["float32", "bfloat16", "float16", "float64"]
# A document longer than the longest forward pass: refused, cut, or cut into pieces measured one by one.
Overflow = Literal["error", "truncate", "split"]
# Packing: fill every sequence, cutting the last document, or stop at the last whole document.
Boundary = Literal["cut", "document"]


def choices(names) -> tuple[str, ...]:
    """The names a ``Literal`` type allows, in declaration order."""
    return get_args(names)
