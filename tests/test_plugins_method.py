"""Each built-in plugin of the method against small hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import blocks_from_keys
from mukv.config import LevelConfig, MukvConfig
from mukv.errors import ConfigError
from mukv.interfaces import Compressor, minmax
from mukv.plugins.compressors.topk import TopKCompressor
from mukv.plugins.extractors import PatchRasterExtractor, PatchSpatialExtractor, WindowExtractor
from mukv.plugins.retrievers.semi_hierarchical import SemiHierarchicalRetriever, rerank
from mukv.plugins.scorers.attention import AttentionScorer
from mukv.plugins.scorers.dual import DualScorer
from mukv.plugins.scorers.frequency import FrequencyDiffScorer, FrequencyFFTScorer


# ----------------------------------------------------------------------------- extractors
def test_patch_raster_is_consecutive_runs():
    lv = LevelConfig(name="patch", extractor="patch_raster", tokens=49, keep_ratio=0.1, top_k=1)
    split = PatchRasterExtractor().split(lv, (14, 14))
    assert split.shape == (4, 49)
    assert split[1].tolist() == list(range(49, 98))  # 3.5 rows, raster order


def test_patch_spatial_is_quadrants():
    lv = LevelConfig(name="patch", extractor="patch_spatial", tokens=49, keep_ratio=0.1, top_k=1)
    split = PatchSpatialExtractor().split(lv, (14, 14))
    assert split.shape == (4, 49)
    rows, cols = split // 14, split % 14
    assert rows[0].max() == 6 and cols[0].max() == 6  # top-left 7x7
    assert rows[1].max() == 6 and cols[1].min() == 7  # top-right
    assert rows[2].min() == 7 and cols[2].max() == 6  # bottom-left
    assert sorted(split.flatten().tolist()) == list(range(196))
    assert all(bool((r[1:] > r[:-1]).all()) for r in split)  # ascending within a block


def test_segment_window_covers_all_frames():
    lv = LevelConfig(name="segment", extractor="segment", frames=4, keep_ratio=0.8, top_k=1)
    assert WindowExtractor().split(lv, (14, 14)).shape == (1, 784)


def test_patch_size_must_divide_the_frame():
    lv = LevelConfig(name="patch", extractor="patch_raster", tokens=50, keep_ratio=0.1, top_k=1)
    with pytest.raises(ConfigError, match="levels\\[patch\\].tokens"):
        PatchRasterExtractor().split(lv, (14, 14))
    lv = LevelConfig(name="patch", extractor="patch_spatial", tokens=98, keep_ratio=0.1, top_k=1)
    with pytest.raises(ConfigError, match="q x q"):
        PatchSpatialExtractor().split(lv, (14, 14))


# ----------------------------------------------------------------------------- scorers
def _crafted_keys() -> torch.Tensor:
    # one block, one head, 8 tokens, dim 2: constant keys except a jump at token 5
    k = torch.ones(1, 1, 8, 2)
    k[0, 0, 5] = torch.tensor([5.0, -3.0])
    return k


def test_frequency_diff_marks_the_change():
    s = FrequencyDiffScorer().score(blocks_from_keys(_crafted_keys()))
    # ||k5 - k4|| = ||(4, -4)|| = sqrt(32); ||k6 - k5|| = sqrt(32); others 0; token 0 copies token 1
    expected = torch.tensor([[0, 0, 0, 0, 0, math.sqrt(32), math.sqrt(32), 0]])
    assert torch.allclose(s, expected, atol=1e-6)


def test_frequency_fft_peaks_at_the_change_and_ignores_dc():
    k = _crafted_keys()
    s = FrequencyFFTScorer().score(blocks_from_keys(k))
    assert int(s.argmax()) == 5
    # a constant block has no high-frequency content at all
    flat = FrequencyFFTScorer().score(blocks_from_keys(torch.ones(1, 1, 8, 2) * 3))
    assert torch.allclose(flat, torch.zeros(1, 8), atol=1e-6)
    # hand computation: rfft of x over 8 tokens, zero bins 0..1 of 5, inverse, mean |.| over dim
    x = k.mean(1)[0]  # [8, 2]
    spec = torch.fft.rfft(x, dim=0)
    spec[:2] = 0
    ref = torch.fft.irfft(spec, n=8, dim=0).abs().mean(-1)
    assert torch.allclose(s[0], ref, atol=1e-6)


def test_frequency_averages_heads_first():
    k = torch.randn(2, 3, 6, 4)
    s = FrequencyDiffScorer().score(blocks_from_keys(k))
    avg = k.mean(1)
    assert torch.allclose(s[:, 3], (avg[:, 3] - avg[:, 2]).norm(dim=-1), atol=1e-5)


def test_attention_scorer_reads_column_sums():
    att = torch.tensor([[3.0, 1.0, 2.0]])
    assert torch.equal(AttentionScorer().score(blocks_from_keys(torch.zeros(1, 1, 3, 2), att)), att)
    with pytest.raises(ConfigError, match="column sums"):
        AttentionScorer().score(blocks_from_keys(torch.zeros(1, 1, 3, 2), None))


def test_dual_score_is_alpha_mix_of_minmax_signals():
    keys = _crafted_keys()
    att = torch.tensor([[8.0, 7, 6, 5, 4, 3, 2, 1]])
    blocks = blocks_from_keys(keys, att, alpha=0.7)
    s = DualScorer(AttentionScorer(), FrequencyDiffScorer()).score(blocks)
    a = (att - 1) / 7
    f = FrequencyDiffScorer().score(blocks) / math.sqrt(32)
    assert torch.allclose(s, 0.7 * a + 0.3 * f, atol=1e-6)


def test_minmax_of_constant_row_is_zero():
    assert torch.equal(minmax(torch.full((2, 3), 4.0)), torch.zeros(2, 3))


# ----------------------------------------------------------------------------- compressor
@pytest.mark.parametrize("length,ratio,expected", [(49, 0.1, 4), (196, 0.1, 19), (784, 0.8, 627), (3, 0.1, 1),
                                                    (10, 1.0, 10)])
def test_keep_counts_per_level(length, ratio, expected):
    lv = LevelConfig(name="x", extractor="frame", keep_ratio=ratio, top_k=1)
    assert Compressor.kept_count(lv, length) == expected


def test_topk_keeps_best_in_time_order():
    keys = torch.randn(2, 1, 10, 4)
    scores = torch.tensor([[0, 9, 1, 8, 2, 7, 3, 6, 4, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]], dtype=torch.float)
    kept = TopKCompressor().select(blocks_from_keys(keys, keep_ratio=0.3), scores)
    assert kept.tolist() == [[1, 3, 5], [0, 1, 2]]


def test_dedup_drops_near_duplicate_keys():
    # tokens 0 and 1 share a key; 2 and 3 are distinct. Scores prefer 0 > 1 > 2 > 3.
    keys = torch.tensor([[1.0, 0], [1.0, 0.01], [0, 1.0], [-1.0, 0.2]]).view(1, 1, 4, 2)
    scores = torch.tensor([[4.0, 3, 2, 1]])
    blocks = blocks_from_keys(keys, keep_ratio=0.5)
    assert TopKCompressor().select(blocks, scores).tolist() == [[0, 1]]
    assert TopKCompressor(dedup=True, threshold=0.9, oversample=1.5).select(blocks, scores).tolist() == [[0, 2]]
    # when too few survive, the best duplicates fill the budget
    same = torch.ones(1, 1, 4, 2)
    assert TopKCompressor(dedup=True, threshold=0.9, oversample=2).select(
        blocks_from_keys(same, keep_ratio=0.5), scores).tolist() == [[0, 1]]


# ----------------------------------------------------------------------------- retrieval
class FakeIndex:
    """A BlockIndex over given vectors per level (cosine)."""

    def __init__(self, vectors: dict[str, torch.Tensor]):
        self.v = vectors

    def count(self, level):
        return self.v[level].shape[0] if level in self.v else 0

    def search(self, level, query, k, within=None):
        sims = torch.nn.functional.cosine_similarity(self.v[level], query[None], dim=-1)
        scores, ids = sims.topk(min(k, sims.numel()))
        return ids, scores

    def vectors(self, level, ids):
        return self.v[level][ids]

    def metadata(self, level, ids):
        raise NotImplementedError


def test_rerank_formula():
    s = torch.tensor([0.5, 0.2])
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([0.0, 2.0])
    out = rerank(s, v, c, 0.3)
    assert torch.allclose(out, torch.tensor([0.7 * 0.5 + 0.3 * 0.0, 0.7 * 0.2 + 0.3 * 1.0]))


def test_segment_guided_rerank_changes_the_frame_choice():
    from mukv.blocks import Query

    q = torch.tensor([1.0, 0.0, 0.0])
    # frame 0 is closest to the query; frame 1 a bit less but aligned with the segments
    frames = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.0, 0.45], [0.0, 1.0, 0.0]])
    segments = torch.tensor([[0.7, 0.0, 0.7], [0.6, 0.0, 0.8]])
    index = FakeIndex({"frame": frames, "segment": segments})
    query = Query("q", q, 0.0, 10)
    flat = SemiHierarchicalRetriever(guide_level=None).retrieve(query, index, {"frame": 1, "segment": 1})
    assert flat[0].ids.tolist() == [0]
    guided = SemiHierarchicalRetriever(2.0, 2, "segment", {"frame": 0.5}).retrieve(query, index, {"frame": 1, "segment": 1})
    by = {h.level: h for h in guided}
    assert by["frame"].ids.tolist() == [1]
    # the rescored value is (1 - w) s + w cos(v, c), c = mean of both segment vectors
    c = segments.mean(0)
    s1 = torch.nn.functional.cosine_similarity(frames[1], q, dim=0)
    expect = 0.5 * s1 + 0.5 * torch.nn.functional.cosine_similarity(frames[1], c, dim=0)
    assert torch.allclose(by["frame"].scores[0], expect, atol=1e-6)
    assert by["segment"].ids.tolist() == [0] or by["segment"].ids.tolist() == [1]


def test_over_retrieval_bounds_rerank_candidates():
    from mukv.blocks import Query

    calls = []

    class Spy(FakeIndex):
        def search(self, level, query, k, within=None):
            calls.append((level, k))
            return super().search(level, query, k, within)

    idx = Spy({"frame": torch.randn(50, 4), "segment": torch.randn(10, 4)})
    SemiHierarchicalRetriever.from_config(MukvConfig.build(levels=[
        {"name": "frame", "extractor": "frame", "keep_ratio": 0.1, "top_k": 7, "rerank_weight": 0.3},
        {"name": "segment", "extractor": "segment", "frames": 4, "keep_ratio": 0.8, "top_k": 3},
    ])).retrieve(Query("q", torch.randn(4), 0, 1), idx, {"frame": 7, "segment": 3})
    assert ("frame", 14) in calls and ("segment", 6) in calls


def test_diverse_order_passes_over_near_duplicates_and_fills_the_top_k():
    from mukv.plugins.retrievers.diversity import diverse_order

    a, b, c = torch.eye(3)
    ranked = torch.stack([a, a * 2.0, a + 1e-4 * b, b, b, c])  # three copies of a, two of b, then c
    assert diverse_order(ranked, 3, 0.99).tolist() == [0, 3, 5]
    # too few distinct blocks: the passed-over ones fill the rest in ranked order
    assert diverse_order(ranked, 5, 0.99).tolist() == [0, 3, 5, 1, 2]
    assert diverse_order(ranked, 10, 0.99).tolist() == [0, 3, 5, 1, 2, 4]
    # a threshold of 1 passes over nothing that is not the same direction exactly
    assert diverse_order(torch.stack([a, a + 1e-3 * b, b]), 2, 1.0).tolist() == [0, 1]
    assert diverse_order(ranked, 0, 0.99).numel() == 0
    assert diverse_order(torch.zeros(0, 3), 4, 0.99).numel() == 0


def test_diversity_keeps_a_static_scene_from_filling_a_level():
    """Twelve copies of one moment outrank the others: without diversity they fill the top-k; with it
    the top-k holds that moment once and the next distinct blocks, and the budget is still read."""
    from mukv.blocks import Query

    torch.manual_seed(0)
    q = torch.tensor([1.0, 0.0, 0.0, 0.0])
    static = torch.tensor([0.9, 0.3, 0.0, 0.0]).repeat(12, 1) + 1e-4 * torch.randn(12, 4)
    others = torch.tensor([[0.8, 0.0, 0.5, 0.0], [0.7, 0.0, 0.0, 0.6], [0.6, -0.6, 0.3, 0.0]])
    index = FakeIndex({"frame": torch.cat([static, others])})
    query = Query("q", q, 0.0, 10)
    plain = SemiHierarchicalRetriever(guide_level=None).retrieve(query, index, {"frame": 4})[0]
    assert all(i < 12 for i in plain.ids.tolist())
    cfg = MukvConfig.build(levels=[{"name": "frame", "extractor": "frame", "keep_ratio": 0.1, "top_k": 4}],
                           retrieval={"diversity": 0.99, "guide_level": None})
    hits = SemiHierarchicalRetriever.from_config(cfg).retrieve(query, index, {"frame": 4})[0]
    ids = hits.ids.tolist()
    assert len(ids) == 4 and sum(i < 12 for i in ids) == 1 and {12, 13, 14} <= set(ids)
    assert ids[0] == plain.ids.tolist()[0]  # the best block stays first


def test_diversity_settings_are_validated():
    for bad in ({"diversity": 0.0}, {"diversity": 1.5}, {"diversity": float("nan")}, {"diversity_pool": 0.5},
                {"diversity_pool": float("inf")}):
        with pytest.raises(ConfigError, match="diversity"):
            MukvConfig.build(retrieval=bad)
    assert MukvConfig.from_policy("mukv_diverse").retrieval.diversity == 0.99
    assert MukvConfig.from_policy("mukv").retrieval.diversity is None


def test_a_level_reranked_and_diversified_reads_its_candidates_vectors_once():
    from mukv.blocks import Query

    reads = []

    class Spy(FakeIndex):
        def vectors(self, level, ids):
            reads.append(level)
            return super().vectors(level, ids)

    torch.manual_seed(1)
    idx = Spy({"frame": torch.randn(60, 4), "segment": torch.randn(10, 4)})
    cfg = MukvConfig.build(levels=[
        {"name": "frame", "extractor": "frame", "keep_ratio": 0.1, "top_k": 5, "rerank_weight": 0.3},
        {"name": "segment", "extractor": "segment", "frames": 4, "keep_ratio": 0.8, "top_k": 2},
    ], retrieval={"diversity": 0.99})
    hits = SemiHierarchicalRetriever.from_config(cfg).retrieve(Query("q", torch.randn(4), 0, 1), idx,
                                                              {"frame": 5, "segment": 2})
    assert reads.count("frame") == 1  # the rerank and the diversity share one read
    assert {h.level: h.ids.numel() for h in hits} == {"frame": 5, "segment": 2}
