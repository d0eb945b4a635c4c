#!/usr/bin/env bash
# Regenerates the pictures of the documentation (run from the repository root).
set -euo pipefail
out=docs/img
mukv demo --minutes 20 --no-progress \
    --plot "$out/timeline.png" --plot-tokens "$out/tokens.png" --plot-memory "$out/memory.png"
tmp=$(mktemp -d)
# memory over an hour of stream: the small random model keeps it quick
mukv ingest "$tmp/hour.mukv" --synthetic 60 --chunk 128 --no-progress --model tiny-llava-ov \
    --backend-options '{"hot_bytes": 16777216}'
mukv inspect "$tmp/hour.mukv" --plot "$out/memory-disk.png"
rm -rf "$tmp"
