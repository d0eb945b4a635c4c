#!/usr/bin/env bash
# KV codecs on the GPU machine (issue 20), one device command of about 6 minutes:
#
#     bash benchmarks/gpu_codecs.sh            # device tool, carry [".whl"] (the wheels gpu_suite.sh installs)
#     MUKV_SUITE_DEVICE=cpu bash benchmarks/gpu_codecs.sh   # a CPU check of the same steps, tiny model
#
# Steps, each with its own time limit:
#   install  the carried wheels into /tmp/site, then mukv (editable, no dependencies)   [cuda only]
#   tests    pytest tests/gpu/test_gpu_codecs.py (GPU and CPU encode/decode bit for bit; page-in decodes
#            on the device)
#   bench    benchmarks/codec_bench.py on llava-onevision-qwen2-0.5b-ov (random weights): decode throughput,
#            first-token logit error and greedy agreement per codec, page-in GB/s (stored and decoded) and
#            time to first token with every block read from disk
# Environment: CODECS (codec_bench.py --codecs; default its list), OUT.
# Files under $OUT (./runs/codecs where OUT is unset): codecs.log, codecs.json, codecs.md
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
DEV=${MUKV_SUITE_DEVICE:-cuda}
PY=${MUKV_SUITE_PYTHON:-python3}
SITE=${MUKV_SUITE_SITE:-/tmp/site}
OUT=${OUT:-runs/codecs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log() { echo "[codecs +${SECONDS}s] $*" | tee -a "$OUT/codecs.log"; }

if [ "$DEV" = cuda ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        2>&1 | tee -a "$OUT/codecs.log" || { log "the carried wheels did not install (is .whl in carry?)"; exit 1; }
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tee -a "$OUT/codecs.log" || exit 1
    TESTS=()
    BENCH=(--device cuda --preset llava-onevision-qwen2-0.5b-ov --questions 24 --minutes 6 --store-minutes 10)
else
    TESTS=(MUKV_GPU_TEST_DEVICE=cpu)
    BENCH=(--device cpu --preset tiny-llava-ov --questions 4 --minutes 1 --store-minutes 1 --repeats 3)
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "| cuda", torch.version.cuda,
          "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' 2>&1 | tee -a "$OUT/codecs.log"

log "START tests"
timeout -s INT -k 15 150 env "${TESTS[@]}" "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_codecs.py \
    2>&1 | tee -a "$OUT/codecs.log"
log "END tests: rc ${PIPESTATUS[0]}"

[ -n "${CODECS:-}" ] && BENCH+=(--codecs "$CODECS")  # default: codec_bench.py's list (kivi4 key_bits 6 included)
log "START bench"
timeout -s INT -k 15 330 "$PY" benchmarks/codec_bench.py "${BENCH[@]}" --out "$OUT" 2>&1 | tee -a "$OUT/codecs.log"
log "END bench: rc ${PIPESTATUS[0]}"
