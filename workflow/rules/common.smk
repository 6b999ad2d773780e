# Helpers that turn the config into paths, wildcards and params. Rules stay declarative; all logic is in hsconv.
import dataclasses
import json
import os
import re
import shlex

from snakemake.exceptions import WorkflowError

from hsconv import cluster
from hsconv.config import FIGURE_TARGETS, PER_LAYER_FIGURES, ConfigError, check_config, check_duplicate_keys
from hsconv.fingerprint import code_fingerprint
from hsconv.io import stable_hash
from hsconv.lifetime import WORKFLOW_PID_ENV, workflow_identity
from hsconv import settings
from hsconv.variants import trainer_settings, training_variants

try:
    for _path in workflow.configfiles:
        check_duplicate_keys(_path)
    check_config(config)
except ConfigError as error:
    raise WorkflowError(f"config: {error}")

# Every job's stage stops when this Snakemake process is gone, even killed with SIGKILL (hsconv.lifetime).
os.environ[WORKFLOW_PID_ENV] = workflow_identity()

MODELS = list(config["models"])
# Threads and memory of each model-running stage's jobs (config `resources`; distill's are distill.resources).
RESOURCES = config["resources"]
VARIANTS = config["variants"]
MEASURED_DATASETS = config["hidden_states"]["datasets"]
CONFIG_HASH = stable_hash(config)
# Models that share a tokenizer share one packed corpus, tokenised with the first such model's tokenizer.
TOKENIZERS = {}
for _name, _model in config["models"].items():
    TOKENIZERS.setdefault(_model.get("tokenizer", _name), _name)

# Every trained model beside the main `distilled` one is a variant: a named set of overrides of the distill section
# (hsconv.variants), declared by the seeds, ablations and recipes studies and built by the one rule distill_variant.
TRAINING = training_variants(config)
ABLATIONS = config.get("ablations", {})
ABLATION_MODELS = ABLATIONS.get("models", [])
RECIPES = config.get("recipes", {})
RECIPE_MODELS = RECIPES.get("models", [])
# The main distillation repeated from further seeds (distill.seeds > 1): {variant: seed}, `distilled` first.
SEED_VARIANTS = TRAINING.seeds
# Departures from the paper's loss, trained from the main run's seeds and measured like it on the measured data sets.
DEPARTURE_VARIANTS = TRAINING.departure_variants
# What a spread over seeds is taken of, each by its first seed's variant: distilled, departure-<name>, ...
SPREAD_NAMES = " ".join(["distilled", *(next(iter(seeds)) for seeds in TRAINING.departures.values())])


def study_pieces(pattern, study):
    """The pattern for every model of a choosing study (ablations, recipes), the pretrained model and every setting's
    variant in the order declared, on the study's data set."""
    section, holders = (ABLATIONS, TRAINING.ablations) if study == "ablations" else (RECIPES, TRAINING.recipes)
    # each model once: a recipe whose settings are the main run's is the main run, as is the reference
    variants = list(dict.fromkeys(["base", *holders.values()]))
    return expand(pattern, model=section["models"], variant=variants, dataset=section["dataset"])


# Models whose base is also read through a tuned lens (the baseline beside self-distillation in Figs. 5 and 6).
TUNED_LENS_MODELS = config.get("tuned_lens", {}).get("models", [])


def regex_alternatives(names):
    return "|".join(map(re.escape, names)) or "(?!)"  # nothing configured: match nothing


wildcard_constraints:
    model="|".join(MODELS),
    # tuned_lens: the base model read through its tuned lens (evaluate_layers only)
    variant=regex_alternatives([*VARIANTS, *TRAINING.settings, "tuned_lens"]),
    top_k=r"\d+",
    dataset="|".join(config["datasets"]),
    tokenizer="|".join(TOKENIZERS),


def model_source_json(wildcards):
    return json.dumps(config["models"][wildcards.model]["source"], sort_keys=True)


def model_setting(key):
    def setting(wildcards):
        return config["models"][wildcards.model][key]

    return setting


def model_label(name):
    return config["models"][name].get("label", name)


def model_labels(names):
    return " ".join(shell_quoted(f"{name}={model_label(name)}") for name in names)


def dataset_setting(key):
    def setting(wildcards):
        return cli_optional(config["datasets"][wildcards.dataset][key])

    return setting


def subset_setting(key):
    def setting(wildcards):
        return cli_optional(config["datasets"][wildcards.dataset]["subset"][key])

    return setting


def shell_quoted(text):
    return shlex.quote(text)


def figure_config(name):
    """A figure's config section; a figure that is not configured is refused with the key to add."""
    if name not in config["figures"]:
        raise WorkflowError(f"figures.{name} is not configured; add it to the config to build "
                            f"results/figures/{name}.pdf ({FIGURE_TARGETS[name]})")
    return config["figures"][name]


def figure_setting(key, figure=None):
    """A figure's config value as a param, for a fixed figure or the {figure} wildcard; read only when the figure
    is built, so an unconfigured figure is refused only when asked for."""

    def setting(wildcards):
        return figure_config(figure or wildcards.figure)[key]

    return setting


def figure_models(figure=None):
    """NAME=LABEL of a figure's models (its `models` list, or its one `model`)."""

    def labels(wildcards):
        spec = figure_config(figure or wildcards.figure)
        return model_labels(spec["models"] if "models" in spec else [spec["model"]])

    return labels


def figure_title(wildcards):
    return f"Fig. {wildcards.figure[3:]}"


def tuned_lens_figure_title(wildcards):
    return f"Fig. {wildcards.figure[3:]} with the tuned lens"


def training_title(wildcards):
    return f"Self-distillation of {config['models'][wildcards.model].get('label', wildcards.model)}"


def per_layer_metric(wildcards):
    return PER_LAYER_FIGURES[wildcards.figure]


# Models whose sentence trace a figure shows (Figs. 4 and 7).
TRACED_MODELS = list(dict.fromkeys(
    [*config["figures"].get("fig4", {}).get("models", []),
     *([config["figures"]["fig7"]["model"]] if "fig7" in config["figures"] else [])]))


def model_flag(key, flag):
    """A model's boolean setting as a CLI flag: the flag where true, nothing where false."""
    def setting(wildcards):
        return flag if config["models"][wildcards.model][key] else ""

    return setting


def cli_optional(value):
    """An optional CLI value: `none` stands for null."""
    return "none" if value is None else value


def tokenizer_model_dir(wildcards):
    return f"results/models/{TOKENIZERS[wildcards.tokenizer]}/base"


def variant_model_dir(wildcards):
    return f"results/models/{wildcards.model}/{wildcards.variant}"


def evaluated_model_dir(wildcards):
    """The model an evaluation reads: the tuned lens reads the base model."""
    variant = "base" if wildcards.variant == "tuned_lens" else wildcards.variant
    return f"results/models/{wildcards.model}/{variant}"


def tuned_lens_dir(wildcards):
    return [f"results/tuned_lens/{wildcards.model}/lens"] if wildcards.variant == "tuned_lens" else []


def model_tokens(wildcards):
    """The packed corpus of the model's tokenizer group."""
    tokenizer = config["models"][wildcards.model].get("tokenizer", wildcards.model)
    return f"results/data/tokens/{tokenizer}.parquet"


def section_settings(section, leave_out=()):
    """A config section as its stage's `--settings`: the keys of the section's settings dataclass
    (`hsconv.settings.SECTIONS`), passed whole (the section's other keys, such as which data sets, are the
    workflow's), less `leave_out`."""
    names = {item.name for item in dataclasses.fields(settings.SECTIONS[section])} - set(leave_out)
    return shell_quoted(json.dumps({key: value for key, value in config[section].items() if key in names},
                                   sort_keys=True))


def distill_settings_json(wildcards):
    return json.dumps(trainer_settings(config["distill"]), sort_keys=True)


def variant_settings_json(wildcards):
    """A trained variant's settings: the distill section with the variant's overrides."""
    return json.dumps(TRAINING.settings[wildcards.variant], sort_keys=True)


def teacher_cache_input(settings: dict):
    """The teacher cache a distillation with these settings reads (none when it recomputes the teacher)."""
    def teacher(wildcards):
        top_k = settings.get("teacher_top_k")
        return [] if top_k is None else [f"results/teacher/{wildcards.model}/top{top_k}"]
    return teacher


def variant_teacher_cache(wildcards):
    return teacher_cache_input(TRAINING.settings[wildcards.variant])(wildcards)


def distill_args(checkpoints):
    """What a distill job runs with besides its settings, inputs and outputs: the model's name and device, the
    checkpoint folder (a pattern of the job's wildcards) and the teacher cache where it reads one."""

    def args(wildcards, input):
        teacher = f" --teacher-cache {input.teacher}" if input.teacher else ""
        return (f"--name {wildcards.model} --device {config['models'][wildcards.model]['device']}"
                f" --checkpoints {checkpoints.format(**wildcards)}{teacher}")

    return args


def teacher_dtype(wildcards):
    """The precision the trainer runs the frozen model in (`auto` is resolved by the job, on its own machine), so that
    the cache holds what the trainer would compute."""
    return config["distill"]["precision"]


def teacher_resources():
    """A teacher cache job: at most one GPU on one node, the distill job's memory and runtime."""
    resources = config["distill"]["resources"]
    return {**cluster.distill_resources(min(1, resources["gpus"]), 1, resources["runtime"]),
            "mem_mb": resources["mem_mb"]}


def distill_launcher():
    """One process on CPU or one GPU; one per GPU (torchrun) on a node; one torchrun per node through srun."""
    resources = config["distill"]["resources"]
    return cluster.distill_launcher(config["distill"]["launcher"], resources["gpus"], resources["nodes"])


def distill_resources():
    """The job's GPUs, nodes and tasks for the scheduler (see hsconv.cluster for the three shapes), and its memory."""
    resources = config["distill"]["resources"]
    return {**cluster.distill_resources(resources["gpus"], resources["nodes"], resources["runtime"]),
            "mem_mb": distill_mem_mb}


def distill_mem_mb(wildcards, input):
    """The configured memory, or more when the model needs it (counted from its weights once they exist)."""
    resources = config["distill"]["resources"]
    parameters = cluster.parameter_count(input.model) if os.path.isdir(input.model) else None
    return cluster.distill_mem_mb(resources["mem_mb"], parameters, resources["gpus"], resources["nodes"],
                                  config["distill"]["offload_optimizer"])


EVALUATED_DATASETS = config["evaluation"]["datasets"]
# The output alone on larger sets: base, the other variants, every seed of the main distillation and every departure.
OUTPUT_DATASETS = config["evaluation"]["output_datasets"]
OUTPUT_VARIANTS = list(dict.fromkeys(["base", *VARIANTS, *SEED_VARIANTS, *DEPARTURE_VARIANTS]))


# The layer-relevance study (`snakemake layer_relevance`): what removing each block does, beside its movement.
RELEVANCE_MODELS = config["layer_relevance"]["models"]
RELEVANCE_DATASETS = config["layer_relevance"]["datasets"]


def relevance_measurements(name):
    """A measurement of every studied model and variant: `documents` (outcomes) or `layers` (movement sums)."""
    return expand("results/layer_relevance/{model}/{variant}/{name}.parquet", model=RELEVANCE_MODELS,
                  variant=VARIANTS, name=name)


def evaluation_datasets(names, limited=True, section="evaluation"):
    """`--dataset NAME=KIND=PATH...` of `hsconv evaluate-layers` for the named data sets (their texts are the job's
    input.texts, in that order), and `--limit NAME=N...` for those that the section's `limits` cuts short (unless not
    `limited`: the output study evaluates its larger sets whole)."""
    limits = [f"{name}={config[section]['limits'][name]}" for name in names
              if limited and name in config[section]["limits"]]

    def args(wildcards, input):
        texts = [input.texts] if isinstance(input.texts, str) else input.texts
        datasets = " ".join(f"{name}={config['datasets'][name]['kind']}={path}" for name, path in zip(names, texts))
        return f"--dataset {datasets}" + (f" --limit {' '.join(limits)}" if limits else "")

    return args


def model_args(wildcards):
    """Which model and variant, and the model's dtype and device, as the model stages take them."""
    model = config["models"][wildcards.model]
    return (f"--model {wildcards.model} --variant {wildcards.variant} --dtype {model['dtype']}"
            f" --device {model['device']}")


def evaluation_args(wildcards, input, output):
    """An evaluation's model arguments, its outputs (a per-document table where the rule has one) and the tuned lens
    where it reads one."""
    args = f"{model_args(wildcards)} --out {output.table} --json-out {output.json}"
    if "documents" in output.keys():
        args += f" --documents-out {output.documents}"
    return args + (f" --tuned-lens {input.lens}" if input.get("lens") else "")


def measured_combinations(pattern):
    return expand(pattern, model=MODELS, variant=VARIANTS, dataset=MEASURED_DATASETS)


def measured_comparisons(pattern):
    """Every trained variant (not the base) of every model on every measured data set."""
    return expand(pattern, model=MODELS, variant=[name for name in VARIANTS if name != "base"],
                  dataset=MEASURED_DATASETS)


# Tables gathered from per-model pieces into one by gather_table, {table under results/tables: its pieces}.
GATHERED_TABLES = {
    "layer_movement": measured_combinations("results/metrics/{model}/{variant}/{dataset}/layer_movement.parquet"),
    "convergence": measured_combinations("results/metrics/{model}/{variant}/{dataset}/convergence.parquet"),
    "convergence_paired": measured_comparisons(
        "results/metrics/{model}/{variant}/{dataset}/convergence_paired.parquet"),
    "per_layer_evaluation": expand("results/evaluation/{model}/{variant}/per_layer.parquet", model=MODELS,
                                   variant=VARIANTS),
    "tuned_lens/per_layer_evaluation": [
        *expand("results/evaluation/{model}/{variant}/per_layer.parquet", model=TUNED_LENS_MODELS, variant=VARIANTS),
        *expand("results/evaluation/{model}/tuned_lens/per_layer.parquet", model=TUNED_LENS_MODELS)],
    "sentence_lens": expand("results/sentence/{model}/{variant}/lens.parquet", model=TRACED_MODELS,
                            variant=VARIANTS),
    "sentence_pca": expand("results/sentence/{model}/{variant}/pca.parquet", model=TRACED_MODELS, variant=VARIANTS),
    # the departures beside base and the main run (every seed of each), on the measured data sets
    "departures": expand("results/metrics/{model}/{variant}/{dataset}/convergence.parquet", model=MODELS,
                         variant=list(dict.fromkeys(["base", "distilled", *SEED_VARIANTS, *DEPARTURE_VARIANTS])),
                         dataset=MEASURED_DATASETS)
    if DEPARTURE_VARIANTS else [],
}


def gathered_pieces(wildcards):
    return GATHERED_TABLES[wildcards.table]


def paper_targets():
    """The paper's own outputs (the default target `all`): every configured figure (PDF and PNG), the convergence and
    per-layer tables, the sentence traces, the training curves and the packed corpora."""
    return [
        *expand("results/figures/{figure}.{ext}", ext=("pdf", "png"),
                figure=[f for f in FIGURE_TARGETS if f in config["figures"] and f != "early_exit"]),
        "results/tables/convergence.csv",
        "results/tables/convergence.md",
        "results/tables/layer_movement.csv",
        *expand("results/data/tokens/{tokenizer}.parquet", tokenizer=TOKENIZERS),
        *(expand("results/figures/training/{model}.{ext}", model=MODELS, ext=("pdf", "png"))
          if "distilled" in VARIANTS else []),
        *(["results/tables/per_layer_evaluation.csv", "results/tables/per_layer_evaluation.md"]
          if EVALUATED_DATASETS else []),
        *(["results/tables/sentence_lens.csv", "results/tables/sentence_pca.csv"] if TRACED_MODELS else []),
    ]


def study_targets(study):
    """The outputs of one study beyond the paper, built only when asked for by name (`snakemake findings` builds
    them all): `ablations`, `recipes`, `tuned_lens`, `early_exit` (with the pruned models), `paired` (distilled − base),
    `seeds` (the spread over distill.seeds), `departures` (each departure from the paper's loss beside the main run),
    `output` (the output alone on evaluation.output_datasets) or
    `layer_relevance` (each block removed, beside its movement)."""
    if study == "ablations":
        return (["results/tables/ablations.csv", "results/figures/ablations.pdf", "results/figures/ablations.png"]
                if ABLATION_MODELS else [])
    if study == "recipes":
        return (["results/tables/recipes.csv", "results/tables/recipes.md", "results/figures/recipes.pdf",
                 "results/figures/recipes.png"] if RECIPE_MODELS else [])
    if study == "paired":  # distilled − base: S_model and the last-layer ratio; each evaluated exit's metric
        return ([*expand("results/tables/convergence_paired.{ext}", ext=("csv", "md")),
                 *(["results/tables/paired_differences.csv"] if EVALUATED_DATASETS else [])]
                if "distilled" in VARIANTS else [])
    if study == "seeds":
        return expand("results/tables/seeds.{ext}", ext=("csv", "md")) if SEED_VARIANTS else []
    if study == "departures":  # each departure (every seed) beside the main run, measured on test text
        return expand("results/tables/{table}.{ext}", ext=("csv", "md"),
                      table=["departures", *(["departures_seeds"] if SEED_VARIANTS else [])]) \
            if DEPARTURE_VARIANTS else []
    if study == "output":  # each variant's and seed's output on the larger sets, paired against base
        if not OUTPUT_DATASETS or len(OUTPUT_VARIANTS) < 2:
            return []
        return expand("results/tables/{table}.{ext}", ext=("csv", "md"),
                      table=["output_paired", *(["output_seeds"] if SEED_VARIANTS else [])])
    if study == "layer_relevance":
        return ([*expand("results/tables/{table}.{ext}", ext=("csv", "md"),
                         table=("layer_relevance", "layer_relevance_agreement", "layer_pruning")),
                 *expand("results/figures/layer_relevance.{ext}", ext=("pdf", "png"))]
                if RELEVANCE_MODELS else [])
    if not EVALUATED_DATASETS:
        return []
    if study == "tuned_lens":
        return ([*expand("results/tables/tuned_lens/{table}.{ext}", table=("per_layer_evaluation",
                                                                             "paired_differences"), ext=("csv", "md")),
                 *expand("results/figures/tuned_lens/{figure}.{ext}", figure=TUNED_LENS_FIGURES, ext=("pdf", "png"))]
                if TUNED_LENS_MODELS else [])
    if study == "early_exit":
        return ["results/tables/early_exit.csv", "results/tables/pruned_vs_lens.csv",
                *(["results/figures/early_exit.pdf", "results/figures/early_exit.png"]
                  if "early_exit" in config["figures"] else [])]
    raise ValueError(f"unknown study {study!r}")


STUDIES = ("ablations", "recipes", "tuned_lens", "early_exit", "paired", "seeds", "departures", "output",
           "layer_relevance")
# The configured per-layer figures (5, 6, 9, 10) whose models all have a tuned lens, drawn again with it as a third
# curve.
TUNED_LENS_FIGURES = [name for name in PER_LAYER_FIGURES if name in config["figures"]
                      and set(config["figures"][name]["models"]) <= set(TUNED_LENS_MODELS)]
