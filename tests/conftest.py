from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
TINY_SOURCE = {"kind": "tiny", "architecture": "llama", "hidden_size": 32, "intermediate_size": 64, "num_layers": 3,
               "num_heads": 4, "num_kv_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": True,
               "seed": 0}

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def local_runs_ignore_the_hosts_slurm(request, tmp_path_factory):
    """The tests run Snakemake on this machine, and Snakemake imports every installed executor plugin; the Slurm
    plugin runs `scontrol show config` on import with a 10 s timeout, which a Slurm configuration naming a controller
    that does not answer makes every Snakemake start wait out. Unless the session runs the Slurm tests (marker
    `slurm`, which need the host's configuration), scontrol reads an empty configuration instead and fails at once."""
    if any(item.get_closest_marker("slurm") for item in request.session.items):
        yield
        return
    empty = tmp_path_factory.mktemp("slurm") / "slurm.conf"
    empty.write_text("")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(empty))
        yield


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"shared data file {path} not present")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from hsconv.models import prepare_model

    return prepare_model("tiny", TINY_SOURCE, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from hsconv.models import load_model

    return load_model(tiny_model_dir)


# CI samples the model families of the heavy per-family checks (.ci/run draws them by a printed seed; the default's
# own family, llama, always among them): HSCONV_HEAVY_FAMILIES=llama,gemma2,gpt2 keeps those families' heavy tests and
# deselects the others'. Unset (as in `pytest -m heavy` by hand), every family runs.
HEAVY_FAMILIES_ENV = "HSCONV_HEAVY_FAMILIES"


def pytest_collection_modifyitems(config, items):
    families = os.environ.get(HEAVY_FAMILIES_ENV)
    if not families:
        return
    keep = set(families.split(","))
    deselected = [item for item in items if item.get_closest_marker("heavy") is not None
                  and getattr(item, "callspec", None) is not None
                  and item.callspec.params.get("family_model", next(iter(keep))) not in keep]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]
