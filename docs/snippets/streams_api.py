"""Streams as units: wall-clock time, questions over a window, list / export / import / delete, repair."""

import tempfile
from pathlib import Path

import numpy as np

import mukv
import mukv.streams as ms

root = Path(tempfile.mkdtemp())
store = root / "cams.mukv"
frames = np.random.default_rng(0).integers(0, 255, (12, 64, 64, 3), dtype=np.uint8)

# a camera whose frames carry wall-clock times: the stream takes its origin from them
times = np.datetime64("2026-12-06T08:00:00") + np.arange(12) * np.timedelta64(2, "s")
with mukv.Session(model="tiny-llava-ov", backend="lancedb", path=store, stream_id="gate",
                  thumbnails=96) as s:
    s.feed(frames, timestamps=times)  # one transaction: all of it is stored, or none
    answer = s.ask("who came in?", since="2026-12-06T08:00:10Z", until="2026-12-06T08:00:20Z")
    for b in answer.blocks[:3]:
        print(b.level, b.wall_start, round(b.score, 3))
    jpeg = s.thumbnail(5)  # frame 5, as a 96-pixel JPEG

# a reader beside the writer: never blocks it, sees its commits
with mukv.Session.open(store, stream_id="gate", read_only=True) as reader:
    print(reader.stats()["frames"], "frames;", reader.stats()["sources"][0]["kind"])

for info in ms.list_streams(str(store)):
    print(info["id"], info["frames"], info["wall_start"], "..", info["wall_end"], info["bytes"], "bytes")

ms.export_stream(str(store), "gate", str(root / "gate.export"))  # a self-contained, verified copy
ms.import_stream(str(root / "archive.mukv"), str(root / "gate.export"), stream_id="gate-2026-12-06")
ms.delete_stream(str(store), "gate")  # reclaims its disk
print([x["id"] for x in ms.list_streams(str(root / "archive.mukv"))])
print(ms.repair(str(root / "archive.mukv")).summary())  # what a repair would do: nothing here
