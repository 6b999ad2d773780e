"""The config reference (docs/config.md), generated from the schema the Snakefile validates every config against, so
that it cannot fall behind it: ``python -m hsconv.config_reference > docs/config.md`` (a test compares the two)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
HEADER = """# Config reference

Every key of `config.yaml` (and of a preset given with `--configfile`), generated from
`workflow/schemas/config.schema.yaml` by `python -m hsconv.config_reference > docs/config.md`. The Snakefile validates
the config against that schema on load: an unknown key or a value out of range is refused with one line naming it.
`<name>` stands for a name you choose (a model, a data set, a recipe).
"""


def _kind(node: dict) -> str:
    if "enum" in node:
        return "one of " + ", ".join(f"`{value}`" for value in node["enum"])
    if "const" in node:
        return f"`{node['const']}`"
    kind = node.get("type", "")
    kind = " or ".join(kind) if isinstance(kind, list) else kind
    bounds = [f"{sign} {node[key]}" for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"),
                                                       ("maximum", "≤"), ("exclusiveMaximum", "<")) if key in node]
    items = node.get("items", {})
    if kind == "array" and "enum" in items:
        kind += " of " + ", ".join(f"`{value}`" for value in items["enum"])
    elif kind == "array" and "type" in items:
        kind += f" of {items['type']}"
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def _text(value) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def _rows(node: dict, key: str, defs: dict, rows: list[tuple[str, str, str, str]]) -> None:
    """Depth first: the node's own row (where it has a description, a type or a default), then its keys."""
    if "$ref" in node:
        node = {**defs[node["$ref"].rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}}
    if key and ({"description", "default", "enum"} & set(node) or node.get("type") not in (None, "object")):
        default = f"`{json.dumps(node['default'], ensure_ascii=False)}`" if "default" in node else ""
        rows.append((f"`{key}`", _kind(node), default, _text(node.get("description", ""))))
    prefix = f"{key}." if key else ""
    for name, child in node.get("properties", {}).items():
        if child:  # `kind: {}` under an if/then restates the key already listed
            _rows(child, prefix + name, defs, rows)
    if isinstance(node.get("additionalProperties"), dict):
        _rows(node["additionalProperties"], prefix + "<name>", defs, rows)
    for branch in node.get("allOf", []):
        condition = branch.get("if", {}).get("properties", {})
        label = ", ".join(f"{name}: {value.get('const')}" for name, value in condition.items())
        _rows(branch.get("then", {}), f"{key} ({label})" if label else key, defs, rows)


def config_reference(schema_path: str | Path = SCHEMA) -> str:
    """The reference as Markdown: one table per top-level section, a row per key."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    defs = schema.get("$defs", {})
    parts = [HEADER]
    for section, node in schema["properties"].items():
        rows: list[tuple[str, str, str, str]] = []
        _rows(node, section, defs, rows)
        lines = [f"## `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in rows]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(config_reference())
