"""On a GPU: a stream fed from one thread while another session is asked, its question-time
CUDA graphs captured meanwhile (the first questions of a model capture them).

Run through the device tool (skipped without CUDA)::

    python -m pytest -q tests/gpu/test_gpu_threads.py

``MUKV_GPU_TEST_DEVICE=cpu`` runs it on the CPU (no graphs there), to check the test itself.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

from mukv import model as mukv_model
from mukv.session import Session, load_model

DEVICE = torch.device(os.environ.get("MUKV_GPU_TEST_DEVICE", "cuda"))
pytestmark = ([pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
              if DEVICE.type == "cuda" else [])

QUESTIONS = ("what color was the car ?", "where is the dog ?", "how many people are there ?")


def _frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 64, 64, 3), dtype=np.uint8)


def _answers(session: Session) -> list[tuple[str, list[tuple[str, int]]]]:
    out = []
    for q in QUESTIONS:
        a = session.ask(q, max_new_tokens=6)
        out.append((a.text, [(b.level, b.block_id) for b in a.blocks]))
    return out


def test_questions_while_another_stream_feeds():
    # the answers of a quiet process: a model of its own (same seed, same weights), nothing else running
    quiet = Session(model=load_model("tiny-llava-ov", DEVICE), backend="memory", device=DEVICE)
    quiet.feed(_frames(24, seed=1))
    expected = _answers(quiet)

    model = load_model("tiny-llava-ov", DEVICE)  # a fresh model: its question-time graphs are not captured yet
    asked = Session(model=model, backend="memory", device=DEVICE)
    asked.feed(_frames(24, seed=1))
    fed = Session(model=model, backend="memory", device=DEVICE)
    stop, errors, feeds = threading.Event(), [], [0]

    def feed() -> None:
        rng = np.random.default_rng(2)
        try:
            while not stop.is_set():
                fed.feed(rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8))
                fed.ask(QUESTIONS[feeds[0] % len(QUESTIONS)], max_new_tokens=2)  # its own prefix, same workspace
                feeds[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while feeds[0] < 1 and not errors and time.monotonic() < deadline:
            time.sleep(0.01)  # the feeder is running
        got = [_answers(asked) for _ in range(2)]
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert not thread.is_alive() and feeds[0] > 0
    assert got[0] == expected and got[1] == expected
    if DEVICE.type == "cuda":
        assert mukv_model.GRAPHS.get("ok", True), mukv_model.GRAPHS
        assert any(st.captured for st in model._answer_decoder.steps.values())
