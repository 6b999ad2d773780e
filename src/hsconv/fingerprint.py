"""A hash of the code a stage runs, so that Snakemake reruns a stage when (and only when) its code changes.

Snakemake tracks a rule's own text but not the package a ``shell:`` command calls. Rules pass
``code_fingerprint("hsconv.metrics")`` as a param: it hashes that module and every ``hsconv`` module it imports,
transitively, read from source without importing anything. What is hashed is each module's syntax tree without
docstrings, so an edit to comments, docstrings or layout changes no hash and reruns nothing.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from pathlib import Path

PACKAGE = "hsconv"


def _package_root() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # imports only the light hsconv/__init__.py
    return Path(next(iter(spec.submodule_search_locations)))


def _source_path(module: str) -> Path | None:
    """The file of an ``hsconv`` module, found on disk so that nothing heavy is imported."""
    relative = Path(*module.split(".")[1:])
    for candidate in (_package_root() / relative / "__init__.py", (_package_root() / relative).with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(module: str, tree: ast.Module, is_package: bool) -> set[str]:
    found = set()
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = ".".join(base[: len(base) - node.level + 1])
                prefix = f"{parent}.{node.module}" if node.module else parent
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


def module_closure(*modules: str) -> dict[str, Path]:
    """Every ``hsconv`` module reachable by imports from ``modules``, with its source file."""
    seen: dict[str, Path] = {}
    pending = list(modules)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        path = _source_path(name)
        if path is None:  # an imported attribute (``from hsconv.io import atomic_path``), not a module
            continue
        seen[name] = path
        tree = ast.parse(path.read_text())
        pending.extend(_imported_modules(name, tree, path.name == "__init__.py") - set(seen))
    return seen


def _strip_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def normalised_source(path: Path) -> str:
    """The module's code as its syntax tree, without comments, docstrings or formatting."""
    return ast.dump(_strip_docstrings(ast.parse(path.read_text())), include_attributes=False)


def code_fingerprint(*modules: str) -> str:
    """Short sha256 over the code of ``modules`` and their ``hsconv`` imports."""
    digest = hashlib.sha256()
    for name, path in sorted(module_closure(*modules).items()):
        digest.update(name.encode())
        digest.update(normalised_source(path).encode())
    return digest.hexdigest()[:16]
