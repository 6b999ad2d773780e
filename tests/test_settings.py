"""Stage settings: one dataclass per config section, checked on load, and the CLI's flags built from the same fields."""

from __future__ import annotations

import json
import typing
from dataclasses import fields

import pytest

from hsconv.cli import STAGES, build_parser
from hsconv.flags import JSON, Datasets, Labels, Limits, add_flags, call, flag, flags, stage_settings
from hsconv.settings import (
    DistillSettings,
    EvaluationSettings,
    HiddenStatesSettings,
    SECTIONS,
    MetricsSettings,
    SettingsError,
    TrainingError,
    defaults,
    from_section,
)

REQUIRED = {"dump-hidden-states": ["--model-dir", "m", "--texts", "t.parquet", "--out", "o.parquet"],
            "compute-convergence": ["--hidden", "h", "--layers-out", "l", "--scores-out", "s", "--model", "m",
                                    "--variant", "v", "--dataset", "d"],
            "evaluate-layers": ["--model-dir", "m", "--dataset", "a=lambada=a.parquet", "--out", "o", "--json-out", "j",
                                "--model", "m", "--variant", "v"]}


def parse(stage: str, *extra: str):
    return build_parser([stage]).parse_args([stage, *REQUIRED[stage], *extra])


def test_a_section_becomes_its_dataclass_with_lists_as_tuples():
    settings = from_section(MetricsSettings, {"quantiles": [0.25, 0.75], "seed": 3}, "metrics")
    assert settings == MetricsSettings(quantiles=(0.25, 0.75), seed=3)
    assert from_section(HiddenStatesSettings, {}, "hidden_states") == HiddenStatesSettings()


@pytest.mark.parametrize("values, culprit, words", [
    ({"max_token": 512}, "hidden_states", "unknown setting(s) max_token"),
    ({"max_tokens": 1}, "hidden_states.max_tokens", "give at least 2"),
    ({"max_tokens": 2.5}, "hidden_states.max_tokens", "is not an int or null"),
    ({"overflow": "wrap"}, "hidden_states.overflow", "is not one of error, truncate, split"),
    ({"exclude_special_tokens": "yes"}, "hidden_states.exclude_special_tokens", "is not a bool"),
    ({"batch_size": True}, "hidden_states.batch_size", "is not an int"),
])
def test_a_bad_setting_is_refused_naming_its_key(values, culprit, words):
    with pytest.raises(SettingsError) as raised:
        from_section(HiddenStatesSettings, values, "hidden_states")
    assert f"({culprit})" in str(raised.value) and words in str(raised.value), str(raised.value)


def test_ranges_of_list_elements_and_number_choices_are_checked():
    with pytest.raises(SettingsError, match=r"1.5 is out of range: give less than 1 \(metrics.quantiles\)"):
        from_section(MetricsSettings, {"quantiles": [0.5, 1.5]}, "metrics")
    with pytest.raises(TrainingError, match=r"5 is not one of auto, 0, 1, 2, 3 \(distill.zero_stage\)"):
        DistillSettings.from_dict({"zero_stage": 5})
    with pytest.raises(TrainingError, match=r"\(distill.alpha\)"):
        DistillSettings.from_dict({"alpha": -0.5})


def test_without_flags_a_stage_runs_with_the_dataclass_defaults():
    assert stage_settings(parse("dump-hidden-states")) == HiddenStatesSettings()
    assert stage_settings(parse("evaluate-layers")) == EvaluationSettings()


def test_the_section_passed_whole_and_a_flag_on_top_of_it():
    """The workflow passes the section as JSON; a flag given by hand wins over it."""
    section = json.dumps({"batch_size": 2, "max_tokens": 256, "overflow": "split", "exclude_special_tokens": False})
    settings = stage_settings(parse("dump-hidden-states", "--settings", section, "--max-tokens", "none"))
    assert settings == HiddenStatesSettings(batch_size=2, max_tokens=None, overflow="split",
                                            exclude_special_tokens=False)
    # a boolean is one name with its negation, never an inverted second name
    assert stage_settings(parse("dump-hidden-states", "--no-exclude-special-tokens")).exclude_special_tokens is False
    assert stage_settings(parse("compute-convergence", "--quantiles", "0.2", "0.8")).quantiles == (0.2, 0.8)
    assert stage_settings(parse("evaluate-layers", "--layers", "0", "3")).layers == (0, 3)


def test_every_stage_with_settings_has_a_flag_per_field_with_its_range():
    """The flags are built from the dataclass, so a field added there is a flag without another line."""
    checked = 0
    for name in STAGES:
        subparsers = next(action for action in build_parser([name])._actions if action.dest == "stage").choices
        defaults_ = subparsers[name]._defaults
        if "settings_class" not in defaults_:
            continue
        options = {action.dest: action for action in subparsers[name]._actions}
        settings_class = defaults_["settings_class"]
        for field in fields(settings_class):
            assert field.name in options, (name, field.name)
            assert field.metadata["help"] in options[field.name].help
            if typing.get_origin(typing.get_type_hints(settings_class)[field.name]) is typing.Literal:
                assert tuple(options[field.name].choices) == typing.get_args(
                    typing.get_type_hints(settings_class)[field.name])
        checked += 1
    assert checked >= 8
    with pytest.raises(SystemExit) as raised:
        parse("dump-hidden-states", "--max-tokens", "1")
    assert raised.value.code == 2


def test_defaults_are_the_fields_defaults():
    assert defaults(HiddenStatesSettings) == {"batch_size": 8, "max_tokens": None, "overflow": "error",
                                              "exclude_special_tokens": True}


def test_precision_auto_is_bf16_only_where_the_device_multiplies_it_natively(monkeypatch):
    """`auto` (the default's distill and layer-relevance precision) must not choose an emulated bf16: on a CPU
    without avx512_bf16 or AMX it would make a newcomer's first run take hours."""
    import hsconv.precision as precision

    monkeypatch.setattr(precision, "bf16_is_native", lambda device="cpu": False)
    assert precision.resolve_precision("auto", "cpu") == "float32"
    assert precision.resolve_precision("float32", "cpu") == "float32"
    assert precision.resolve_precision("bfloat16", "cpu") == "bfloat16"  # asked for: kept, with a warning
    monkeypatch.setattr(precision, "bf16_is_native", lambda device="cpu": True)
    assert precision.resolve_precision("auto", "cpu") == "bfloat16"
    assert precision.resolve_precision("float32", "cuda:0") == "float32"


@pytest.mark.parametrize("flags, native", [
    ({"avx512f": True, "avx512_vnni": True}, False),  # an avx512 Xeon without bf16: oneDNN emulates it
    ({"avx2": True}, False),
    ({"avx512f": True, "avx512_bf16": True}, True),
    ({"avx512f": True, "amx_tile": True, "amx_bf16": True}, True),
])
def test_a_cpu_multiplies_bf16_natively_only_with_avx512_bf16_or_amx(monkeypatch, flags, native):
    """oneDNN reports bf16 as supported on every avx512 CPU, where it is emulated (4x slower than float32 on such a
    Xeon); the check reads the CPU's flags instead."""
    import torch

    import hsconv.precision as precision

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert precision.bf16_is_native("cpu") is native
    assert precision.resolve_precision("auto", "cpu") == ("bfloat16" if native else "float32")


def test_the_default_config_leaves_the_precision_to_the_machine():
    import yaml

    from conftest import REPO

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    assert config["distill"]["precision"] == "auto" and config["layer_relevance"]["precision"] == "auto"


def stage_options(name: str) -> dict[str, object]:
    """{option string: argparse action} of one stage's generated parser."""
    parser = next(action for action in build_parser([name])._actions if action.dest == "stage").choices[name]
    return {option: action for action in parser._actions for option in action.option_strings}


def test_every_parameter_of_a_stage_function_is_a_flag():
    """The flags are generated from the function's signature: a parameter added there is a flag without another
    line, required exactly where it has no default (or ``@flags`` says otherwise)."""
    import inspect

    from hsconv.cli import stage_function

    for name in STAGES:
        function = stage_function(name)
        destinations = {action.dest: action for action in stage_options(name).values()}
        section = function.stage_flags[0]
        from_section = {field.name for field in fields(SECTIONS[section])} if section else set()
        for parameter in inspect.signature(function).parameters.values():
            assert parameter.name in destinations, (name, parameter.name)
            if parameter.name in from_section:  # a setting: optional, its default the dataclass's
                continue
            override = function.stage_flags[1].get(parameter.name, {}).get("required")
            expected = parameter.default is parameter.empty if override is None else override
            assert destinations[parameter.name].required == expected, (name, parameter.name)


def test_every_flag_a_rule_passes_is_a_flag_of_its_stage():
    """Each rule's `hsconv <stage> --flag ...` against the stage's generated parser: a renamed parameter that a rule
    still passes by its old name fails here, not in the middle of a workflow."""
    import re
    from pathlib import Path

    rules = "\n".join(path.read_text() for path in (Path(__file__).parents[1] / "workflow/rules").glob("*.smk"))
    checked = 0
    for block in re.findall(r"shell:\n((?:        .*\n)+)", rules):
        command = re.search(r"hsconv ([a-z-]+)(.*)", block, re.S)
        if not command:
            continue
        options = stage_options(command.group(1))
        for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", command.group(2)):
            assert option in options, (command.group(1), option)
            checked += 1
    assert checked > 100


def test_the_flags_reach_the_function_as_its_parameters():
    """What a shell passes as text arrives as the annotation says: pairs as dicts (also under ``| None``), JSON as a
    dict, a list, a flag, and the section's fields that the function names, from --settings with a flag on top."""
    from hsconv.cli import StageParser

    @flags("metrics", models=flag("in order", name="--model"), datasets=flag(name="--dataset"),
           limits=flag(name="--limit"), count=flag(minimum=2))
    def probe(tables: list[str], models: Labels, datasets: Datasets, limits: Limits | None = None,
              source: JSON | None = None, paired: bool = False, count: int = 2, seed: int = 0,
              confidence: float = 0.95):
        return locals()

    parser = StageParser(prog="probe")
    add_flags(parser, probe)
    received = call(probe, parser.parse_args([
        "--tables", "a.parquet", "b.parquet", "--model", "m=The M", "n", "--dataset", "lam=lambada=l.parquet",
        "--limit", "lam=3", "--source", '{"kind": "tiny"}', "--paired", "--count", "3",
        "--settings", '{"seed": 4, "confidence": 0.5}', "--confidence", "0.9"]))
    assert received == {"tables": ["a.parquet", "b.parquet"], "models": {"m": "The M", "n": "n"},
                        "datasets": {"lam": ("lambada", "l.parquet")}, "limits": {"lam": 3},
                        "source": {"kind": "tiny"}, "paired": True, "count": 3, "seed": 4, "confidence": 0.9}
    assert list(received["models"]) == ["m", "n"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--tables", "a", "--model", "m", "--dataset", "x=lambada=y", "--count", "1"])
