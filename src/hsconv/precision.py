"""Which floating-point precision a stage computes in, where the config says ``auto``: bf16 only where the device
multiplies it natively. Torch is imported lazily, so that config checks stay light."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def bf16_is_native(device: str = "cpu") -> bool:
    """Whether ``device`` multiplies bf16 matrices natively: a CUDA GPU with bf16, or a CPU with avx512_bf16 or AMX.

    oneDNN's own ``_is_mkldnn_bf16_supported`` is not the test: it says True on any avx512 CPU, where bf16 runs but
    is emulated (measured on an avx512 Xeon without avx512_bf16: a 2048² bf16 matmul about 4× slower than float32)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    capabilities = torch.cpu.get_capabilities()  # cpuinfo's flags, the same on every OS
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """``float32`` or ``bfloat16`` for a setting of ``auto``, ``float32`` or ``bfloat16``."""
    if precision == "auto":
        return "bfloat16" if bf16_is_native(device) else "float32"
    if precision == "bfloat16" and not bf16_is_native(device):
        log.warning("bfloat16 on %s is emulated and slow (no avx512_bf16/AMX); precision auto would choose float32",
                    device)
    return precision
