"""Diagnostic: kivi4's encoder range search on keys only or on values only, on mukv-tiny's held-out clips.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/kivi4_search_parts.py --device cpu \\
        --codecs 'none,{"name":"kivi4","range_search":true,"key_group":32},{"name":"kivi4","range_search":true,"value_group":64}' \\
        --out runs/codec-clips-rs-split

``benchmarks/codec_clips.py`` with kivi4's ``range_search`` applied to one part: to keys only where
``key_group`` is 32 and to values only where ``value_group`` is 64. On mukv-tiny (2 heads of 32
channels) both are the default layout (a head's 32 channels; the token's 64), so the two codecs store
what plain kivi4 stores, in one run beside ``none``. Not a setting of the codec: a measurement of which
part's extremes the answers need (docs/codecs-results.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mukv.plugins.codecs import kivi4 as K  # noqa: E402
from mukv.plugins.codecs._rows import affine, search_range  # noqa: E402


def _scales(self, t, dims, what):
    lo, hi = t.amin(dim=dims, keepdim=True), t.amax(dim=dims, keepdim=True)
    m, s = affine(lo, hi, K.LEVELS, what)
    st = self.settings
    if st.range_search and ((what.endswith("keys") and st.key_group == 32)
                            or (what.endswith("values") and st.value_group == 64)):
        m, s = affine(*search_range(t, lo, hi, dims, K.LEVELS), K.LEVELS, what)
    return m, s


if __name__ == "__main__":
    K.Kivi4Codec._scales = _scales
    import codec_clips

    sys.exit(codec_clips.main(sys.argv[1:]))
