"""Checks on a loaded config that a JSON schema cannot express (cross-references, files that must exist).

The schema (``workflow/schemas/config.schema.yaml``) checks types, ranges and unknown keys, and fills defaults;
this module runs after it, so every mistake is reported before any job starts.
"""

from __future__ import annotations

import math
from pathlib import Path

from hsconv import cluster
from hsconv.errors import InputError
from hsconv.models import ModelSourceError, check_source
from hsconv.names import EvaluationKind, choices
from hsconv.variants import recipe_settings, trainer_settings

# Every paper figure the workflow can build, and what it shows.
FIGURE_TARGETS = {
    "fig3": "D_l per layer, the main models",
    "fig4": "3-D PCA of the sentence's hidden states at every layer",
    "fig5": "per-layer LAMBADA accuracy, the main models",
    "fig6": "per-layer WikiText perplexity, the main models",
    "fig7": "logit-lens top-1 tokens of the sentence's last tokens, and D_l there",
    "fig8": "D_l per layer, the Qwen models",
    "fig9": "per-layer LAMBADA accuracy, the Qwen models",
    "fig10": "per-layer WikiText perplexity, the Qwen models",
    "early_exit": "quality against the fraction of layers kept (early exit), base vs distilled",
}
# Per-layer evaluation figures and the lm-eval metric each shows.
PER_LAYER_FIGURES = {"fig5": "acc", "fig6": "word_perplexity", "fig9": "acc", "fig10": "word_perplexity"}
MOVEMENT_FIGURES = ("fig3", "fig8")


class ConfigError(InputError):
    """A config that cannot run; the message names the key."""


def _require_known(kind: str, names, known, where: str) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"{where}: unknown {kind} {unknown}; defined {kind}s are {sorted(known)}")


def check_duplicate_keys(path) -> None:
    """YAML keeps the last of two equal keys without a word, so two models (or data sets) of one name would silently
    become one; refuse that with the file and line."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        seen = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice (first on line {seen[key]})",
                                  f"{path}:{key_node.start_mark.line + 1}", "give each entry a name of its own")
            seen[key] = key_node.start_mark.line + 1
        return loader.construct_mapping(node)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    with open(path, encoding="utf-8") as handle:
        yaml.load(handle, Loader=Loader)


def check_config(config: dict) -> None:
    """Raise :class:`ConfigError` for the first problem found; return None when the config can run."""
    if "base" not in config["variants"]:
        raise ConfigError("the base model is measured beside every other variant, and the distilled model is trained "
                          "from it", "variants", "add base: variants: [base, distilled]")
    for name, model in config["models"].items():
        try:
            check_source(name, model["source"])
        except ModelSourceError as error:
            raise ConfigError(f"models.{name}.source: {error}") from None
    _require_known("data set", config["hidden_states"]["datasets"], config["datasets"], "hidden_states.datasets")
    if "distilled" in config["variants"]:
        _check_distill(config)
    evaluation = config.get("evaluation", {})
    for key in ("datasets", "output_datasets"):
        _require_known("data set", evaluation.get(key, []), config["datasets"], f"evaluation.{key}")
        for name in evaluation.get(key, []):
            if config["datasets"][name]["kind"] not in choices(EvaluationKind):
                raise ConfigError(f"evaluation.{key}: {name!r} is of kind {config['datasets'][name]['kind']!r}; "
                                  f"lm-eval evaluation supports lambada and wikitext")
    _require_known("data set", evaluation.get("limits", {}), evaluation.get("datasets", []), "evaluation.limits")
    for figure in PER_LAYER_FIGURES:
        if figure in config["figures"]:
            spec = config["figures"][figure]
            _require_known("model", spec["models"], config["models"], f"figures.{figure}.models")
            _require_known("data set", [spec["dataset"]], evaluation.get("datasets", []), f"figures.{figure}.dataset")
    for figure in MOVEMENT_FIGURES:
        if figure in config["figures"]:
            spec = config["figures"][figure]
            _require_known("model", spec["models"], config["models"], f"figures.{figure}.models")
            _require_known("data set", [spec["dataset"]], config["hidden_states"]["datasets"],
                           f"figures.{figure}.dataset")
    if "fig4" in config["figures"]:
        _require_known("model", config["figures"]["fig4"]["models"], config["models"], "figures.fig4.models")
    if "early_exit" in config["figures"]:
        _require_known("model", config["figures"]["early_exit"]["models"], config["models"],
                       "figures.early_exit.models")
        needed = sorted({"lambada", "wikitext"} - {config["datasets"][name]["kind"]
                                                   for name in evaluation.get("datasets", [])
                                                   if name in config["datasets"]})
        if needed:
            raise ConfigError(f"figures.early_exit: evaluation.datasets has no data set of kind {needed}")
    if "fig7" in config["figures"]:
        _require_known("model", [config["figures"]["fig7"]["model"]], config["models"], "figures.fig7.model")
    tuned_lens = config.get("tuned_lens", {})
    _require_known("model", tuned_lens.get("models", []), config["models"], "tuned_lens.models")
    if tuned_lens.get("models") and not evaluation.get("datasets"):
        raise ConfigError("tuned_lens.models: the tuned lens is judged by the per-layer evaluation; "
                          "evaluation.datasets is empty")
    sequences = config["packing"]["token_budget"] // config["packing"]["sequence_length"]
    if tuned_lens.get("models") and sequences <= tuned_lens["holdout_sequences"]:
        raise ConfigError(f"tuned_lens.holdout_sequences={tuned_lens['holdout_sequences']} leaves none of the "
                          f"{sequences} packed sequences to train on")
    for check in (_check_layer_relevance, _check_splits, _check_ablations, _check_recipes, _check_departures):
        check(config)
    sentence = config["sentence"]
    if sentence["target"] not in sentence["text"]:
        raise ConfigError(f"sentence.target {sentence['target']!r} does not occur in sentence.text "
                          f"{sentence['text']!r}")


def document_range(dataset: dict) -> tuple[int, float]:
    """The documents of its source a data set may read, as [first, end): a sample may draw from all after ``skip``."""
    subset = dataset.get("subset") or {}
    skip, size = subset.get("skip", 0), subset.get("size")
    return skip, (skip + size if size is not None and subset.get("mode", "first") == "first" else math.inf)


def _source(dataset: dict) -> tuple:
    """What a data set's documents are read from: its file, or (where it names none) its hub source and split."""
    if dataset.get("path"):
        return ("file", str(Path(dataset["path"]).resolve()))
    from hsconv.texts import hub_split

    return ("hub", dataset.get("hub_id"), hub_split(dataset["kind"], dataset.get("split", "test")))


def _check_splits(config: dict) -> None:
    """Validation and test text never share a document (what chooses settings reading validation text only is
    checked where each choosing study is: _check_choosing_study)."""
    datasets = config["datasets"]
    for name, dataset in datasets.items():
        if dataset.get("split", "test") != "validation":
            continue
        for other, candidate in datasets.items():
            if candidate.get("split", "test") != "test" or _source(candidate) != _source(dataset):
                continue
            (first, end), (other_first, other_end) = document_range(dataset), document_range(candidate)
            if first < other_end and other_first < end:
                def shown(start, stop):
                    return f"documents {start + 1}–{stop}" if stop != math.inf else f"documents {start + 1} on"
                raise ConfigError(f"validation data set {name!r} ({shown(first, end)}) and test data set {other!r} "
                                  f"({shown(other_first, other_end)}) share documents of {_source(dataset)[1]}",
                                  "datasets", "give them disjoint ranges (subset.skip and subset.size): choices read "
                                  "validation text, claims read test text")


def _check_layer_relevance(config: dict) -> None:
    relevance = config.get("layer_relevance", {})
    _require_known("model", relevance.get("models", []), config["models"], "layer_relevance.models")
    _require_known("data set", relevance.get("datasets", []), config["datasets"], "layer_relevance.datasets")
    for name in relevance.get("datasets", []):
        if config["datasets"][name]["kind"] not in choices(EvaluationKind):
            raise ConfigError(f"layer_relevance.datasets: {name!r} is of kind {config['datasets'][name]['kind']!r}; "
                              f"the removal effects are scored with lm-eval's lambada and wikitext tasks")
    _require_known("data set", relevance.get("limits", {}), relevance.get("datasets", []), "layer_relevance.limits")
    if relevance.get("models") and not relevance.get("datasets"):
        raise ConfigError("layer_relevance.datasets is empty: name the data sets the removal effects are scored on")


def _check_distill(config: dict) -> None:
    distill, packing = config["distill"], config["packing"]
    if distill.get("exit_samples") is not None:
        for name, model in config["models"].items():
            layers = model["source"].get("num_layers") if model["source"]["kind"] == "tiny" else None
            if layers is not None and distill["exit_samples"] > layers + 1:
                raise ConfigError(f"{distill['exit_samples']} exits to sample, but model {name!r} has {layers + 1}",
                                  "distill.exit_samples", f"set at most {layers + 1}, or null for every exit")
    ranks = max(1, distill["resources"]["gpus"]) * distill["resources"]["nodes"]
    if distill["batch_size"] % (distill["micro_batch_size"] * ranks):
        raise ConfigError(f"distill.batch_size={distill['batch_size']} is not a multiple of micro_batch_size × ranks "
                          f"= {distill['micro_batch_size']} × {ranks}")
    resources = distill["resources"]
    try:
        cluster.distill_launcher(distill["launcher"], resources["gpus"], resources["nodes"])
        cluster.distill_resources(resources["gpus"], resources["nodes"], resources["runtime"])
    except ValueError as error:
        raise ConfigError(f"distill: {error}") from None
    sequences = packing["token_budget"] // packing["sequence_length"]
    if sequences < distill["batch_size"]:
        raise ConfigError(f"packing.token_budget gives {sequences} sequences of {packing['sequence_length']} tokens, "
                          f"fewer than one batch (distill.batch_size={distill['batch_size']})")


def _check_choosing_study(config: dict, section: str) -> None:
    """A study that chooses settings (ablations, recipes): known models, and a LAMBADA data set of validation text."""
    study = config[section]
    _require_known("model", study["models"], config["models"], f"{section}.models")
    _require_known("data set", [study["dataset"]], config["datasets"], f"{section}.dataset")
    kind = config["datasets"][study["dataset"]]["kind"]
    if kind != "lambada":
        raise ConfigError(f"{section}.dataset: {study['dataset']!r} is of kind {kind!r}; the {section} report "
                          f"LAMBADA accuracy, so it must be of kind lambada")
    if config["datasets"][study["dataset"]].get("split", "test") != "validation":
        raise ConfigError(f"{study['dataset']!r} is test text; the {section} choose settings, so they read "
                          f"validation text only", f"{section}.dataset", "name a data set with split: validation")


def _check_trainable(settings: dict[str, dict], where) -> None:
    """Each variant's settings make a distillation the trainer accepts; ``where(name)`` names the config key."""
    from hsconv.settings import DistillSettings, TrainingError

    for name, values in settings.items():
        try:
            DistillSettings.from_dict(values)
        except (TrainingError, ValueError, TypeError) as error:
            raise ConfigError(f"{where(name)}: {error}") from None


def _check_ablations(config: dict) -> None:
    from hsconv.ablations import FACTORS, ablation_settings

    ablations = config.get("ablations", {})
    if not ablations.get("models"):
        return
    _check_choosing_study(config, "ablations")
    varied = sorted(set(ablations["distill"]) & set(FACTORS))
    if varied:
        raise ConfigError(f"ablations.distill: {', '.join(varied)} is an ablation factor; set the reference's value "
                          f"in distill and the values to try in ablations.factors")
    if not any(ablations["factors"].values()):
        raise ConfigError("ablations.factors: no values to try; list some (e.g. alpha: [0, 0.5, 1, 2])")
    try:  # the shared overrides must make a runnable distillation on their own
        _check_distill({**config, "distill": {**config["distill"], **ablations["distill"]}})
    except ConfigError as error:
        raise ConfigError(f"ablations.distill: {error}") from None
    settings = ablation_settings(trainer_settings(config["distill"]), ablations["factors"], ablations["distill"])
    _check_trainable(settings, lambda name: "ablations.distill" if name == "reference"
                     else f"ablations.factors ({name})")


def _check_recipes(config: dict) -> None:
    recipes = config.get("recipes", {})
    if not recipes.get("models"):
        return
    _check_choosing_study(config, "recipes")
    if not recipes["variants"]:
        raise ConfigError("recipes.variants: no recipes; name some (e.g. alpha4: {alpha: 4.0})")
    if "distilled" not in config["variants"]:
        raise ConfigError("recipes are measured beside the main distilled model; add distilled to variants")
    _check_trainable(recipe_settings(trainer_settings(config["distill"]), recipes["variants"]),
                     lambda name: f"recipes.variants.{name}")


def _check_departures(config: dict) -> None:
    departures = config.get("departures", {})
    if not departures:
        return
    if "distilled" not in config["variants"]:
        raise ConfigError("departures are measured beside the main distilled model (their matched control); "
                          "add distilled to variants")
    main = trainer_settings(config["distill"])
    for name, overrides in departures.items():
        if {**main, **overrides} == main:
            raise ConfigError(f"departures.{name}: changes nothing of the distill section; it would be the main run")
    _check_trainable({name: {**main, **overrides} for name, overrides in departures.items()},
                     lambda name: f"departures.{name}")
