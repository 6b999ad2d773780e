"""Every config key with a type, range or choice, given a wrong value: one message naming the key and what was
expected. The cases are generated from the schema itself, so a key added to it is covered without a new test."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from hsconv.settings import SECTIONS

SCHEMA_PATH = REPO / "workflow" / "schemas" / "config.schema.yaml"
SCHEMA = yaml.safe_load(SCHEMA_PATH.read_text())
PRESET = yaml.safe_load((REPO / "configs" / "test.yaml").read_text())
# Where a schema definition ($defs) sits in the test preset, so that its keys get a concrete path.
DEFINITION_INSTANCES = {"model": ("models", "tiny-llama"), "dataset": ("datasets", "lambada"),
                        "movement_figure": ("figures", "fig3"), "per_layer_figure": ("figures", "fig5")}


def _resolve(schema: dict) -> dict:
    reference = schema.get("$ref")
    return SCHEMA["$defs"][reference.split("/")[-1]] if reference else schema


def _leaves(schema: dict, path: tuple):
    """(path, leaf schema) for every key that has a type, range or choice."""
    schema = _resolve(schema)
    for key, child in schema.get("properties", {}).items():
        child_path = path + (key,)
        resolved = _resolve(child)
        if "properties" in resolved:
            yield from _leaves(resolved, child_path)
        elif {"type", "enum", "minimum", "maximum"} & set(resolved) and resolved.get("type") != "array":
            yield child_path, resolved


def _all_leaves():
    for path, leaf in _leaves(SCHEMA, ()):
        yield path, leaf
    for definition, prefix in DEFINITION_INSTANCES.items():
        if definition in ("movement_figure", "per_layer_figure"):
            continue  # reached through `figures` above
        for path, leaf in _leaves(SCHEMA["$defs"][definition], prefix):
            yield path, leaf


def _wrong_values(leaf: dict):
    """(value, the words the message must contain) for each way a value can be wrong for this key."""
    types = leaf.get("type", [])
    types = [types] if isinstance(types, str) else types
    if "enum" in leaf:
        yield "no-such-choice", "is not one of"
    if "integer" in types or "number" in types:
        yield "twelve", "is not of type"
        if "minimum" in leaf:
            yield leaf["minimum"] - 1, f"is less than the minimum of {leaf['minimum']}"
        if "maximum" in leaf:
            yield leaf["maximum"] + 1, f"is greater than the maximum of {leaf['maximum']}"
    elif "boolean" in types:
        yield "yes", "is not of type 'boolean'"
    elif types == ["string"] or set(types) == {"string", "null"}:
        yield 5, "is not of type"


CASES = [pytest.param(path, value, words, id=".".join(path) + f"={value!r}")
         for path, leaf in _all_leaves() for value, words in _wrong_values(leaf)]


def _set(config: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        config = config.setdefault(key, {})
    config[path[-1]] = value


def test_the_cases_cover_every_section():
    sections = {path[0] for path, *_ in (case.values for case in CASES)}
    assert {"models", "datasets", "corpus", "packing", "distill", "hidden_states", "evaluation", "metrics",
            "sentence", "figures"} <= sections
    assert len(CASES) > 60


@pytest.mark.parametrize("path, value, words", CASES)
def test_wrong_value_is_refused_naming_the_key(path, value, words):
    config = copy.deepcopy(PRESET)
    _set(config, path, value)
    with pytest.raises(WorkflowError) as error:
        validate(config, str(SCHEMA_PATH))
    message = str(error.value)
    assert words in message, message
    assert "On instance" + "".join(f"[{key!r}]" for key in path) in message, message


def test_an_unknown_key_anywhere_is_refused(tmp_path: Path):
    for path in (("distill", "learning_rat"), ("models", "tiny-llama", "dtyp"), ("sentence", "txt")):
        config = copy.deepcopy(PRESET)
        _set(config, path, 1)
        with pytest.raises(WorkflowError, match=rf"'{path[-1]}' was unexpected"):
            validate(config, str(SCHEMA_PATH))


SETTINGS_SECTIONS = [("distill", "LossSettings"), ("distill", "TrainSettings"),
                     *((section, settings_class.__name__) for section, settings_class in SECTIONS.items())]


@pytest.mark.parametrize("section, settings", SETTINGS_SECTIONS)
def test_schema_defaults_are_the_settings_defaults(section, settings):
    """hsconv.settings declares each stage's defaults, ranges and choices; the schema, which fills a config's missing
    keys and refuses bad values before any job starts, must agree with it, or a stage run by the workflow and the same
    stage run by hand would differ."""
    import typing
    from dataclasses import fields

    import hsconv.settings

    properties = SCHEMA["properties"][section]["properties"]
    settings_class = getattr(hsconv.settings, settings)
    hints = typing.get_type_hints(settings_class)
    compared = 0
    for field in fields(settings_class):
        if field.name not in properties:
            continue
        schema = properties[field.name]
        default = field.default
        assert "default" in schema, f"{section}.{field.name} has no default in the schema"
        expected = list(default) if isinstance(default, tuple) else default
        assert schema["default"] == expected, f"{section}.{field.name}"
        values = schema.get("items", schema) if schema.get("type") == "array" or "array" in schema.get("type", []) \
            else schema
        for bound in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            assert field.metadata.get(bound) == values.get(bound), f"{section}.{field.name}: {bound}"
        if typing.get_origin(hints[field.name]) is typing.Literal:
            choices = list(typing.get_args(hints[field.name]))
        else:
            choices = list(field.metadata["choices"]) if "choices" in field.metadata else None
        assert choices == schema.get("enum"), f"{section}.{field.name}: choices"
        compared += 1
    assert compared == len([field for field in fields(settings_class) if field.name in properties]) >= 2


@pytest.mark.parametrize("section, settings", SETTINGS_SECTIONS[2:])
def test_every_setting_of_a_stage_is_a_config_key(section, settings):
    """A rule passes its section whole; a settings field the schema does not know could never be set from the
    config."""
    from dataclasses import fields

    import hsconv.settings

    missing = [field.name for field in fields(getattr(hsconv.settings, settings))
               if field.name not in SCHEMA["properties"][section]["properties"]]
    assert not missing


def test_loading_and_checking_the_default_config_imports_no_torch():
    """The Snakefile checks the config on every start, dry runs included; importing torch there would cost seconds
    before any job and undo the package's lazy imports."""
    code = ("import sys, yaml; from snakemake.utils import validate; from hsconv.config import check_config; "
            "config = yaml.safe_load(open('config.yaml')); validate(config, 'workflow/schemas/config.schema.yaml'); "
            "check_config(config); print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'lm_eval') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_a_stage_given_a_source_fills_the_schemas_defaults_and_takes_its_keys():
    """`hsconv prepare-model --source` completes a source as the workflow's schema does (hsconv.models)."""
    from hsconv.models import REQUIRED_SOURCE_KEYS, SOURCE_KEYS, TINY_DEFAULTS

    branches = {branch["if"]["properties"]["kind"]["const"]: branch["then"]
                for branch in SCHEMA["$defs"]["source"]["allOf"]}
    tiny = branches["tiny"]["properties"]
    assert TINY_DEFAULTS == {key: value["default"] for key, value in tiny.items() if key != "kind"}
    for kind, branch in branches.items():
        assert set(SOURCE_KEYS[kind]) == set(branch["properties"]) - {"kind"}, kind
        assert set(REQUIRED_SOURCE_KEYS[kind]) == set(branch.get("required", [])), kind


# JSON Schema's own words; anything else in a schema node is a typo, or a YAML flow mapping cut at an unquoted comma
# (`{description: Branch, tag or commit.}` reads as the description "Branch" and a key "tag or commit.").
SCHEMA_KEYWORDS = {"$schema", "$defs", "$ref", "title", "description", "type", "default", "enum", "const", "minimum",
                   "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "pattern", "items", "minItems",
                   "uniqueItems", "properties", "additionalProperties", "required", "propertyNames", "minProperties",
                   "maxItems", "allOf", "oneOf", "if", "then", "not"}


def test_every_schema_node_uses_schema_keywords_only():
    def stray(node, path):
        if isinstance(node, list):
            for index, item in enumerate(node):
                yield from stray(item, f"{path}[{index}]")
        elif isinstance(node, dict):
            names_are_keys = path.endswith(("properties", "$defs"))
            for key, value in node.items():
                if not names_are_keys and key not in SCHEMA_KEYWORDS:
                    yield f"{path}.{key}"
                yield from stray(value, f"{path}.{key}")

    assert list(stray(SCHEMA, "")) == []


def test_the_config_reference_is_generated_from_the_schema():
    """docs/config.md is what `python -m hsconv.config_reference` writes now, and lists every key of the defaults."""
    from hsconv.config_reference import config_reference

    assert (REPO / "docs" / "config.md").read_text() == config_reference(SCHEMA_PATH), \
        "docs/config.md is stale: python -m hsconv.config_reference > docs/config.md"
    reference = config_reference(SCHEMA_PATH)
    default = yaml.safe_load((REPO / "config.yaml").read_text())
    for section in ("distill", "packing", "hidden_states", "evaluation", "metrics", "recipes", "ablations"):
        for key in default[section]:
            assert f"`{section}.{key}`" in reference, f"{section}.{key}"
