"""mukv_register_sources: a frame source, read with Session.feed_from(name, ...)."""

from typing import Iterator

import torch

import mukv
from mukv.bench import Stream, StreamSpec
from mukv.interfaces import FrameSource


class BenchSource(FrameSource):
    """A generated benchmark stream; ``location`` is its seed."""

    def __init__(self, location: int, fps=0.5, chunk=64, minutes=2.0):
        self.stream = Stream(StreamSpec(seed=int(location), minutes=minutes, fps=fps))
        self.chunk = chunk
        self.total = self.stream.num_frames  # optional: sizes the progress bar

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for first, frames in self.stream.iter_frames(batch=self.chunk):
            index = torch.arange(first, first + len(frames), dtype=torch.float64)
            times = index / self.stream.fps  # seconds, [n]
            yield torch.from_numpy(frames), times  # frames: uint8 [n, H, W, 3]


@mukv.hookimpl
def mukv_register_sources(register):
    register("bench", BenchSource)


if __name__ == "__main__":
    import sys

    mukv.register_plugin(sys.modules[__name__], name="bench_source")
    with mukv.Session(model="tiny-llava-ov") as session:
        # keyword options after the location go to the source
        stored = session.feed_from("bench", 7, minutes=1)
        print(stored, "blocks from", session.stats()["frames"], "frames")
    mukv.unregister_plugin(sys.modules[__name__])
