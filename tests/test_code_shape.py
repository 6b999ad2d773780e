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


def import_graph(package_root=REPO / "src" / "hsconv") -> dict[str, set[str]]:
    """{module: the hsconv modules it imports}, every import counted, those inside functions too (a lazy import
    hides a cycle from Python, not from a reader)."""
    modules = {}
    for path in package_root.rglob("*.py"):
        parts = path.relative_to(package_root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {module for module in imported if module in modules and module not in (name, "hsconv")}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (its modules in import order, the first repeated at the end), or None."""
    state, path = {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"hsconv.readout", "hsconv.hidden_states", "hsconv.models", "hsconv.distill.train"} <= set(graph)
    assert "hsconv.readout" in graph["hsconv.hidden_states"]
    assert import_cycle(graph) is None, " -> ".join(import_cycle(graph))


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    (tmp_path / "hsconv" / "sub").mkdir(parents=True)
    (tmp_path / "hsconv" / "__init__.py").write_text("")
    (tmp_path / "hsconv" / "a.py").write_text("from hsconv.sub import b\n")
    (tmp_path / "hsconv" / "sub" / "__init__.py").write_text("")
    (tmp_path / "hsconv" / "sub" / "b.py").write_text("def f():\n    from hsconv.a import g\n")
    assert import_cycle(import_graph(tmp_path / "hsconv")) == ["hsconv.a", "hsconv.sub.b", "hsconv.a"]


def test_the_plotting_stages_run_without_torch():
    """The rules whose environment is envs/plot.yaml (hsconv without the `models` extra) call stages that import no
    torch, transformers or deepspeed: each such stage's parser is built (its function imported) with those
    uninstallable, as where they are not installed (a finder that refuses them: a ``None`` in ``sys.modules`` would
    also break libraries that only look whether torch was imported, such as scipy's array-API check)."""
    rules = "\n".join(path.read_text() for path in (REPO / "workflow" / "rules").glob("*.smk"))
    stages = sorted(set(re.findall(r'conda: "\.\./\.\./envs/plot\.yaml"\s+shell:\s+"hsconv ([a-z-]+)', rules)))
    assert len(stages) >= 8, stages
    script = f"""
import importlib.abc, sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in ("torch", "transformers", "deepspeed", "lm_eval"):
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, NotInstalled())
from hsconv.cli import build_parser
for stage in {stages!r}:
    build_parser([stage])  # imports the stage's function and builds its flags
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
