"""Writes tests/data/legacy_store: a disk store written by mukv before KV codecs (issue 20).

Run with the code of commit 104a14b (main before codecs), e.g. from an export of that commit whose
``mukv``, ``plugins`` and ``backends`` folders are laid out as the installed package
(``pkg/mukv``, ``pkg/mukv/plugins``, ``pkg/mukv/backends``)::

    MUKV_PLUGINS=extractors,scorers,compressors,retrievers,models,policies,sources,memory_backend,evictors,disk_backend \\
        PYTHONPATH=/path/to/export/pkg python tests/data/make_legacy_store.py tests/data/legacy_store 104a14b

The store holds one stream ("cam") of 4 random 64x64 frames of the ``tiny-llava-ov`` preset
(random weights, seed 0) in bfloat16; ``expected.json`` beside it records the crc32 of every
block's KV as that code paged it in, and the answer it gave, for tests/disk/test_codecs_disk.py.
"""

import json
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

import mukv

out = Path(sys.argv[1])
frames = np.random.default_rng(20).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
with mukv.Session(model="tiny-llava-ov", backend="lancedb", path=out, stream_id="cam", dtype=torch.bfloat16,
                  device="cpu", backend_options={"shard_bytes": 1 << 15}) as s:  # small shards: a small file
    s.feed(frames)
    answer = s.ask("what happened?", max_new_tokens=4)
    crcs = {}
    for level in ("patch", "frame", "segment"):
        n = s.backend.count(level)
        kv = s.backend.load_kv(level, torch.arange(n))
        crcs[level] = [zlib.crc32(kv[i].contiguous().view(torch.int16).numpy().tobytes()) for i in range(n)]
    expected = {"written_by": f"mukv {mukv.__version__} at commit {sys.argv[2] if len(sys.argv) > 2 else '?'}", "answer": answer.text, "kv_crc32": crcs,
                "blocks": {lv: len(c) for lv, c in crcs.items()}}
(out.parent / "legacy_store_expected.json").write_text(json.dumps(expected, indent=1) + "\n")
print(json.dumps(expected["blocks"]), answer.text)
