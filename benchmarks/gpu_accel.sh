#!/usr/bin/env bash
# Ingest forwards, plain and accelerated (issue 18, part 2), one device command of at most about 9 minutes:
#
#     bash benchmarks/gpu_accel.sh        # device tool, carry [".whl"] (the wheels gpu_suite.sh installs)
#
# Runs benchmarks/accel_bench.py on llava-onevision-qwen2-0.5b-ov (random weights, vision tower): each mode's
# vision tower, ingest with and without it against the bf16 roofline, and its agreement with the plain path
# (visual tokens, kept tokens, stored KV, first-token logits, greedy tokens).
# Environment: MODES (default: the script's), BUDGET (default 420 s), OUT (default runs/accel).
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
ARGS=(--device cuda --budget-s "${BUDGET:-420}" --out "$OUT")
[ -n "${MODES:-}" ] && ARGS+=(--modes "$MODES")
timeout -s INT -k 15 $(( ${BUDGET:-420} + 120 )) "$PY" benchmarks/accel_bench.py "${ARGS[@]}" 2>&1 | tee "$OUT/accel.log"
