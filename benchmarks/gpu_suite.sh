#!/usr/bin/env bash
# One device command for the GPU machine: GPU tests, the Qwen2.5-VL-7B benchmark, the soak on the GPU,
# and (if time is left) a quick re-run of the 0.5B benchmark, each step with its own time limit.
#
# On the GPU machine (device tool, carry [".whl"]; finishes within MUKV_SUITE_BUDGET = 530 s):
#
#     bash benchmarks/gpu_suite.sh
#
# A CPU check of the same steps with the tiny presets (no wheels installed: the current environment
# must hold mukv with its disk extras; MUKV_SUITE_PYTHON picks the interpreter):
#
#     MUKV_SUITE_DEVICE=cpu bash benchmarks/gpu_suite.sh
#
# Steps (cuda; the CPU check runs the same ones on the tiny presets):
#
#   install  the carried wheels (.whl: pydantic, pydantic-core, typing-inspection, annotated-types, zarr, numcodecs,
#            donfig, google-crc32c, msgspec (zarr 3.4 imports it), lancedb 0.25, lance-namespace,
#            lance-namespace-urllib3-client, deprecation; about 40 MB: leave pylance out, it breaks the
#            64 MiB carry limit) into /tmp/site (MUKV_SUITE_SITE), then mukv (editable, no dependencies)
#   env      GPU, driver, versions of python, torch, transformers, lancedb, zarr, pyarrow, numpy
#   tests    pytest tests/gpu (fast path against the reference mode; the disk tier's CUDA staging; asking
#            while another stream feeds) and the CUDA tests of tests/disk (-k "gpu or cuda")
#   qwen     gpu_bench --presets qwen7b --backend lancedb: Qwen2.5-VL-7B (exact config, random weights),
#            full run: ingest with and without the vision tower against the reference mode, stage shares,
#            question latency at 1 h / 10 h / 100 h stored, plus 10 min ingested into the disk tier
#   soak     benchmarks/soak.py on the GPU: 8 memory + 2 lancedb streams of the 0.5B model, paced,
#            for up to 120 s (shorter if the steps before took longer than planned)
#   quick05  gpu_bench --presets 0.5b --quick --backend lancedb (only if at least 75 s are left)
#
# Files under $OUT (./runs/suite where OUT is unset), 7 at most:
#
#   suite.log                    every step's output and a status line per step (ok / failed rc / timed out / skipped)
#   bench-qwen7b.json, .md       the qwen step's results (saved after every part, so a cut run keeps what it measured)
#   soak-gpu.json                the soak's results (verdicts, samples, latencies)
#   bench-0.5b-quick.json, .md   the quick05 step's results
#   extras.tgz                   per-step logs, the benchmarks' profiles and result folders, pip list, nvidia-smi
set -u -o pipefail

T0=$(date +%s)
cd "$(dirname "$0")/.." || exit 1  # the repository root
DEV=${MUKV_SUITE_DEVICE:-cuda}
PY=${MUKV_SUITE_PYTHON:-python3}
SITE=${MUKV_SUITE_SITE:-/tmp/site}  # where the carried wheels go (cuda only)
OUT=${OUT:-runs/suite}
WORK=$(mktemp -d /tmp/mukv-suite.XXXXXX)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "$DEV" = cuda ]; then
    BUDGET=${MUKV_SUITE_BUDGET:-530}
    TEST_ENV=()
    BENCH_QWEN=(--presets qwen7b --backend lancedb)
    BENCH_05=(--presets 0.5b --quick --backend lancedb)
    SOAK=(--device cuda --model llava-onevision-qwen2-0.5b-ov --memory-streams 8 --disk-streams 2 --pace 10
          --hot-mib 256 --frames-per-feed 4 --grace 30)
    SOAK_MAX=120
else
    BUDGET=${MUKV_SUITE_BUDGET:-1500}
    TEST_ENV=(MUKV_GPU_TEST_DEVICE=cpu)
    BENCH_QWEN=(--device cpu --presets tiny-qwen --quick --backend lancedb)
    BENCH_05=(--device cpu --presets tiny-llava --quick --backend lancedb)
    SOAK=(--device cpu --model tiny-llava-ov --memory-streams 2 --disk-streams 1 --hot-mib 8 --grace 30)
    SOAK_MAX=20
fi

STATUS=()
left() { echo $((BUDGET - ($(date +%s) - T0))); }
log() { echo "[suite +$(($(date +%s) - T0))s] $*" | tee -a "$OUT/suite.log"; }

# step NAME CAP RESERVE MIN COMMAND...: run COMMAND for at most min(CAP, time left - RESERVE) seconds
# (SIGINT at the limit, SIGKILL 15 s later), or skip it when that is under MIN seconds.
step() {
    local name=$1 cap=$2 reserve=$3 min=$4
    shift 4
    local limit=$(($(left) - reserve))
    ((limit > cap)) && limit=$cap
    if ((limit < min)); then
        log "SKIP $name: ${limit}s left for it, it needs ${min}s"
        STATUS+=("$name: skipped")
        return 0
    fi
    local cmd="$*"
    log "START $name (limit ${limit}s): ${cmd:0:200}"
    local start rc
    start=$(date +%s)
    timeout -s INT -k 15 "$limit" env "$@" 2>&1 | tee "$WORK/$name.log" | tee -a "$OUT/suite.log"
    rc=$?
    local took=$(($(date +%s) - start)) what="ok"
    if ((rc == 124 || rc == 137)); then what="timed out after ${took}s"; elif ((rc != 0)); then what="failed (rc $rc)"; fi
    log "END $name: $what in ${took}s"
    STATUS+=("$name: $what (${took}s of ${limit}s)")
}

# keep a benchmark's results in $OUT under NAME.json / NAME.md (also after a cut run: it saves as it goes)
keep_bench() {
    [ -f "$WORK/$1/results.json" ] && cp "$WORK/$1/results.json" "$OUT/$1.json"
    [ -f "$WORK/$1/results.md" ] && cp "$WORK/$1/results.md" "$OUT/$1.md"
    return 0
}

finish() {
    log "summary (device $DEV, $(($(date +%s) - T0))s of ${BUDGET}s):"
    for s in "${STATUS[@]}"; do log "  $s"; done
    tar -czf "$OUT/extras.tgz" -C "$WORK" . 2>/dev/null
    rm -rf "$WORK"
}
trap finish EXIT

log "mukv GPU suite: device $DEV, budget ${BUDGET}s, python $PY, out $OUT, work $WORK"

if [ "$DEV" = cuda ]; then
    log "START install"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            .whl/*.whl 2>&1 | tee -a "$OUT/suite.log"; then
        log "END install: the carried wheels did not install (is .whl in carry?)"
        STATUS+=("install: failed")
        exit 1
    fi
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tee -a "$OUT/suite.log"; then
        log "END install: mukv did not install"
        STATUS+=("install: failed")
        exit 1
    fi
    log "END install"
    STATUS+=("install: ok ($(($(date +%s) - T0))s)")
fi

step env 30 0 5 "$PY" -c '
import platform, subprocess, torch, transformers, numpy, pyarrow
print("python", platform.python_version(), "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| numpy", numpy.__version__, "| pyarrow", pyarrow.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", "| cuda", torch.version.cuda)
for name in ("lancedb", "zarr", "numcodecs", "pydantic", "mukv"):
    try:
        m = __import__(name)
        print(name, getattr(m, "__version__", "?"), m.__file__)
    except Exception as exc:
        print(name, "NOT IMPORTABLE:", type(exc).__name__, exc)
import mukv.backends.disk  # the disk tier and its plugins load
'
{ nvidia-smi || true; "$PY" -m pip list 2>/dev/null; } >"$WORK/environment.txt" 2>&1

step tests 150 300 30 "${TEST_ENV[@]}" "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu tests/disk \
    -k "gpu or cuda"

step qwen 240 110 60 "$PY" benchmarks/gpu_bench.py --out "$WORK/bench-qwen7b" "${BENCH_QWEN[@]}"
keep_bench bench-qwen7b

SOAK_S=$(($(left) - 90))
((SOAK_S > SOAK_MAX)) && SOAK_S=$SOAK_MAX
if ((SOAK_S >= 20)); then
    step soak $((SOAK_S + 80)) 5 $((SOAK_S + 30)) "$PY" benchmarks/soak.py "${SOAK[@]}" --seconds "$SOAK_S" \
        --out "$OUT/soak-gpu.json"
else
    log "SKIP soak: ${SOAK_S}s left for its streams"
    STATUS+=("soak: skipped")
fi

step quick05 200 15 75 "$PY" benchmarks/gpu_bench.py --out "$WORK/bench-0.5b-quick" "${BENCH_05[@]}"
keep_bench bench-0.5b-quick
