"""Session.ask(on_token=...): the answer's text piece by piece, as the model decodes it."""

from __future__ import annotations

import numpy as np
import pytest

import mukv


@pytest.mark.parametrize("static", [False, True], ids=["dynamic-cache", "static-workspace"])
def test_pieces_join_to_the_answer(session, frames, static, monkeypatch):
    if static:  # the replayed-step decoder (CUDA graphs on a GPU) takes the same callback
        monkeypatch.setattr(type(session.model), "_use_static", lambda self, n: True)
    else:
        monkeypatch.setattr(type(session.model), "_use_static", lambda self, n: False)
    session.feed(frames(8))
    pieces: list[str] = []
    answer = session.ask("what color was the circle?", max_new_tokens=6, on_token=pieces.append)
    plain = session.ask("what color was the circle?", max_new_tokens=6)
    assert answer.text == plain.text
    assert "".join(pieces).strip() == answer.text
    assert all(isinstance(p, str) and p for p in pieces)
    if answer.text:
        assert len(pieces) >= 1


def test_a_callback_error_ends_the_question_and_bad_callbacks_are_refused(session, frames):
    session.feed(frames(4))

    class Stop(Exception):
        pass

    def stop(piece: str) -> None:
        raise Stop()

    with pytest.raises(Stop):
        session.ask("what is it?", max_new_tokens=4, on_token=stop)
    assert session.ask("what is it?", max_new_tokens=2).text is not None  # the session goes on
    with pytest.raises(mukv.InputError, match="on_token"):
        session.ask("what is it?", on_token="print")
