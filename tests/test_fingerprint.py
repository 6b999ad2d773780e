"""Stage code hashes: a stage's hash covers its own module and the hsconv modules it imports, nothing else."""

import shutil


from conftest import REPO
from hsconv import fingerprint


def test_closure_follows_package_imports_only():
    closure = fingerprint.module_closure("hsconv.figures.fig3")
    assert {"hsconv.figures.fig3", "hsconv.figures.style", "hsconv.io"} <= set(closure)
    assert "hsconv.metrics" not in closure and "hsconv.models" not in closure
    assert "hsconv.models" in fingerprint.module_closure("hsconv.hidden_states")


def test_hash_changes_with_the_code_it_covers(tmp_path, monkeypatch):
    copy = tmp_path / "hsconv"
    shutil.copytree(REPO / "src" / "hsconv", copy)
    monkeypatch.setattr(fingerprint, "_package_root", lambda: copy)
    before = {m: fingerprint.code_fingerprint(m) for m in ("hsconv.figures.fig3", "hsconv.metrics")}
    with open(copy / "figures" / "style.py", "a") as handle:
        handle.write("\n# edited\n")
    assert fingerprint.code_fingerprint("hsconv.figures.fig3") != before["hsconv.figures.fig3"]
    assert fingerprint.code_fingerprint("hsconv.metrics") == before["hsconv.metrics"]
