#!/usr/bin/env bash
# Many cameras on one GPU (issue 18), one device command of at most about 7 minutes (install included):
#
#     bash benchmarks/gpu_scheduler.sh            # device tool, carry [".whl"] (the wheels gpu_suite.sh installs)
#     MUKV_SUITE_DEVICE=cpu bash benchmarks/gpu_scheduler.sh   # a CPU check of the same steps, tiny model
#
# Steps, each with its own time limit:
#   install  the carried wheels into /tmp/site, then mukv (editable, no dependencies)   [cuda only]
#   bench    benchmarks/scheduler_bench.py on llava-onevision-qwen2-0.5b-ov (random weights, vision tower):
#            one stream's ingest against the bf16 roofline (chunks of 256 frames, with and without the
#            vision tower); 100..600 cameras at 0.5 fps, the ingest scheduler and independent sessions under
#            the same load and questions (32-token answers); questions at 1 h stored, idle and under load.
#            The script skips what would run past its own budget (BUDGET seconds, default 330) and lists it.
# Environment: STREAMS (default "100 200 300 400 500 600"), SECONDS_PER_N (default 20), BATCH (scheduler
# max_batch_frames, default 32), BUDGET (default 330), ACCEL (mukv.accel names, e.g. fp8_vision; default none),
# OUT (default runs/scheduler).
# Files under $OUT: scheduler.log, scheduler.json, scheduler.md, gpu.txt
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
DEV=${MUKV_SUITE_DEVICE:-cuda}
PY=${MUKV_SUITE_PYTHON:-python3}
SITE=${MUKV_SUITE_SITE:-/tmp/site}
OUT=${OUT:-runs/scheduler}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log() { echo "[scheduler +${SECONDS}s] $*" | tee -a "$OUT/scheduler.log"; }

if [ "$DEV" = cuda ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        2>&1 | tee -a "$OUT/scheduler.log" || { log "the carried wheels did not install (is .whl in carry?)"; exit 1; }
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tee -a "$OUT/scheduler.log" || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>/dev/null || true
    # shellcheck disable=SC2206
    BENCH=(--device cuda --preset llava-onevision-qwen2-0.5b-ov --streams ${STREAMS:-100 200 300 400 500 600}
           --seconds "${SECONDS_PER_N:-20}" --batch-frames "${BATCH:-32}" --budget-s "${BUDGET:-330}")
    LIMIT=$(( ${BUDGET:-330} + 90 ))
    [ -n "${ACCEL:-}" ] && BENCH+=(--accel "$ACCEL")
else
    BENCH=(--device cpu --preset tiny-llava-ov --streams 2 --seconds 4 --answer-tokens 4 --chunk 16 --single-frames 16
           --reps 1 --store-hours 0.01 --store-questions 2 --load-streams 2 --load-seconds 4 --budget-s 120)
    LIMIT=240
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "| cuda", torch.version.cuda,
          "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' 2>&1 | tee -a "$OUT/scheduler.log"

log "START bench"
timeout -s INT -k 15 "$LIMIT" "$PY" benchmarks/scheduler_bench.py "${BENCH[@]}" --out "$OUT" 2>&1 | tee -a "$OUT/scheduler.log"
log "END bench: rc ${PIPESTATUS[0]}"
