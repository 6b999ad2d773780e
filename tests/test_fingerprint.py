"""Stage code hashes: a stage's hash covers its own module and the hsconv modules it imports, nothing else."""

import shutil


from conftest import REPO
from hsconv import fingerprint


def test_closure_follows_package_imports_only():
    closure = fingerprint.module_closure("hsconv.figures.movement")
    assert {"hsconv.figures.movement", "hsconv.figures.style", "hsconv.io"} <= set(closure)
    assert "hsconv.metrics" not in closure and "hsconv.models" not in closure
    assert "hsconv.models" in fingerprint.module_closure("hsconv.hidden_states")


def test_hash_changes_with_the_code_it_covers(tmp_path, monkeypatch):
    copy = tmp_path / "hsconv"
    shutil.copytree(REPO / "src" / "hsconv", copy)
    monkeypatch.setattr(fingerprint, "_package_root", lambda: copy)
    before = {m: fingerprint.code_fingerprint(m) for m in ("hsconv.figures.movement", "hsconv.metrics")}
    style = copy / "figures" / "style.py"
    # comments, docstrings and layout are not code: no hash changes
    source = style.read_text()
    docstring = source.split('"""')[1]
    style.write_text(source.replace(docstring, "Reworded.").replace("\n\n\n", "\n\n\n\n") + "\n# edited\n")
    assert fingerprint.code_fingerprint("hsconv.figures.movement") == before["hsconv.figures.movement"]
    # a change to code is, for the modules that import it and no others
    with open(style, "a") as handle:
        handle.write("\nDEFAULT_DPI = 200\n")
    assert fingerprint.code_fingerprint("hsconv.figures.movement") != before["hsconv.figures.movement"]
    assert fingerprint.code_fingerprint("hsconv.metrics") == before["hsconv.metrics"]
