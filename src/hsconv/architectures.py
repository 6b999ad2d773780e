"""The model families hsconv supports, and what each changes for the logit lens. Torch-free.

The logit lens reads exit l as ``softcap(LMHead(FinalNorm(h_l)))``; the families differ in where the final norm and
the decoder layers live, in whether the output logits are capped (Gemma 2/3: ``c·tanh(z/c)``), and in details that
need nothing here because the model applies them itself (Gemma's embedding scale ``√d`` is inside h_0; GPT-2 and
NeoX norms carry a bias, NeoX a parallel residual, OLMo 2 norms after each block). A family is recognised by the
``model_type`` of its HF config; anything else is refused by name before any job starts, because a lens that
misses an output transform (a logit scale, a second head) would report plausible but wrong numbers.

Each family is checked by ``tests/test_architectures.py`` on a tiny random model (docs/guide.md, "Model families", says what).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from hsconv.errors import InputError


class UnsupportedArchitectureError(InputError):
    """A model whose ``model_type`` is not one of :data:`FAMILIES`."""


@dataclass(frozen=True)
class Family:
    model_type: str  # the HF config's ``model_type``
    name: str  # what researchers call it (docs/guide.md's table of families)
    examples: str
    final_norm: str = "norm"  # the decoder's attribute holding the norm before the LM head
    layers: str = "layers"  # the decoder's attribute holding its blocks
    softcap: str | None = None  # the config attribute with the output-logit softcap, where the family has one
    norm_gain_offset: float = 0.0  # the final norm multiplies by (offset + weight): Gemma stores its gain minus 1


FAMILIES = {family.model_type: family for family in (
    Family("llama", "Llama", "Llama-3.2-1B/3B, SmolLM2"),
    Family("qwen2", "Qwen2 / Qwen2.5", "Qwen2-0.5B/1.5B, Qwen2.5-3B"),
    Family("qwen3", "Qwen3", "Qwen3-0.6B/1.7B"),
    Family("mistral", "Mistral", "Mistral-7B"),
    Family("gemma2", "Gemma 2", "gemma-2-2b", softcap="final_logit_softcapping", norm_gain_offset=1.0),
    Family("gemma3_text", "Gemma 3 (text)", "gemma-3-1b", softcap="final_logit_softcapping", norm_gain_offset=1.0),
    Family("phi3", "Phi-3", "Phi-3-mini"),
    Family("olmo2", "OLMo 2", "OLMo-2-1B"),
    Family("gpt2", "GPT-2", "gpt2, distilgpt2", final_norm="ln_f", layers="h"),
    Family("gpt_neox", "GPT-NeoX / Pythia", "pythia-160m/410m", final_norm="final_layer_norm"),
)}
# GGUF's `general.architecture` names where they differ from the HF model_type (transformers' GGUF loader maps them
# the same way).
GGUF_ARCHITECTURES = {"gemma3": "gemma3_text", "gptneox": "gpt_neox"}


def family_of(model_type: str | None, culprit: str = "") -> Family:
    """The family of ``model_type``, or a refusal that names it and lists what is supported."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    raise UnsupportedArchitectureError(
        f"model architecture {model_type!r} is not supported", culprit or str(model_type),
        f"use one of {', '.join(FAMILIES)} (docs/guide.md lists what is checked for each); a new family needs its "
        f"final norm, layers and output transform added to hsconv.architectures and a tiny model in the tests")


def family_of_config(config) -> Family:
    """The family of a loaded HF config."""
    return family_of(getattr(config, "model_type", None), type(config).__name__)


def model_type_of_dir(path: str | Path) -> str | None:
    """The ``model_type`` in a model directory's config.json (None where it has none)."""
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the model's config ({type(error).__name__}: {error})", str(config),
                         "give a directory written by `hsconv prepare-model` or `save_pretrained`") from None


def check_model_dir(path: str | Path) -> Family:
    return family_of(model_type_of_dir(path), str(Path(path) / "config.json"))


# GGUF value types (gguf-py's GGUFValueType): fixed sizes, 8 = string, 9 = array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def model_type_of_gguf(path: str | Path) -> str | None:
    """The HF model_type of a GGUF file, from its ``general.architecture`` key, reading the header only (the
    gguf package's reader maps every tensor first, which takes seconds for a 100 MB file)."""
    try:
        return _gguf_architecture(path)
    except (EOFError, KeyError, struct.error, UnicodeDecodeError, OverflowError, MemoryError, ValueError,
            RecursionError) as error:  # a corrupt length or type field, read as a number
        raise InputError(f"cannot read the GGUF header ({type(error).__name__}: {error})", str(path),
                         "the file is truncated or corrupt; reinstall or download it again") from None


def _gguf_architecture(path: str | Path) -> str | None:
    with open(path, "rb") as handle:
        def read(fmt):
            size = struct.calcsize(fmt)
            data = handle.read(size)
            if len(data) != size:
                raise EOFError("the header ends early")
            return struct.unpack(fmt, data)[0]

        file_size = os.fstat(handle.fileno()).st_size

        def read_string():
            size = read("<Q")
            if size > file_size - handle.tell():
                raise EOFError(f"a string of {size} bytes where {file_size - handle.tell()} are left")
            data = handle.read(size)
            if len(data) != size:
                raise EOFError("the header ends early")
            return data.decode("utf-8")

        def skip(kind):
            if kind == 8:
                handle.seek(read("<Q"), 1)
            elif kind == 9:
                element, count = read("<I"), read("<Q")
                if element in _GGUF_SIZES:
                    handle.seek(_GGUF_SIZES[element] * count, 1)
                else:
                    for _ in range(count):
                        skip(element)
            else:
                handle.seek(_GGUF_SIZES[kind], 1)

        handle.seek(4 + 4 + 8)  # magic, version, tensor count
        for _ in range(read("<Q")):
            key, kind = read_string(), read("<I")
            if key == "general.architecture" and kind == 8:
                architecture = read_string()
                return GGUF_ARCHITECTURES.get(architecture, architecture)
            skip(kind)
    return None
