#!/usr/bin/env bash
# Ingest forwards, plain and accelerated (issue 18, part 2), one device command of at most about 9 minutes:
#
#     bash benchmarks/gpu_accel.sh        # device tool, carry [".whl"] (the wheels gpu_suite.sh installs)
#
# Runs benchmarks/accel_bench.py on llava-onevision-qwen2-0.5b-ov (random weights, vision tower): each mode's
# vision tower, ingest with and without it against the bf16 roofline, and its agreement with the plain path
# (visual tokens, kept tokens, stored KV, first-token logits, greedy tokens). Before it, with KERNELS=1
# (default): the GPU tests of the Triton kernels and the pinned feed (gpu_tests.log) and the kernel benchmarks
# named in KERNEL_BENCHES (default "rope": rope_bench.py; also "swiglu", "attention"; their files: <name>.json).
# Environment: MODES (default: plain, the fastest measured set (fused_vision+fused_llm+fused_norms+fused_residual
# +fused_rope+graph_prefill) and that set with fused_layer_norm (the vision tower's layer norms as one-pass
# Triton kernels), twice each, alternated), REFERENCE_FRAMES (frames of the reference mode, the authors'
# path, for the 30x check; default 16), ABLATE (extra accel_bench flags, default none; e.g.
# --compare-encode-ahead: each mode with mukv.encode_ahead on and off, alternated), BUDGET (accel_bench's own
# budget; default 330 s with the kernel step, 420 s without), OUT (default runs/accel), KERNELS (0 skips
# the kernel step).
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${MUKV_SUITE_PYTHON:-python3}
SITE=${MUKV_SUITE_SITE:-/tmp/site}
OUT=${OUT:-runs/accel}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    > "$OUT/install.log" 2>&1 || { echo "the carried wheels did not install (is .whl in carry?)"; exit 1; }
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1 || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>/dev/null || true
if [ "${KERNELS:-1}" = 1 ]; then
    timeout -k 10 240 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_fused_rope.py \
        tests/gpu/test_gpu_pinned_feed.py tests/gpu/test_gpu_encode_ahead.py tests/gpu/test_gpu_fused_layer_norm.py \
        tests/gpu/test_gpu_fused_mlp.py 2>&1 | tail -20 | tee "$OUT/gpu_tests.log"
    for b in ${KERNEL_BENCHES:-rope}; do
        timeout -s INT -k 10 90 "$PY" "benchmarks/${b}_bench.py" --out "$OUT/$b.json" 2>&1 | tee -a "$OUT/kernels.log"
    done
fi
if [ "${KERNELS:-1}" = 1 ]; then BUDGET=${BUDGET:-330}; else BUDGET=${BUDGET:-420}; fi
ARGS=(--device cuda --budget-s "$BUDGET" --out "$OUT")
BEST=fused_vision+fused_llm+fused_norms+fused_residual
B=$BEST+fused_rope+graph_prefill
ARGS+=(--modes "${MODES:-plain,$B,$B+fused_layer_norm,$B,$B+fused_layer_norm}")
# shellcheck disable=SC2206
ARGS+=(${ABLATE:-})
ARGS+=(--reference-frames "${REFERENCE_FRAMES:-16}")
timeout -s INT -k 15 $(( BUDGET + 120 )) "$PY" benchmarks/accel_bench.py "${ARGS[@]}" 2>&1 | tee "$OUT/accel.log"
