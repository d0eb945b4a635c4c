# mukv serve from Python: the server in this process (what `mukv serve STORE` runs), and the client.
import tempfile
import threading
import time

import uvicorn

import mukv
from mukv.bench import Benchmark
from mukv.serve import ServeConfig, create_app

store = tempfile.mkdtemp() + "/cams.mukv"
config = ServeConfig(store=store, port=8765, model="mukv-tiny", max_lag_s=10)
server = uvicorn.Server(uvicorn.Config(create_app(config), host=config.host, port=config.port, log_level="warning"))
thread = threading.Thread(target=server.run, daemon=True)
thread.start()

client = mukv.Client("http://127.0.0.1:8765")
deadline = time.monotonic() + 300
while True:  # the model loads, then the server answers
    if not thread.is_alive() or time.monotonic() > deadline:  # e.g. port 8765 taken by another program
        raise SystemExit("the server did not start; see its log above")
    try:
        if client.health()["status"] == "ok":
            break
    except Exception:  # not listening yet, or still loading
        pass
    time.sleep(0.2)

client.create_stream("lobby")
bench = Benchmark.generate(seed=0, minutes=2, questions=4)  # a generated camera: uint8 [n, 64, 64, 3]
print(client.push("lobby", bench.stream.frames(0, 40)))  # queued, ingested in the background
while client.stream("lobby")["frames"] < 40:
    time.sleep(0.1)

question = bench.questions[0]
for piece in client.ask_stream("lobby", question.text, max_new_tokens=3):
    if isinstance(piece, str):
        print("token:", piece)
    else:  # the whole answer, last
        print("answer:", piece["text"], "| truth:", question.answer, "|", len(piece["blocks"]), "moments")
        best = max(piece["blocks"], key=lambda b: b["score"])
        jpeg = client.thumbnail("lobby", best["frame_start"])  # what the best moment looked like
        print(f"best: {best['level']} at {best['t_start']:.0f} s, thumbnail {len(jpeg)} bytes")
print(client.stream("lobby")["frames"], "frames,", client.stream("lobby")["dropped"], "dropped")
server.should_exit = True  # as SIGTERM does: every stream is closed, what was ingested is committed
thread.join()
