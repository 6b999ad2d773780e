"""Training variants: every distillation beside the main one is a named set of overrides of the distill section.

The main run (variant ``distilled``) trains the config's ``distill`` section. Every other trained model is that
section with some keys changed, named, and built by one workflow rule (``distill_variant``) and measured by the same
stages as the main run. Three studies declare them:

- **seeds** (``distill.seeds``): ``distilled-seed-N``, the main run from seed N, for the spread over training runs;
- **ablations** (``ablations.factors``): ``ablation-FACTOR-VALUE``, one factor changed around a reference on a
  shorter budget (:mod:`hsconv.ablations`);
- **recipes** (``recipes.variants``): ``recipe-NAME``, any set of overrides, measured on validation text and drawn
  as a frontier of S_model against the output's accuracy;
- **departures** (``departures``): ``departure-NAME`` (and ``departure-NAME-seed-N``), a departure from the paper's
  loss trained with the main run's settings and seeds but its overrides, and measured like the main run on test text
  (its S_model and D_l on every measured data set, its output in the output study): the matched control of a
  departure is the main run itself.

A variant whose settings equal the main run's is the main run, not trained twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hsconv.ablations import ABLATION_PREFIX, REFERENCE, ablation_settings
from hsconv.seeds import seed_variants

RECIPE_PREFIX = "recipe-"
DEPARTURE_PREFIX = "departure-"
MAIN = "distilled"


def trainer_settings(distill: dict) -> dict:
    """The trainer's settings: the distill section less what only the workflow uses (launcher, resources, and how
    many seeds it trains)."""
    return {key: value for key, value in distill.items() if key not in ("launcher", "resources", "seeds")}


def recipe_settings(main: dict, recipes: dict[str, dict]) -> dict[str, dict]:
    """{recipe: the main run's settings with the recipe's overrides}, the reference (the main run itself) first."""
    return {REFERENCE: main, **{name: {**main, **overrides} for name, overrides in recipes.items()}}


@dataclass
class TrainingVariants:
    """Every trained variant of a config and which study named it."""

    settings: dict[str, dict] = field(default_factory=dict)  # {variant: trainer settings}, the main run's excluded
    ablations: dict[str, str] = field(default_factory=dict)  # {ablation setting: the variant holding it}
    ablation_settings: dict[str, dict] = field(default_factory=dict)  # {ablation setting: trainer settings}
    recipes: dict[str, str] = field(default_factory=dict)  # {recipe (or reference): the variant holding it}
    recipe_settings: dict[str, dict] = field(default_factory=dict)  # {recipe: trainer settings}
    seeds: dict[str, int] = field(default_factory=dict)  # {variant: seed}, `distilled` first; empty for one seed
    # {departure: {variant: seed}}, each departure's first seed first (one variant where distill.seeds is 1)
    departures: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def departure_variants(self) -> list[str]:
        """Every departure's every seed, in the order declared."""
        return [variant for seeds in self.departures.values() for variant in seeds]


def _holder(settings: dict, main: dict, main_trained: bool, name: str) -> str:
    """The main run where the settings are its own (and it is trained), else ``name``."""
    return MAIN if main_trained and settings == main else name


def training_variants(config: dict) -> TrainingVariants:
    """The config's trained variants: its seeds, ablation settings and recipes, each with its full settings."""
    main = trainer_settings(config["distill"])
    main_trained = MAIN in config["variants"]
    variants = TrainingVariants()
    ablations = config.get("ablations", {})
    if ablations.get("models"):
        variants.ablation_settings = ablation_settings(main, ablations["factors"], ablations["distill"])
        variants.ablations = {name: _holder(values, main, main_trained, ABLATION_PREFIX + name)
                              for name, values in variants.ablation_settings.items()}
    recipes = config.get("recipes", {})
    if recipes.get("models"):
        variants.recipe_settings = recipe_settings(main, recipes["variants"])
        variants.recipes = {name: _holder(values, main, main_trained, RECIPE_PREFIX + name)
                            for name, values in variants.recipe_settings.items()}
    if main_trained and config["distill"]["seeds"] > 1:
        variants.seeds = seed_variants(config["distill"]["seed"], config["distill"]["seeds"])
    for variant, seed in variants.seeds.items():
        if variant != MAIN:
            variants.settings[variant] = {**main, "seed": seed}
    for name, overrides in config.get("departures", {}).items():
        seeds = seed_variants(config["distill"]["seed"], config["distill"]["seeds"], DEPARTURE_PREFIX + name)
        variants.departures[name] = seeds
        for variant, seed in seeds.items():
            variants.settings[variant] = {**main, **overrides, "seed": seed}
    for names, settings in ((variants.ablations, variants.ablation_settings),
                            (variants.recipes, variants.recipe_settings)):
        for name, variant in names.items():
            if variant != MAIN:
                variants.settings[variant] = settings[name]
    return variants
