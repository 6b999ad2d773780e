"""A stage's command-line flags, generated from its function's signature (``hsconv <stage>`` runs it).

Every parameter of a stage function is a flag named after it (``model_dir`` → ``--model-dir``), required where the
parameter has no default. Its type, range and choices come from the annotation: ``int``, ``float``, ``str``, a path,
``bool``, a ``Literal`` of :mod:`hsconv.names`, a list, or one of the types below for values a shell passes as text
(``JSON``, ``Labels``, ``Datasets``, ``Limits``, ``Device``); ``@flags`` beside the function adds what a signature
cannot say: the help, a number's range, another flag name, a converter. A stage that reads a config section
(``@flags(section="metrics")``) takes it whole as ``--settings`` JSON (as the workflow passes it), every field of that
section's dataclass is a flag of its own that wins over the JSON, and the function receives the fields it names.
Torch-free, like the functions' own modules' top levels that the plotting stages import.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Callable, Literal, NewType

from hsconv.errors import NULLS, device, integer, real
from hsconv.names import EvaluationKind, choices

JSON = NewType("JSON", dict)  # a JSON object, e.g. a model's source: --source '{"kind": "hub", ...}'
Labels = NewType("Labels", dict)  # NAME=LABEL ... in order: the models a figure draws and their labels
Datasets = NewType("Datasets", dict)  # NAME=KIND=PARQUET ...: evaluation texts and their kind
Limits = NewType("Limits", dict)  # NAME=N ...: only the first N documents of a data set
Device = NewType("Device", str)  # cpu, cuda, cuda:N or mps
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def flags(section: str | None = None, **specs: str | dict) -> Callable:
    """Mark a function as a stage's: ``section`` is the config section it reads, ``specs`` per parameter its help (a
    string) or :func:`flag`'s options."""
    def mark(function: Callable) -> Callable:
        function.stage_flags = (section, {name: flag(spec) if isinstance(spec, str) else spec
                                          for name, spec in specs.items()})
        return function
    return mark


def flag(help: str = "", **options) -> dict:
    """A parameter's help and options: ``name`` (the flag, if not ``--`` + the parameter's), a number's range in the
    schema's words (:data:`BOUNDS`), any argparse keyword (``type``, ``metavar``, ...)."""
    return {"help": help, **options}


def table_stem(text: str) -> Path:
    """``--out x.parquet`` of a table stage: the stem its .parquet, .csv and .md are written to."""
    return Path(text).with_suffix("")


def add_flags(parser: argparse.ArgumentParser, function: Callable) -> None:
    """Every parameter of ``function`` (less its section's fields, which :func:`add_settings` adds) as a flag."""
    section, specs = getattr(function, "stage_flags", (None, {}))
    settings_class = add_settings(parser, section) if section else None
    taken = {item.name for item in fields(settings_class)} if settings_class else set()
    for parameter in inspect.signature(function).parameters.values():
        if parameter.name in taken or parameter.kind is parameter.VAR_KEYWORD:
            continue
        spec = dict(specs.get(parameter.name, {}))
        name = spec.pop("name", "--" + parameter.name.replace("_", "-"))
        bounds = {key: spec.pop(key) for key in BOUNDS if key in spec}
        required = spec.pop("required", parameter.default is parameter.empty)
        default = None if parameter.default is parameter.empty else parameter.default
        options = _options(_annotation(function, parameter), bounds, required, default)
        if default not in (None, False):
            spec["help"] = f"{spec['help']} (default: {default})" if spec.get("help") else f"default: {default}"
        parser.add_argument(name, dest=parameter.name, required=required,
                            **({} if required else {"default": default}), **{**options, **spec})
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # added by the `deepspeed` launcher


def call(function: Callable, args: argparse.Namespace):
    """``function`` with the parsed flags: its parameters by name, its section's fields that it names."""
    parameters = inspect.signature(function).parameters
    values = {name: getattr(args, name) for name in parameters if hasattr(args, name)}
    for name, parameter in parameters.items():
        kind = _without_none(_annotation(function, parameter))
        if kind in (Labels, Datasets, Limits) and values.get(name) is not None:
            values[name] = dict(values[name])
        elif inspect.isclass(kind) and hasattr(kind, "from_dict") and isinstance(values.get(name), dict):
            values[name] = kind.from_dict(values[name])
    if getattr(args, "settings_class", None):
        settings = stage_settings(args)
        values.update({item.name: getattr(settings, item.name) for item in fields(settings) if item.name in parameters})
    return function(**values)


def add_settings(parser: argparse.ArgumentParser, section: str):
    """A config section's settings: ``--settings`` takes the section whole, and every field of its dataclass is also a
    flag of its own (type, range, choices and help from the field), which wins over the JSON."""
    from hsconv.settings import SECTIONS

    settings_class = SECTIONS[section]
    parser.set_defaults(settings_class=settings_class, settings_section=section)
    parser.add_argument("--settings", type=json_object, default={},
                        help=f"the config's {section} section, as JSON (the flags below win over it)")
    group = parser.add_argument_group(f"{section} settings (hsconv.settings.{settings_class.__name__})")
    hints = typing.get_type_hints(settings_class)
    for item in fields(settings_class):
        group.add_argument("--" + item.name.replace("_", "-"), dest=item.name, default=argparse.SUPPRESS,
                           help=f"{item.metadata['help']} (default: {item.default})",
                           **_options(hints[item.name], item.metadata, False, item.default, settings=True))
    return settings_class


def stage_settings(args: argparse.Namespace):
    """The stage's settings dataclass: its config section (``--settings``) with the flags given on top."""
    from hsconv.settings import from_section

    flags_given = {item.name: getattr(args, item.name) for item in fields(args.settings_class)
                   if hasattr(args, item.name)}
    return from_section(args.settings_class, {**args.settings, **flags_given}, args.settings_section)


def _annotation(function: Callable, parameter: inspect.Parameter):
    kind = parameter.annotation
    return eval(kind, function.__globals__) if isinstance(kind, str) else kind  # noqa: S307 (our own annotations)


def _without_none(kind):
    """The type of a union: a path (``str | os.PathLike``) is a ``str``; ``X | None`` is ``X``."""
    if not (isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union):
        return kind
    others = [option for option in typing.get_args(kind) if option is not type(None)]
    return str if str in others or os.PathLike in others else others[0]


def _options(kind, bounds: dict, required: bool, default, settings: bool = False) -> dict:
    """argparse's type, choices, action or nargs for an annotation (numbers' ranges from ``bounds``; for ``X | None``,
    "none" stands for None)."""
    optional = type(None) in typing.get_args(kind)
    kind = _without_none(kind)
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction if settings or default is True else "store_true"}
    texts = {JSON: json_object, Labels: name_label, Datasets: dataset_spec, Limits: limit_spec, Device: device}
    if kind in texts:
        many = kind in (Labels, Datasets, Limits)
        return {"type": texts[kind], **({"nargs": "*" if kind is Limits else "+"} if many else {})}
    if typing.get_origin(kind) is Literal:
        return {"choices": choices(kind)}
    if typing.get_origin(kind) in (list, tuple):
        return {"nargs": "+" if required or settings else "*",
                "type": _scalar(typing.get_args(kind)[0], bounds, False)}
    if inspect.isclass(kind) and hasattr(kind, "from_dict") or kind is dict:
        return {"type": json_object}
    return {"type": _scalar(kind, bounds, optional)}


def _scalar(kind, bounds: dict, optional: bool):
    if kind is int:
        low = bounds.get("minimum", bounds["exclusiveMinimum"] + 1 if "exclusiveMinimum" in bounds else None)
        high = bounds.get("maximum", bounds["exclusiveMaximum"] - 1 if "exclusiveMaximum" in bounds else None)
        return integer(low, high, optional=optional)
    if kind is float:
        return real(bounds.get("minimum", bounds.get("exclusiveMinimum", float("-inf"))),
                    bounds.get("maximum", bounds.get("exclusiveMaximum", float("inf"))),
                    open_low="exclusiveMinimum" in bounds, open_high="exclusiveMaximum" in bounds)
    return optional_str if optional else str


# Values a shell passes as text.

def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON {type(value).__name__}, where an object {{...}} is needed")
    return value


def name_label(text: str) -> tuple[str, str]:
    name, _, label = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r} has no name: give NAME=LABEL")
    return name, label or name


def optional_str(text: str) -> str | None:
    return None if text in NULLS else text


def dataset_spec(text: str) -> tuple[str, tuple[str, str]]:
    """NAME=KIND=PARQUET."""
    parts = text.split("=", 2)
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=KIND=PARQUET")
    if parts[1] not in choices(EvaluationKind):
        raise argparse.ArgumentTypeError(f"{text!r}: KIND {parts[1]!r} is not {' or '.join(choices(EvaluationKind))}")
    return parts[0], (parts[1], parts[2])


def limit_spec(text: str) -> tuple[str, int]:
    """NAME=N."""
    name, _, count = text.partition("=")
    try:
        return name, integer(1)(count)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=N with N an integer ≥ 1 ({error})") from None

