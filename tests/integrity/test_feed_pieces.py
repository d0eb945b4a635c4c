"""With ``mukv.encode_ahead`` on, a feed of more frames than one vision batch is encoded and prefilled
piece by piece, still one transaction: what it stores equals the same frames fed in vision-batch
chunks, and a failure in any piece stores nothing of the feed. On a CPU there is no side stream: the
tests here force the piece order (``encode_ahead.ahead``), which a GPU runs with its side stream
(tests/gpu/test_gpu_encode_ahead.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import mukv
from integrity_helpers import FAST, frames
from mukv import encode_ahead
from mukv.errors import StoreError
from test_transactions import bookkeeping

LEVELS = ("patch", "frame", "segment")


@pytest.fixture
def in_pieces(monkeypatch):
    monkeypatch.setattr(encode_ahead, "ahead", lambda device: True)


def stored(s: mukv.Session) -> dict:
    out = {}
    for lv in LEVELS:
        ids = torch.arange(s.backend.count(lv))
        out[lv] = (s.backend.token_index(lv, ids), s.backend.load_kv(lv, ids), s.backend.positions(lv, ids))
    return out


@pytest.mark.parametrize("n, size, want", [
    (0, 4, []), (3, 4, [(0, 3)]), (8, 4, [(0, 4), (4, 8)]), (9, 4, [(0, 4), (4, 8), (8, 9)]), (2, 1, [(0, 1), (1, 2)]),
])
def test_pieces_cover_the_feed_in_order(n, size, want):
    assert encode_ahead.pieces(n, size) == want


@pytest.mark.parametrize("call, words", [
    (lambda: encode_ahead.pieces(3, 0), "size must be a whole number of at least 1"),
    (lambda: encode_ahead.pieces(-1, 4), "n must be"),
    (lambda: encode_ahead.pieces(True, 4), "n must be"),
    (lambda: encode_ahead.pieces(4, 2.5), "size must be"),
    (lambda: encode_ahead.ahead("no such device"), "invalid device 'no such device'"),
    (lambda: encode_ahead.ahead(3), "device must be"),
    (lambda: encode_ahead.side_stream("cpu"), "needs a CUDA device"),
    (lambda: encode_ahead.encoded_pieces(None, torch.zeros(3), 1, "cpu"), "encode must be a callable"),
    (lambda: encode_ahead.encoded_pieces(len, [1, 2], 1, "cpu"), "frames must be a tensor"),
    (lambda: encode_ahead.encoded_pieces(len, torch.tensor(1.0), 1, "cpu"), "frames must be a tensor"),
    (lambda: encode_ahead.encoded_pieces(len, torch.zeros(3), 0, "cpu"), "size must be"),
    (lambda: encode_ahead.encoded_pieces(len, torch.zeros(3), 1, 7), "device must be"),
])
def test_bad_arguments_are_refused_by_name(call, words):
    from mukv.errors import MukvError

    with pytest.raises(MukvError, match=words):
        call()


def test_off_a_gpu_a_feed_is_one_piece_of_every_vision_batch():
    calls = []

    def encode(f):
        calls.append(len(f))
        return f.float()[:, None, None]

    assert encode_ahead.ENCODE_AHEAD and not encode_ahead.ahead(torch.device("cpu"))  # on, but only on a GPU
    (a, b, e), = encode_ahead.encoded_pieces(encode, torch.arange(10), 4, torch.device("cpu"))
    assert (a, b) == (0, 10) and calls == [4, 4, 2] and torch.equal(e.flatten(), torch.arange(10).float())


def test_no_frames_are_no_piece():
    assert list(encode_ahead.encoded_pieces(lambda f: 1 / 0, torch.zeros(0, 2), 4, "cpu")) == []


def test_in_pieces_each_piece_is_encoded_when_it_is_taken(in_pieces):
    calls = []

    def encode(f):
        calls.append(int(f[0]))
        return f.float()[:, None, None]

    it = encode_ahead.encoded_pieces(encode, torch.arange(10), 4, torch.device("cpu"))
    a, b, e = next(it)
    assert (a, b) == (0, 4) and calls == [0] and e.shape == (4, 1, 1)
    assert [(a, b) for a, b, _ in it] == [(4, 8), (8, 10)] and calls == [0, 4, 8]


def test_a_feed_in_pieces_stores_what_vision_batch_chunks_store(tiny_model, in_pieces):
    data = frames(11, seed=3)  # pieces of 4, 4 and 3 frames; segment windows of 2 frames straddle none
    with mukv.Session(model=tiny_model, backend="memory", config=FAST) as one, \
            mukv.Session(model=tiny_model, backend="memory", config=FAST) as chunked:
        assert one.feed(data) == sum(chunked.feed(data[a:b]) for a, b in encode_ahead.pieces(11, 4))
        got, want = stored(one), stored(chunked)
        assert bookkeeping(one)["counts"] == bookkeeping(chunked)["counts"] == {"patch": 44, "frame": 11, "segment": 5}
        assert one._stream.ingestor.pending_frames()[0] == 10  # the odd frame waits for its segment
        for lv in LEVELS:
            for g, w in zip(got[lv], want[lv]):
                assert torch.equal(g, w), lv
        # the whole feed is one source record, as before
        assert [r["frames"] for r in one._stream.sources] == [[0, 11]]


@pytest.mark.parametrize("backend", ["memory", "lancedb"])
@pytest.mark.parametrize("failing_piece", [1, 2])
def test_a_failure_in_a_later_piece_stores_nothing_of_the_feed(tiny_model, tmp_path, backend, failing_piece,
                                                                 in_pieces):
    path = None if backend == "memory" else tmp_path / "s.mukv"
    with mukv.Session(model=tiny_model, backend=backend, path=path, config=FAST) as s:
        s.feed(frames(3))
        before, kept = bookkeeping(s), stored(s)
        ing = s._stream.ingestor
        real, calls = ing.add_frames, {"n": 0}

        def fails_in_piece(embeds, times):
            calls["n"] += 1
            if calls["n"] == failing_piece + 1:
                raise StoreError("disk went away")
            return real(embeds, times)

        ing.add_frames = fails_in_piece
        with pytest.raises(StoreError, match="disk went away"):
            s.feed(frames(10, seed=1))
        del ing.add_frames
        assert calls["n"] == failing_piece + 1
        assert bookkeeping(s) == before
        after = stored(s)
        for lv in LEVELS:
            assert all(torch.equal(x, y) for x, y in zip(after[lv], kept[lv])), lv
        s.feed(frames(10, seed=1))  # the retry stores every frame once
        assert bookkeeping(s)["frames"] == 13 and bookkeeping(s)["counts"]["frame"] == 13


def test_an_interrupt_in_the_vision_tower_of_a_later_piece_rolls_the_feed_back(tiny_model, monkeypatch, in_pieces):
    with mukv.Session(model=tiny_model, backend="memory", config=FAST) as s:
        s.feed(frames(2))
        before = bookkeeping(s)
        real, calls = tiny_model.encode_frames, {"n": 0}

        def interrupted(f):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return real(f)

        monkeypatch.setattr(tiny_model, "encode_frames", interrupted)
        with pytest.raises(KeyboardInterrupt):
            s.feed(frames(12, seed=4))
        monkeypatch.setattr(tiny_model, "encode_frames", real)
        assert bookkeeping(s) == before
        s.feed(frames(12, seed=4))
        assert bookkeeping(s)["frames"] == 14


def test_a_closed_iterator_encodes_nothing_more(in_pieces):
    done = []

    def encode(f):
        done.append(len(f))
        return f[:, None]

    with contextlib.closing(encode_ahead.encoded_pieces(encode, torch.zeros(12), 4, torch.device("cpu"))) as it:
        next(it)
    assert done == [4]  # nothing encoded beyond what was taken
