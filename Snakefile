# hsconv: hidden-state convergence of Transformer language models.
#   snakemake --cores all                          the embedded default (config.yaml)
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
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/early_exit.smk"
include: "workflow/rules/ablations.smk"
include: "workflow/rules/tuned_lens.smk"


rule all:
    input:
        all_targets(),
    default_target: True
