"""Feed frames from your own capture loop, and ask from another thread."""

import threading
import time

import numpy as np

import mukv
from mukv.bench import Benchmark

stand_in = Benchmark.generate(seed=2, minutes=1, questions=0).stream


def capture():
    """Your camera loop (OpenCV, picamera, a GStreamer appsink ...): yields
    ``(frame uint8 [H, W, 3] RGB, capture time in seconds)``."""
    start = time.time()
    for i in range(stand_in.num_frames):
        yield stand_in.frame(i), start + 2.0 * i  # one frame every 2 s


session = mukv.Session(model="tiny-llava-ov")
answers = []


def ask_later():
    while session.stats()["frames"] < 12:  # wait until some memory exists
        time.sleep(0.05)
    answers.append(session.ask("what color was the square?", max_new_tokens=4))


asker = threading.Thread(target=ask_later)
asker.start()

t0 = None
for frame, t in capture():
    t0 = t if t0 is None else t0
    # feed() and ask() may run in different threads: calls are serialised.
    session.feed(frame, timestamps=np.array([t - t0]))

asker.join()
latest = max(block.frame_end for block in answers[0].blocks)
print(f"the answer used frames up to {latest}; the stream went on to "
      f"{session.stats()['frames']} frames")
session.close()
