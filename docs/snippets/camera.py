"""Answer questions about a live camera while it streams."""

import os
import time

import mukv
from mukv.bench import Benchmark

# A camera: a V4L2 device ("/dev/video0"), an RTSP or HTTP URL, or anything
# FFmpeg opens. Without CAMERA set, a recorded stand-in plays the camera.
CAMERA = os.environ.get("CAMERA")


def record_stand_in(path: str, minutes: float = 2.0) -> str:
    """Write minutes of a generated stream as an mp4 (1 frame per second)."""
    import av

    stream = Benchmark.generate(seed=1, minutes=minutes, fps=1.0, questions=0).stream
    with av.open(path, "w") as out:
        video = out.add_stream("mpeg4", rate=1)
        video.width = video.height = stream.size
        video.pix_fmt = "yuv420p"
        for frame in stream.frames(0, stream.num_frames):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            out.mux(video.encode(picture))
        out.mux(video.encode())
    return path


location = CAMERA or record_stand_in("camera.mp4")
options = {"format": "v4l2"} if location.startswith("/dev/video") else {}

session = mukv.Session(model="tiny-llava-ov")
# Read the camera in a background thread, keeping one frame every 2 seconds.
feed = session.feed_from("stream", location, fps=0.5, background=True, **options)

# Ask while the camera streams: each question sees the frames fed so far.
# (Blocks are stored as windows complete: a segment every 4 frames.)
while feed.running and session.stats()["frames"] < 8:
    time.sleep(0.1)
question = "what shape appeared right after the circle vanished?"
answer = session.ask(question, max_new_tokens=4)
frames = session.stats()["frames"]
print(f"after {frames} frames: {answer.text!r} from {answer.levels()}")

feed.stop()  # a camera never ends on its own; a file does
print("blocks stored:", feed.join(), "| frames:", session.stats()["frames"])
session.close()
