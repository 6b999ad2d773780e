"""Checks on a loaded config that a JSON schema cannot express (cross-references, files that must exist).

The schema (``workflow/schemas/config.schema.yaml``) checks types, ranges and unknown keys, and fills defaults;
this module runs after it, so every mistake is reported before any job starts.
"""

from __future__ import annotations

from hsconv.models import ModelSourceError, check_source


class ConfigError(ValueError):
    """A config that cannot run; the message names the key."""


def _require_known(kind: str, names, known, where: str) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"{where}: unknown {kind} {unknown}; defined {kind}s are {sorted(known)}")


def check_config(config: dict) -> None:
    """Raise :class:`ConfigError` for the first problem found; return None when the config can run."""
    for name, model in config["models"].items():
        try:
            check_source(name, model["source"])
        except ModelSourceError as error:
            raise ConfigError(f"models.{name}.source: {error}") from None
    _require_known("data set", config["hidden_states"]["datasets"], config["datasets"], "hidden_states.datasets")
    fig3 = config["figures"]["fig3"]
    _require_known("model", fig3["models"], config["models"], "figures.fig3.models")
    _require_known("data set", [fig3["dataset"]], config["hidden_states"]["datasets"], "figures.fig3.dataset")
