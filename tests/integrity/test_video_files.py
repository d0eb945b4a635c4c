"""Video files decord misreads (widths it pads, e.g. 48 px) are read through PyAV, frame for frame."""

from __future__ import annotations

import numpy as np
import pytest

from integrity_helpers import write_mp4
from mukv import InputError
from mukv.frames import _Decord, _PyAV, read_video, video_size

pytest.importorskip("decord")
pytest.importorskip("av")


@pytest.mark.parametrize("side", [48, 40, 72])
def test_padded_widths_decode_every_sampled_frame(tmp_path, side):
    p = write_mp4(tmp_path / "v.mp4", 10, fps=4, side=side)
    assert video_size(p) == (side, side)
    n, chunks = read_video(p, fps=8, chunk=3, upsample=True)
    got = [c for c, _ in chunks]
    assert n == 20 and sum(len(c) for c in got) == 20 and all(c.shape[1:] == (side, side, 3) for c in got)
    ref = _PyAV(p).frames(np.arange(10))
    allf = np.concatenate([c.numpy() for c in got])
    assert (allf == ref[np.minimum(np.round(np.arange(20) / 8 * 4).astype(int), 9)]).all()


def test_pyav_reader_matches_decord_where_decord_reads(tmp_path):
    p = write_mp4(tmp_path / "v.mp4", 9, fps=4, side=32)
    d, a = _Decord(p), _PyAV(p)
    assert d.ok and (d.total, d.size) == (a.total, a.size)
    for idx in ([0, 0, 1, 4], [4, 6, 8], [2, 3]):  # forward, then a jump back (the reader restarts)
        assert (d.frames(np.array(idx)) == a.frames(np.array(idx))).all()


def test_a_garbage_file_is_an_input_error(tmp_path):
    p = tmp_path / "x.mp4"
    p.write_bytes(b"\x00" * 4096)
    with pytest.raises(InputError, match="x.mp4"):
        read_video(p, fps=1)
    with pytest.raises(InputError, match="x.mp4"):
        video_size(p)
