#!/usr/bin/env bash
# Resume (or start) mukv-tiny's training on every GPU of the device machine with data parallelism
# (torchrun, one process per GPU), the recipe of the shipped checkpoint (docs/mukv-tiny.md), then
# evaluate on the held-out clips and export. One device command (carry the pydantic wheels and,
# to resume, the checkpoint directory), e.g. on nvidia-h200-x4:
#
#     RESUME=runs/s3/t5/ckpt TL=470 bash benchmarks/train_tiny_gpus.sh
#
# Environment (defaults in brackets): RESUME [none: from scratch], TL training seconds [470],
# LR [1e-3], XQ extra questions per scene [1], KW --kind-weights [event=3,after=4], EV held-out
# clips per kind [100], W data workers per GPU [14], BATCH clips per GPU per step [128], WHEELS wheel
# folder [.whl-train], SETUP [1; 0 when the caller installed mukv already], S output folder [runs/train].
# KW= (empty) trains on every kind equally; EXTRA: more train_tiny.py arguments (e.g.
# "--retrieval 1"). The GPUs are those CUDA_VISIBLE_DEVICES shows, so two runs can share a machine.
# Files under $OUT (when set): <name of S>-ckpt.tar (checkpoint + export), <name of S>-log.tgz.
set -u
cd "$(dirname "$0")/.." || exit 1
WHEELS=${WHEELS:-.whl-train}
if [ "${SETUP:-1}" = 1 ]; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site || exit 1
  fi
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
S=${S:-runs/train}; mkdir -p "$S"
NP=$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))')
RES=(); [ -n "${RESUME:-}" ] && RES=(--resume "$RESUME")
KWA=(); KW=${KW-event=3,after=4}; [ -n "$KW" ] && KWA=(--kind-weights "$KW")
torchrun --standalone --nproc_per_node "$NP" benchmarks/train_tiny.py --shape small "${RES[@]}" \
  --steps 1000000 --time-limit "${TL:-470}" --lr-by-time --lr "${LR:-1e-3}" --warmup 100 --batch "${BATCH:-128}" \
  --workers "${W:-14}" --aux 1 --aux-lm 1 --vis-rms 1 --attn-sup 1 --attn-layers 1,2 --aux-mid 1 --query-aux 1 \
  --mid-layer 1 --extra-questions "${XQ:-1}" "${KWA[@]}" \
  --weights full=1,frames=0.5,mukv=0.5 --plain 0.2 --single 0.4 --eval-per-kind "${EV:-100}" --log-every 100 \
  --save-every 150 --out "$S/ckpt" --export "$S/export" ${EXTRA:-} > "$S/log" 2>&1
echo "rc $?"
grep -E '^\{"step"' "$S/log" | cut -c1-400 | tail -6; grep -E "trained steps|exported" "$S/log"
grep -A16 '^| kind' "$S/log"; grep -i -m5 "error\|Traceback" "$S/log"
N=$(basename "$S")
if [ -n "${OUT:-}" ]; then (cd "$S" && tar czf "$OUT/$N-log.tgz" log && tar cf "$OUT/$N-ckpt.tar" ckpt export); fi
