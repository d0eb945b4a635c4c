#!/usr/bin/env bash
# benchmarks/serve_load.py on the GPU machine: simulated 0.5-fps cameras pushing over HTTP to `mukv serve`
# while questions arrive, with the exact llava-onevision-qwen2-0.5b-ov architecture (random weights,
# vision tower included).
#
# On the GPU machine (device tool, carry [".whl"], about 8 minutes):
#
#     bash benchmarks/gpu_serve.sh
#
# .whl must hold, besides the wheels of benchmarks/gpu_suite.sh (pydantic, zarr, numcodecs, donfig,
# google-crc32c, lancedb 0.25, lance-namespace, deprecation), the serving stack for Python 3.12:
#
#     pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl \
#         fastapi starlette uvicorn h11 httpx httpcore anyio sniffio idna certifi python-multipart \
#         annotated-types typing-inspection annotated-doc opentelemetry-api (fastapi 0.165 imports it)
#
# Environment: STREAMS (default 64), MINUTES (stream minutes per camera, default 5), RATE (questions
# per second, default 2), MODEL (default llava-onevision-qwen2-0.5b-ov), OUT (default runs/serve).
# A CPU check of the script: MUKV_SERVE_DEVICE=cpu MODEL=mukv-tiny STREAMS=2 MINUTES=2 bash benchmarks/gpu_serve.sh
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
DEV=${MUKV_SERVE_DEVICE:-cuda}
PY=${PYTHON:-python3}
OUT=${OUT:-runs/serve}
SITE=${MUKV_SITE:-/tmp/site}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "$DEV" = cuda ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "the carried wheels did not install (is .whl in carry?)"; exit 1; }
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>/dev/null || true
"$PY" benchmarks/serve_load.py --device "$DEV" --model "${MODEL:-llava-onevision-qwen2-0.5b-ov}" \
    --streams "${STREAMS:-64}" --minutes "${MINUTES:-5}" --question-rate "${RATE:-2}" --questions 6 \
    --max-new-tokens 8 --out "$OUT/serve-load-$DEV.json" 2>&1 | tee "$OUT/serve-load.log"
