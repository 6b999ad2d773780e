# hsconv: hidden-state convergence of Transformer language models.
#   snakemake --cores all                          the paper's figures and tables for the embedded default (config.yaml)
#   snakemake --cores all findings                 the studies beyond the paper too (ablations, tuned lens, early
#                                                  exit, paired differences, seeds, departures, output, layer
#                                                  relevance); or one of them by name
#   snakemake --cores all results/figures/fig3.pdf one target
#   snakemake --cores all --configfile configs/paper.yaml   a preset replaces config.yaml entirely
from snakemake.utils import min_version, validate

min_version("9.0")

# A preset given with --configfile replaces the default instead of being merged into it, so that a preset's
# models never run beside the default's.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/hidden_states.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/early_exit.smk"
include: "workflow/rules/variants.smk"
include: "workflow/rules/tuned_lens.smk"
include: "workflow/rules/output.smk"
include: "workflow/rules/layer_relevance.smk"


rule all:
    """The paper's figures (3-10 as configured), tables and training curves."""
    input:
        paper_targets(),
    default_target: True


rule findings:
    """Every study beyond the paper: ablations, recipes, the tuned-lens baseline, early exit, paired differences, seeds,
    the departures from the paper's loss, the output on larger sets and layer relevance."""
    input:
        [study_targets(study) for study in STUDIES],


rule ablations:
    """One distillation per loss setting around the configured one (config `ablations`), with its table and figure."""
    input:
        study_targets("ablations"),


rule recipes:
    """Each recipe of config `recipes` (a named set of distill overrides) trained and measured on validation text:
    its table and the frontier of S_model against the output's accuracy."""
    input:
        study_targets("recipes"),


rule tuned_lens:
    """The tuned-lens baseline (config `tuned_lens`): its per-layer table, its paired differences from the base
    model's logit lens and Figs. 5/6 (9/10) with it as a third curve, under results/figures/tuned_lens/."""
    input:
        study_targets("tuned_lens"),


rule early_exit:
    """The shallowest exit within each tolerance of the output, and pruned models under stock lm-eval."""
    input:
        study_targets("early_exit"),


rule paired:
    """Distilled − base at every exit, with paired bootstrap intervals over the same documents."""
    input:
        study_targets("paired"),


rule seeds:
    """The main distillation repeated from distill.seeds seeds: the spread of S_model and the last-layer ratio."""
    input:
        study_targets("seeds"),


rule departures:
    """Each departure from the paper's loss (config `departures`) trained from the main run's seeds and measured like
    it on test text: S_model and D_l beside base and the main run, and their spread over seeds."""
    input:
        study_targets("departures"),


rule output:
    """The output alone (lm-eval's stock tasks) of base, distilled, every seed and every departure on
    evaluation.output_datasets (the whole LAMBADA test set by default), each paired against base, and the spread of
    the main run's differences over seeds."""
    input:
        study_targets("output"),


rule layer_relevance:
    """Each block removed (alone, and the greedy prunings) beside its movement D_l: does a block that moves the
    hidden state little matter little?"""
    input:
        study_targets("layer_relevance"),
