"""The shape the code keeps so that a newcomer can read it: short rules and functions, and a workflow that passes
Snakemake's own linter."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

from conftest import REPO

MAX_RULE_LINES = 25
MAX_FUNCTION_LINES = 60


def rule_lengths() -> dict[str, int]:
    """Lines of every rule (its header to its last indented line) in the Snakefile and workflow/rules."""
    lengths = {}
    for path in [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]:
        lines = path.read_text().splitlines()
        for start, line in enumerate(lines):
            match = re.match(r"(?:use rule \w+ as |rule |checkpoint )(\w+)", line)
            if not match:
                continue
            end = start + 1
            while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()):
                end += 1
            while not lines[end - 1].strip():
                end -= 1
            lengths[f"{path.name}:{match.group(1)}"] = end - start
    return lengths


def function_lengths() -> dict[str, int]:
    lengths = {}
    for path in sorted((REPO / "src" / "hsconv").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{path.relative_to(REPO)}:{node.name}:{node.lineno}"] = node.end_lineno - node.lineno + 1
    return lengths


def test_no_rule_is_longer_than_25_lines():
    lengths = rule_lengths()
    assert len(lengths) >= 30  # the parser found the rules
    assert {name: n for name, n in lengths.items() if n > MAX_RULE_LINES} == {}


def test_no_function_is_longer_than_60_lines():
    lengths = function_lengths()
    assert len(lengths) >= 200
    assert {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES} == {}


def test_the_workflow_passes_snakemakes_linter():
    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--configfile", "configs/test.yaml"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr, \
        (result.stdout + result.stderr)[-3000:]
