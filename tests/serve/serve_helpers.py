"""Helpers of the serve tests: the application on uvicorn in a thread (shared tiny model), ``mukv serve``
as a real process, frames, waiting."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np


import mukv  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FAST = {"commit_interval": 0.05, "hot_bytes": 8 << 20}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float = 60.0, every: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


@contextmanager
def serving(store, model, **fields):
    """The application on uvicorn in a thread of this process; yields ``(client, app, url)``."""
    import uvicorn

    from mukv.serve import ServeConfig, create_app

    port = free_port()
    fields.setdefault("backend_options", dict(FAST))
    cfg = ServeConfig(store=str(store), port=port, **fields)
    app = create_app(cfg, model=model)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    client = mukv.Client(url, token=cfg.token)

    def up():
        try:
            return client.health()["status"] == "ok"
        except Exception:
            return False

    try:
        wait_until(lambda: up() or not thread.is_alive(), 120, what="the server to start")
        assert thread.is_alive(), "the server did not start"
        yield client, app, url
    finally:
        client.close()
        server.should_exit = True
        thread.join(60)


def stored(client, sid: str, n: int, timeout: float = 60.0) -> dict:
    """Wait until stream ``sid`` has ``n`` frames stored and nothing queued; return its status."""
    return wait_until(lambda: (lambda s: s if s["frames"] >= n and s["queued"] == 0 else None)(client.stream(sid)),
                      timeout, what=f"{n} frames stored in {sid}")


def frames(n: int, seed: int = 0, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, size, size, 3), dtype=np.uint8)


class Process:
    """``mukv serve`` in a subprocess."""

    def __init__(self, store, *args: str, env: dict | None = None, port: int | None = None, log_dir=None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        folder = Path(log_dir) if log_dir is not None else Path(str(store)).parent
        self.log = open(folder / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "mukv", "serve", str(store), "--port", str(self.port),
                                      "--device", "cpu", "--log-level", "warning", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=e, cwd=ROOT)
        self.client = mukv.Client(self.url)

    def wait_up(self, timeout: float = 120.0) -> "Process":
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"mukv serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                return self.client.health()["status"] == "ok"
            except Exception:
                return False

        wait_until(up, timeout, 0.1, "mukv serve to start")
        return self

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig=None, timeout: float = 60.0) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.client.close()
