"""What every benchmark shares: the machine's matrix-multiply limit, arithmetic counts, spreads, fresh processes.

Arithmetic is counted in floating-point operations (a multiply-add is 2) from the model's config:
- the decoder, per token: 2 · N (N = parameters outside the embedding and the LM head) plus attention's
  QKᵀ and AV products over the causal half of the context, 2 · L · T · d; backward is twice the forward;
- one exit head, per token: 2 · d · V forward; its backward (gradient to the state and to the weight) 4 · d · V.
The limit is the best rate of a large float32 ``torch.matmul`` timed in the same process, on the same threads.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"


def matmul_limit(size: int | None = None, repeats: int = 7, dtype: str | None = None) -> dict:
    """GFLOP/s of a ``size × size`` matmul (after one warm-up), each repeat timed alone: float32 on the CPU,
    bfloat16 on a GPU (the precision each runs distillation in), unless ``dtype`` names another."""
    import torch

    cuda = torch.cuda.is_available()
    size = size or (8192 if cuda else 2048)
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, dtype) if dtype else torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    torch.matmul(a, b)
    rates = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.matmul(a, b)
        if cuda:
            torch.cuda.synchronize()
        rates.append(2 * size**3 / (time.perf_counter() - started) / 1e9)
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "device": device, "gflops": rates,
            "best_gflops": max(rates), "threads": torch.get_num_threads()}


def model_shape(config) -> dict:
    """Layers, width, vocabulary and the decoder's parameter count N from a HF config."""
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or d // heads
    attention = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2  # q, o; k, v
    mlp = 3 * d * config.intermediate_size  # gate, up, down
    return {"layers": layers, "d": d, "vocab": vocab, "decoder_params": layers * (attention + mlp)}


def decoder_flops(shape: dict, seq: int) -> float:
    """Forward FLOPs per token of the decoder (no head) at context length ``seq``."""
    return 2 * shape["decoder_params"] + 2 * shape["layers"] * seq * shape["d"]


def head_flops(shape: dict) -> float:
    """Forward FLOPs per token of one exit head (the d × V product)."""
    return 2 * shape["d"] * shape["vocab"]


def compiled_note(run: dict) -> str:
    """How a distillation's layers and loss kernels ran, from its record (``compiled``, ``compiled_layers``); nothing
    for a record older than the ``compile`` setting. ``compiled_layers`` missing with ``compiled`` true: the runs of
    2026-12-08 that recorded one flag for both."""
    if run.get("compiled") is None:
        return ""
    if not run["compiled"]:
        return ", nothing compiled"
    return ", layers and loss kernels compiled" if run.get("compiled_layers", True) else ", loss kernels compiled"


def spread(values, fmt: str = "{:,.1f}") -> str:
    """``min / median / max`` (one value alone when there is one)."""
    values = list(values)
    if len(values) == 1:
        return fmt.format(values[0])
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def run_fresh(code: str, arguments: dict, timeout: float | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (so that its peak resident memory is its own); its last stdout line is
    JSON. A process the kernel killed for memory comes back as ``{"error": ...}``."""
    out = subprocess.run([sys.executable, "-c", code, json.dumps(arguments)], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        reason = "killed by the kernel (out of memory)" if out.returncode == -9 else \
            (out.stderr.strip().splitlines() or ["no message"])[-1]
        return {"error": f"exit {out.returncode}: {reason}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def environment() -> dict:
    import torch
    import transformers

    with open("/proc/cpuinfo") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "unknown")
    return {"cpu": cpu, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
