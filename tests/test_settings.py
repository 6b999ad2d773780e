"""Stage settings: one dataclass per config section, checked on load, and the CLI's flags built from the same fields."""

from __future__ import annotations

import json
import typing
from dataclasses import fields

import pytest

from hsconv.cli import STAGES, build_parser, stage_settings
from hsconv.settings import (
    DistillSettings,
    EvaluationSettings,
    HiddenStatesSettings,
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
    return build_parser().parse_args([stage, *REQUIRED[stage], *extra])


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
    parser = build_parser()
    subparsers = next(action for action in parser._actions if action.dest == "stage").choices
    for name in STAGES:
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


def test_the_default_config_leaves_the_precision_to_the_machine():
    import yaml

    from conftest import REPO

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    assert config["distill"]["precision"] == "auto" and config["layer_relevance"]["precision"] == "auto"
