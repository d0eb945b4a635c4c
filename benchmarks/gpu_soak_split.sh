#!/usr/bin/env bash
# Two GPU soaks in one device command, to attribute host memory growth (docs/hardening.md): memory
# streams alone, then lancedb streams alone, each for SECONDS_EACH [240] on the 0.5B architecture, with
# pinned host memory recorded in every sample (a CPU check of the flow: DEVICE=cpu MODEL=tiny-llava-ov
# SECONDS_EACH=8 bash benchmarks/gpu_soak_split.sh). Carry the wheels of benchmarks/gpu_suite.sh (.whl):
#
#     bash benchmarks/gpu_soak_split.sh
#
# PARALLEL=1 runs the two at once (separate processes, so each one's host memory is its own);
# SETUP=0 skips the installs when the caller made them.
# Files under $OUT (./runs/soak-split where OUT is unset): soak-memory.json, soak-disk.json, soak-split.log.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
if [ "${DEVICE:-cuda}" = cuda ] && [ "${SETUP:-1}" = 1 ]; then  # the device machine: carried wheels, then mukv itself
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
fi
O=${OUT:-runs/soak-split}; mkdir -p "$O"
SEC=${SECONDS_EACH:-240}
COMMON=(--device "${DEVICE:-cuda}" --model "${MODEL:-llava-onevision-qwen2-0.5b-ov}" --pace 10 --hot-mib 256 --frames-per-feed 4
        --grace 30 --sample-every 10 --lance-cache-mib 16 --seconds "$SEC")
memory() { python3 benchmarks/soak.py "${COMMON[@]}" --memory-streams 8 --disk-streams 0 --out "$O/soak-memory.json"; }
disk() { python3 benchmarks/soak.py "${COMMON[@]}" --memory-streams 0 --disk-streams 4 --out "$O/soak-disk.json"; }
if [ "${PARALLEL:-0}" = 1 ]; then
  memory > "$O/soak-memory.log" 2>&1 & m=$!
  disk > "$O/soak-disk.log" 2>&1; d=$?
  wait $m; rc=$?
  cat "$O/soak-memory.log" "$O/soak-disk.log" > "$O/soak-split.log"; rm -f "$O/soak-memory.log" "$O/soak-disk.log"
  cat "$O/soak-split.log"; [ $rc = 0 ] && [ $d = 0 ]
else
  memory 2>&1 | tee "$O/soak-split.log"
  disk 2>&1 | tee -a "$O/soak-split.log"
fi
