"""A long stream on the disk tier: bounded hot memory, everything else on disk."""

import os

import mukv
from mukv import plots
from mukv.bench import Stream, StreamSpec

# A week by default (302,400 frames at 0.5 fps); try MINUTES=60 first.
MINUTES = float(os.environ.get("MINUTES", 7 * 24 * 60))
stream = Stream(StreamSpec(seed=0, minutes=MINUTES))  # rendered lazily, as read

session = mukv.Session(
    model="tiny-llava-ov",
    backend="lancedb",
    path="week.mukv",  # a local folder, or an s3:// URI
    stream_id="cam1",
    backend_options={"hot_bytes": 64 << 20},  # hot tier: 64 MiB (GPU memory on CUDA)
)
start = session.stats()["frames"]  # a rerun continues where the last one stopped
for first, frames in stream.iter_frames(start=start, batch=256):
    session.feed(frames)
    plots.record_memory(session)  # memory over time, kept in the store
session.close()  # flushes everything to disk

# Later, in any process: the store records the model and the configuration.
with mukv.Session.open("week.mukv", stream_id="cam1") as session:
    answer = session.ask("what color was the triangle?", max_new_tokens=4)
    page_in_ms = answer.timings["page_in"] * 1000
    print(answer.text, answer.levels(), f"paged in in {page_in_ms:.0f} ms")
    print(plots.level_tiers(session.backend))  # blocks, tokens, bytes per level, tier
    plots.plot_memory(session, "memory.png")
    asked_at = session.stats()["last_time"]
    plots.plot_retrieval_timeline(answer, "timeline.png", duration=asked_at)
