# Helpers that turn the config into paths, wildcards and params. Rules stay declarative; all logic is in hsconv.
import json

from snakemake.exceptions import WorkflowError

from hsconv.config import PER_LAYER_FIGURES, ConfigError, check_config
from hsconv.fingerprint import code_fingerprint
from hsconv.io import stable_hash

try:
    check_config(config)
except ConfigError as error:
    raise WorkflowError(f"config: {error}")

MODELS = list(config["models"])
VARIANTS = config["variants"]
MEASURED_DATASETS = config["hidden_states"]["datasets"]
CONFIG_HASH = stable_hash(config)
# Models that share a tokenizer share one packed corpus, tokenised with the first such model's tokenizer.
TOKENIZERS = {}
for _name, _model in config["models"].items():
    TOKENIZERS.setdefault(_model.get("tokenizer", _name), _name)


wildcard_constraints:
    model="|".join(MODELS),
    variant="|".join(VARIANTS),
    dataset="|".join(config["datasets"]),
    tokenizer="|".join(TOKENIZERS),


def model_source_json(wildcards):
    return json.dumps(config["models"][wildcards.model]["source"], sort_keys=True)


def model_setting(key):
    def setting(wildcards):
        return config["models"][wildcards.model][key]

    return setting


def model_labels(names):
    return " ".join(f"'{name}={config['models'][name].get('label', name)}'" for name in names)


def dataset_setting(key):
    def setting(wildcards):
        return cli_optional(config["datasets"][wildcards.dataset][key])

    return setting


def subset_setting(key):
    def setting(wildcards):
        return cli_optional(config["datasets"][wildcards.dataset]["subset"][key])

    return setting


def cli_optional(value):
    """An optional CLI value: `none` stands for null."""
    return "none" if value is None else value


def tokenizer_model_dir(wildcards):
    return f"results/models/{TOKENIZERS[wildcards.tokenizer]}/base"


def variant_model_dir(wildcards):
    return f"results/models/{wildcards.model}/{wildcards.variant}"


def model_tokens(wildcards):
    """The packed corpus of the model's tokenizer group."""
    tokenizer = config["models"][wildcards.model].get("tokenizer", wildcards.model)
    return f"results/data/tokens/{tokenizer}.parquet"


def distill_settings_json():
    """The trainer's settings: the distill section less what only the workflow uses (launcher, resources)."""
    settings = {key: value for key, value in config["distill"].items() if key not in ("launcher", "resources")}
    return json.dumps(settings, sort_keys=True)


def distill_launcher():
    """One process on CPU or one GPU; torchrun (or deepspeed's launcher) for several GPUs or nodes."""
    launcher, resources = config["distill"]["launcher"], config["distill"]["resources"]
    gpus, nodes = resources["gpus"], resources["nodes"]
    if launcher == "auto":
        launcher = "torchrun" if gpus * nodes > 1 else "none"
    if launcher == "torchrun":
        return f"torchrun --nnodes {nodes} --nproc_per_node {max(gpus, 1)} -m hsconv.cli"
    if launcher == "deepspeed":
        return f"deepspeed --num_nodes {nodes} --num_gpus {max(gpus, 1)} --module hsconv.cli"
    return "hsconv"


EVALUATED_DATASETS = config["evaluation"]["datasets"]


def evaluation_dataset_args(wildcards, input):
    """NAME=KIND=PATH for each evaluated data set, as `hsconv evaluate-layers --dataset` takes them."""
    return " ".join(f"{name}={config['datasets'][name]['kind']}={path}"
                    for name, path in zip(EVALUATED_DATASETS, input.texts))


def measured_combinations(pattern):
    return expand(pattern, model=MODELS, variant=VARIANTS, dataset=MEASURED_DATASETS)


def all_targets():
    return [
        "results/figures/fig3.pdf",
        "results/figures/fig3.png",
        "results/tables/convergence.csv",
        "results/tables/convergence.md",
        "results/tables/layer_movement.csv",
        *expand("results/data/tokens/{tokenizer}.parquet", tokenizer=TOKENIZERS),
        *(expand("results/figures/training/{model}.{ext}", model=MODELS, ext=("pdf", "png"))
          if "distilled" in VARIANTS else []),
        *(["results/tables/per_layer_evaluation.csv", "results/tables/per_layer_evaluation.md"]
          if config["evaluation"]["datasets"] else []),
        *expand("results/figures/{figure}.{ext}", figure=[f for f in PER_LAYER_FIGURES if f in config["figures"]],
                ext=("pdf", "png")),
    ]
