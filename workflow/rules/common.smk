# Helpers that turn the config into paths, wildcards and params. Rules stay declarative; all logic is in hsconv.
import json

from snakemake.exceptions import WorkflowError

from hsconv.config import ConfigError, check_config
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
    ]
