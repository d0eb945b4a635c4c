"""ReKV as its public code runs it (policy ``rekv``): sliding-window encoding, per-layer keys,
per-layer retrieval and one context per layer; checked against ReKV's description and defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mukv
from mukv.assembly import Piece, assemble_context, page_in
from mukv.blocks import Hits, Query
from mukv.config import MukvConfig
from mukv.errors import RetrievalError, StoreError
from mukv.interfaces import BlockMeta
from mukv.plugins.retrievers.layerwise import LayerwiseRetriever, choose, fold_queries, layer_hits
from mukv.rope import rerotate
from mukv.local_window import WindowEncoder, WindowKV, prefill_window, question_queries, unrotated_mean_keys


def rekv_config(window: int = 2, top_k: int = 3, **retrieval) -> dict:
    retrieval.setdefault("layer_probe", "memory")
    return {"levels": [{"name": "frame", "extractor": "frame", "keep_ratio": 1.0, "top_k": top_k,
                        "local_window": window, "layer_keys": True}],
            "retrieval": {"retriever": "layerwise", "guide_level": None, **retrieval},
            "assembly": {"order": "time", "rerotate": True}}


def encode(model, frames):
    return model.encode_frames(torch.from_numpy(frames))


# ------------------------------------------------------------------ the policy is ReKV's defaults
def test_rekv_policy_holds_rekvs_defaults():
    cfg = MukvConfig.from_policy("rekv")
    (lv,) = cfg.levels
    assert (lv.extractor, lv.frames, lv.keep_ratio, lv.top_k) == ("frame", 1, 1.0, 64)  # one-frame blocks, 64 of them
    assert lv.local_window == 76  # n_local = 15,000 tokens of 196-token frames
    assert lv.layer_keys and cfg.retrieval.retriever == "layerwise"
    assert cfg.retrieval.chunk_blocks == 1 and cfg.retrieval.recent_blocks == 0
    assert cfg.assembly.order == "time" and cfg.assembly.rerotate  # time order, RoPE for the new positions
    old = MukvConfig.from_policy("frame_topk")  # the simplification formerly called rekv
    assert old.retrieval.retriever == "cosine" and old.levels[0].local_window == 0


# ------------------------------------------------------------------ sliding-window encoding
def test_window_prefill_without_a_limit_is_causal_attention_over_the_run(tiny_model, frames):
    m = tiny_model
    pre = m.prefix()
    e = encode(m, frames(3))
    t = e.shape[1]
    kv, cols, codes = prefill_window(m, pre, e, torch.arange(t)[None].expand(3, -1), None, span=10**6)
    ref, _, pos = m.prefill_blocks(pre, e.reshape(1, 3 * t, -1), attention=False, token_index=torch.arange(3 * t)[None])
    got = kv.permute(0, 1, 3, 2, 4, 5).reshape(ref.shape[0], 2, ref.shape[3], 3 * t, -1)
    torch.testing.assert_close(got, ref[:, :, 0], rtol=0, atol=1e-5)
    assert torch.equal(codes.reshape(-1), pos.reshape(-1))
    one, cols1, _ = prefill_window(m, pre, e[:1], torch.arange(t)[None], None, span=0, attention=True)
    alone, cols2, _ = m.prefill_blocks(pre, e[:1], attention=True)
    torch.testing.assert_close(one, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(cols1, cols2, rtol=1e-4, atol=1e-5)


def _stored(model, fr, config, batch=64):
    with mukv.Session(model=model, config=config) as s:
        for i in range(0, len(fr), batch):
            s.feed(fr[i : i + batch])
        n = s.backend.count("frame")
        ids = torch.arange(n)
        return s.backend.load_kv("frame", ids), s.backend.positions("frame", ids), s.backend.layer_keys("frame", ids)


def test_each_block_attends_to_its_window_only(tiny_model, frames):
    """A block's layer-y KV depends on the frames within y windows before it, and on nothing older:
    perturb the first frame and only blocks up to (layers - 1) x window later change."""
    w, layers = 2, tiny_model.layout.num_layers
    cfg = rekv_config(window=w)
    a = frames(10, seed=1)
    b = a.copy()
    b[0] = frames(1, seed=2)[0]
    kv_a, pos_a, _ = _stored(tiny_model, a, cfg)
    kv_b, pos_b, _ = _stored(tiny_model, b, cfg)
    assert torch.equal(pos_a, pos_b)
    reach = (layers - 1) * w  # the last block the first frame reaches through the windows
    for blk in range(10):
        diff = (kv_a[blk] - kv_b[blk]).abs().amax(dim=(1, 2, 3, 4))  # per layer
        for y in range(layers):
            if blk <= y * w:
                assert diff[y] > 1e-4, (blk, y)  # the first frame is in this layer's reach
            else:
                assert diff[y] < 1e-5, (blk, y)
    assert reach < 9


def test_windowed_encoding_is_the_same_in_any_feed_batches_and_positions_stay_bounded(tiny_model, frames):
    fr = frames(12, seed=3)
    cfg = rekv_config(window=3)
    kv1, pos1, lk1 = _stored(tiny_model, fr, cfg, batch=12)
    kv2, pos2, lk2 = _stored(tiny_model, fr, cfg, batch=5)
    torch.testing.assert_close(kv1, kv2, rtol=0, atol=1e-5)
    assert torch.equal(pos1, pos2)
    p, t = tiny_model.prefix().length, tiny_model.tokens_per_frame
    assert int(pos1[0, 0]) == p and int(pos1[5, 0]) == p + 5 * t  # one timeline, block after block


def test_window_encoder_matches_the_canonical_layout_and_rebases(tiny_model, frames):
    """Block by block, the in-place encoder (positions running on, the system prompt moved before the
    window, the window moved back past ``rebase_at``) gives every block the KV of the canonical layout
    (system prompt at 0, its window after it, the block after that), up to where the keys sit."""
    m, w = tiny_model, 2
    pre = m.prefix()
    p, t = pre.length, m.tokens_per_frame
    e = encode(m, frames(9, seed=7))
    ti = torch.arange(t)[None]
    enc = WindowEncoder(m, pre, w, t, rebase_at=p + 4 * t)  # rebases every couple of blocks
    ref: list[tuple[torch.Tensor, torch.Tensor]] = []  # canonical (kv [Y, 2, H, L, D], codes [L]) per block
    positions = []
    for b in range(9):
        kv, _, codes = enc.encode(e[b : b + 1], ti)
        kv = kv[:, :, 0].clone()
        positions.append(int(codes.max()))
        win = ref[-w:]
        window = None
        if win:
            window = WindowKV(torch.cat([k for k, _ in win], dim=3), torch.cat([c for _, c in win]),
                              torch.arange(len(win)).repeat_interleave(t))
        rkv, _, rcodes = prefill_window(m, pre, e[b : b + 1], ti, window, span=w * t)
        rkv, rcodes = rkv[:, :, 0], rcodes[0]
        ref.append((rkv, rcodes))
        torch.testing.assert_close(kv[:, 1], rkv[:, 1], rtol=1e-4, atol=1e-4)  # values
        torch.testing.assert_close(rerotate(m, kv[:, 0], codes[0], rcodes), rkv[:, 0], rtol=1e-4, atol=1e-4)
    assert max(positions) <= p + 4 * t + t  # positions stay bounded


def test_layer_keys_are_mean_keys_without_rope(tiny_model, frames):
    """The same frame at two places of the stream: its first layer's keys (before any attention)
    are rotated at different positions, its stored per-layer key is the same."""
    fr = frames(8, seed=4)
    fr[6] = fr[1]
    kv, pos, lk = _stored(tiny_model, fr, rekv_config(window=2))
    assert int(pos[1, 0]) != int(pos[6, 0])
    assert not torch.allclose(kv[1, 0, 0], kv[6, 0, 0], atol=1e-4)
    torch.testing.assert_close(lk[1, 0], lk[6, 0], rtol=1e-3, atol=1e-3)
    again = unrotated_mean_keys(tiny_model, kv[:2], pos[:2])
    torch.testing.assert_close(again, lk[:2], rtol=1e-3, atol=1e-3)  # float16 in the store


def test_question_queries_are_the_first_layer_projection_without_rope(tiny_model):
    q = question_queries(tiny_model, tiny_model.prefix(), "what color was the car?")
    lm = tiny_model.language_model
    ids = tiny_model.tokenize(tiny_model.query_template.format(question="what color was the car?"))
    attn = lm.layers[0].self_attn
    h = lm.layers[0].input_layernorm(lm.embed_tokens(ids))
    ref = attn.q_proj(h).view(ids.numel(), -1, q.shape[-1]).transpose(0, 1)  # [Hq, n, D]
    torch.testing.assert_close(q[0], ref.float(), rtol=1e-4, atol=1e-4)
    assert q.shape[0] == tiny_model.layout.num_layers


# ------------------------------------------------------------------ per-layer choice
def test_choose_takes_runs_recent_blocks_and_equal_counts():
    s = torch.tensor([[0.0, 5, 1, 1, 9, 0, 0, 3], [9.0, 0, 0, 0, 0, 0, 8, 0]])
    ids, sc = choose(s, 3)
    assert ids.tolist() == [[1, 4, 7], [0, 1, 6]] or ids[1].tolist()[:1] == [0]
    assert ids.tolist()[0] == [1, 4, 7] and torch.equal(sc, s.gather(1, ids))
    ids, _ = choose(s, 4, chunk=2)  # runs (0,1) (2,3) (4,5) (6,7): layer 0 best (0,1)=2.5 (4,5)=4.5
    assert ids.tolist() == [[0, 1, 4, 5], [0, 1, 6, 7]]
    ids, _ = choose(s, 3, recent=2)
    assert ids[:, -2:].tolist() == [[6, 7], [6, 7]] and ids.tolist()[0][0] == 4
    ids, _ = choose(s, 5, chunk=3)  # runs of 3, a last run of 2: exactly 5 per layer
    assert ids.shape == (2, 5) and all(len(set(r)) == 5 for r in ids.tolist())
    ids, _ = choose(s, 100)
    assert ids.shape == (2, 8)


def test_queries_fold_over_grouped_heads():
    q = torch.arange(2 * 4 * 3 * 2, dtype=torch.float32).reshape(2, 4, 3, 2)  # Y=2, Hq=4, n=3, D=2
    folded = fold_queries(q, 2 * 2)  # two key heads: query heads (0, 1) and (2, 3)
    mean = q.mean(dim=2)
    assert torch.allclose(folded[0], torch.cat([mean[0, 0] + mean[0, 1], mean[0, 2] + mean[0, 3]]))
    with pytest.raises(RetrievalError):
        fold_queries(q, 3)


class _Index:
    """A BlockIndex over given per-layer keys (the retriever's view of a store)."""

    def __init__(self, keys):
        self.keys = keys  # [N, Y, V]

    def count(self, level):
        return self.keys.shape[0]

    def layer_scores(self, level, queries, chunk=65536):
        return torch.einsum("yv,nyv->yn", queries, self.keys)


def test_each_layer_reads_its_own_blocks_and_gets_its_own_context():
    y, v, n = 2, 4, 6
    keys = torch.zeros(n, y, v)
    keys[2, 0, 0] = keys[4, 0, 0] = 1.0  # layer 0 prefers blocks 2 and 4
    keys[1, 1, 1] = keys[5, 1, 1] = 1.0  # layer 1 prefers blocks 1 and 5
    queries = torch.zeros(y, 2, 1, 2)  # Y, Hq=2, n=1, D=2 -> folded [Y, 2 * 2] with one key head per query head
    queries[0, 0, 0, 0] = 1.0
    queries[1, 0, 0, 1] = 1.0
    query = Query("q", torch.zeros(v), 0.0, n, probe=lambda: queries)
    (hits,) = LayerwiseRetriever().retrieve(query, _Index(keys), {"frame": 2})
    assert hits.layer_ids.tolist() == [[2, 4], [1, 5]]
    assert sorted(hits.ids.tolist()) == [1, 2, 4, 5]
    # assembly: block b's KV is filled with b; each layer's context holds its own blocks in time order
    kv = torch.arange(n, dtype=torch.float32)[:, None, None, None, None, None].expand(n, y, 2, 1, 3, 2).clone()

    class _Store(_Index):
        def load_kv(self, level, ids):
            return kv[ids]

        def metadata(self, level, ids):
            return BlockMeta(ids, ids + 1, ids.double(), ids.double())

        def positions(self, level, ids):
            return (ids[:, None] * 3 + torch.arange(3)) + 10

    pieces = page_in(_Store(keys), [hits], ["frame"], positions=True)
    prefix = torch.full((y, 2, 1, 1, 4, 2), -1.0)
    out = assemble_context(prefix, pieces, "time")
    assert out.kv.shape == (y, 2, 1, 1, 4 + 6, 2)
    assert out.kv[0, 1, 0, 0, 4:, 0].tolist() == [2, 2, 2, 4, 4, 4]
    assert out.kv[1, 1, 0, 0, 4:, 0].tolist() == [1, 1, 1, 5, 5, 5]
    assert [pieces[0].ids[r].item() for _, r in out.block_order] == [1, 2, 4, 5]  # the union, in time order
    assert out.layer_share == [0.5, 0.5, 0.5, 0.5]
    # re-rotation: every layer's keys move from their stored positions to 4, 5, ... (identity here: count moves)
    moved = []
    assemble_context(prefix, pieces, "time", lambda k, old, new: moved.append((old.tolist(), new.tolist())) or k)
    assert moved[0] == ([16, 17, 18, 22, 23, 24], [4, 5, 6, 7, 8, 9])
    assert moved[1] == ([13, 14, 15, 25, 26, 27], [4, 5, 6, 7, 8, 9])


def test_per_layer_ids_must_be_among_the_hits():
    hits = Hits("frame", torch.tensor([1, 2]), torch.tensor([1.0, 0.5]), torch.tensor([[1, 3], [1, 2]]))
    with pytest.raises(RetrievalError, match="not among"):
        page_in(_Index(torch.zeros(4, 2, 2)), [hits], ["frame"], positions=False)
    h = layer_hits("frame", torch.tensor([[0, 3], [3, 5]]), torch.tensor([[0.1, 0.9], [0.2, 0.3]]))
    assert h.ids.tolist() == [3, 5, 0] and h.scores[0] == pytest.approx(0.9)


# ------------------------------------------------------------------ end to end, budgets, stores
def test_session_with_rekv_reads_its_budget_per_layer(tiny_model, frames):
    with mukv.Session(model=tiny_model, config=rekv_config(window=2, top_k=4)) as s:
        s.feed(frames(12, seed=5))
        ans = s.ask("what color was the car?", max_new_tokens=2)
        t = tiny_model.tokens_per_frame
        assert ans.kv_tokens - s.prefix.length == 4 * t  # every layer reads exactly its top-k frames
        share = sum(b.layer_share for b in ans.blocks)
        assert share == pytest.approx(4)
        assert len({(b.frame_start, b.frame_end) for b in ans.blocks}) == len(ans.blocks)
        assert [b.frame_start for b in ans.blocks] == sorted(b.frame_start for b in ans.blocks)


def test_a_level_without_layer_keys_is_refused_before_anything_is_stored(tiny_model, frames, tmp_path, monkeypatch):
    """The layerwise retriever reads per-layer keys: a level it would search without them is refused
    when a stream is created (every question would fail), whether the levels come from config over
    the rekv policy, from a reopening or from a fork that turns the retriever on. A stream written
    that way before the check still opens (inspect works) and answers through another retriever."""
    cfg = rekv_config()
    cfg["levels"][0]["layer_keys"] = False
    with pytest.raises(mukv.ConfigError, match="'frame' are stored without them"):
        mukv.Session(model=tiny_model, config=cfg)
    store = tmp_path / "s.mukv"
    with pytest.raises(mukv.ConfigError, match="layer_keys"):
        mukv.Session(model=tiny_model, backend="lancedb", path=store, config=cfg)
    assert not store.exists()  # refused before the store was touched
    with pytest.raises(mukv.ConfigError, match="'patch', 'frame', 'segment'"):
        mukv.Session(model=tiny_model, policy="rekv", config={"levels": MukvConfig().model_dump()["levels"]})
    with mukv.Session(model=tiny_model, backend="lancedb", path=store) as s:
        s.feed(frames(4))
        with pytest.raises(mukv.ConfigError, match="layer_keys"):
            s.fork(config={"retrieval": {"retriever": "layerwise"}})
        assert s.ask("what color?", max_new_tokens=2).text is not None  # the session goes on
    with pytest.raises(mukv.ConfigError, match="layer_keys"):
        mukv.Session.open(store, model=tiny_model, config={"retrieval": {"retriever": "layerwise"}})

    legacy = tmp_path / "legacy.mukv"  # written before sessions checked this
    monkeypatch.setattr("mukv.opening.check_retriever_levels", lambda *a: None)
    with mukv.Session(model=tiny_model, backend="lancedb", path=legacy, config=cfg) as s:
        s.feed(frames(4))
    monkeypatch.undo()
    with mukv.Session.open(legacy, model=tiny_model) as s:
        assert s.stats()["frames"] == 4
        with pytest.raises(RetrievalError, match="another retriever"):
            s.ask("what color?")
        assert s.fork(config={"retrieval": {"retriever": "cosine"}}).ask("what color?", max_new_tokens=2).text \
            is not None


def test_a_level_without_layer_keys_cannot_be_asked_per_layer(tiny_model, frames):
    """A level the retriever does not search by default (top_k 0) may lack per-layer keys; a question
    that asks for its blocks anyway gets a clear RetrievalError."""
    cfg = rekv_config()
    cfg["levels"].append({"name": "segment", "extractor": "segment", "frames": 2, "keep_ratio": 0.5, "top_k": 0})
    with mukv.Session(model=tiny_model, config=cfg) as s:
        s.feed(frames(4))
        assert s.ask("what color?", max_new_tokens=2).text is not None
        with pytest.raises(RetrievalError, match="per-layer keys"):
            s.ask("what color?", top_k={"segment": 1})


def test_rekv_stream_on_disk_reopens_with_its_keys_and_window(tiny_model, frames, tmp_path):
    """A stream fed in two sessions (closed and reopened between) stores the same KV and keys as one
    fed at once: the window is read back from the store."""
    fr = frames(10, seed=6)
    cfg = rekv_config(window=3)
    with mukv.Session(model=tiny_model, config=cfg) as s:
        s.feed(fr)
        ids = torch.arange(10)
        kv_ref, lk_ref = s.backend.load_kv("frame", ids), s.backend.layer_keys("frame", ids)
        pos_ref = s.backend.positions("frame", ids)
        ans_ref = s.ask("what color was the car?", max_new_tokens=3)
    store = tmp_path / "s.mukv"
    with mukv.Session(model=tiny_model, backend="lancedb", path=store, config=cfg) as s:
        s.feed(fr[:6])
    with mukv.Session.open(store, model=tiny_model) as s:
        s.feed(fr[6:])
        assert s.backend.count("frame") == 10
        kv, pos = s.backend.load_kv("frame", ids), s.backend.positions("frame", ids)
        torch.testing.assert_close(kv[:, :, 1], kv_ref[:, :, 1], rtol=1e-4, atol=1e-4)  # values
        for b in range(10):  # keys: the same once at the same positions (the reopened window was moved back)
            moved = rerotate(tiny_model, kv[b, :, 0], pos[b], pos_ref[b])
            torch.testing.assert_close(moved, kv_ref[b, :, 0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(s.backend.layer_keys("frame", ids), lk_ref, rtol=0, atol=1e-3)
    with mukv.Session.open(store, model=tiny_model) as s:
        ans = s.ask("what color was the car?", max_new_tokens=3)
        assert ans.text == ans_ref.text and [b.block_id for b in ans.blocks] == [b.block_id for b in ans_ref.blocks]


def test_disk_store_refuses_keys_for_some_blocks_only(tiny_model, frames, tmp_path):
    cfg = rekv_config()
    with mukv.Session(model=tiny_model, backend="lancedb", path=tmp_path / "a.mukv", config=cfg) as s:
        s.feed(frames(2))
        blocks = s._ingestor  # a batch of the same level without keys is refused, nothing stored
        n = s.backend.count("frame")
        from mukv.blocks import CompressedBlocks

        kv = s.backend.load_kv("frame", torch.tensor([0]))
        bad = CompressedBlocks("frame", kv, torch.zeros(1, tiny_model.layout.vector_dim), torch.arange(kv.shape[4])[None],
                               torch.zeros(1, kv.shape[4], dtype=torch.long), torch.tensor([5]), torch.tensor([6]),
                               torch.tensor([5.0]), torch.tensor([5.0]), torch.zeros(1, kv.shape[4], dtype=torch.long))
        with pytest.raises(StoreError, match="per-layer keys"):
            s.backend.add(bad)
        assert s.backend.count("frame") == n and blocks is not None


def test_streams_stored_with_the_former_rekv_configuration_still_open(tiny_model, frames, tmp_path):
    """Before issue 19 the policy called rekv stored frames prefilled alone and retrieved by cosine; a
    stream stored with that configuration reopens with it (the store keeps its configuration)."""
    former = {"levels": [{"name": "frame", "extractor": "frame", "frames": 1, "keep_ratio": 1.0, "alpha": 0.5,
                          "top_k": 4}],
              "retrieval": {"retriever": "cosine", "guide_level": None}, "assembly": {"order": "level_score"}}
    store = tmp_path / "old.mukv"
    with mukv.Session(model=tiny_model, backend="lancedb", path=store, config=former) as s:
        s.feed(frames(6))
        before = s.ask("what color?", max_new_tokens=2)
    with mukv.Session.open(store, model=tiny_model) as s:
        assert s.config.retrieval.retriever == "cosine" and s.config.levels[0].local_window == 0
        after = s.ask("what color?", max_new_tokens=2)
    assert after.text == before.text and [b.block_id for b in after.blocks] == [b.block_id for b in before.blocks]


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_rekv_runs_on_m_rope_models(family, frames):
    from mukv.plugins.models.qwen2_5_vl import build_qwen2_5_vl
    from mukv.plugins.models.qwen3_vl import build_qwen3_vl

    model = (build_qwen2_5_vl("tiny-qwen2.5-vl", device="cpu") if family == "qwen2.5-vl"
             else build_qwen3_vl("tiny-qwen3-vl", device="cpu"))
    pre = model.prefix()
    e = encode(model, frames(1, size=64))
    t = model.tokens_per_frame
    one, _, codes = prefill_window(model, pre, e, torch.arange(t)[None], None, span=0)
    alone, _, pos = model.prefill_blocks(pre, e, attention=False, token_index=torch.arange(t)[None])
    torch.testing.assert_close(one, alone, rtol=1e-4, atol=1e-4)
    assert torch.equal(codes.reshape(-1), pos.expand(1, -1).reshape(-1))
    enc = WindowEncoder(model, pre, 2, t)
    first, _, c0 = enc.encode(e, torch.arange(t)[None])
    torch.testing.assert_close(first, alone, rtol=1e-4, atol=1e-4)
    second, _, c1 = enc.encode(e, torch.arange(t)[None])  # the same frame again, after the first
    assert int(c1.min()) > int(c0.max()) - 1
    with mukv.Session(model=model, config=rekv_config(window=2, top_k=2)) as s:
        s.feed(frames(5, size=64))
        ans = s.ask("what color?", max_new_tokens=2)
        assert ans.kv_tokens - s.prefix.length == 2 * t


def test_windowed_levels_of_several_blocks_per_window_and_compressed_blocks(tiny_model, frames):
    """A patch level (four 49-token blocks per frame) runs its window's blocks in one forward under a
    band mask, and a compressed windowed level is scored by its own attention; either way the stored
    blocks do not depend on how the frames were fed."""
    cfg = {"levels": [
        {"name": "patch", "extractor": "patch_raster", "tokens": 49, "keep_ratio": 1.0, "top_k": 4,
         "local_window": 6, "layer_keys": True},
        {"name": "frame", "extractor": "frame", "keep_ratio": 0.25, "alpha": 0.7, "top_k": 2, "local_window": 2}],
        "retrieval": {"retriever": "cosine", "guide_level": None}}
    fr = frames(6, seed=8)
    out = []
    for batch in (6, 4):
        with mukv.Session(model=tiny_model, config=cfg) as s:
            for i in range(0, 6, batch):
                s.feed(fr[i : i + batch])
            out.append({lv: s.backend.load_kv(lv, torch.arange(s.backend.count(lv))) for lv in ("patch", "frame")})
            assert s.backend.count("patch") == 24 and s.backend.count("frame") == 6
            assert s.ask("what color?", max_new_tokens=1).levels() == {"patch": 4, "frame": 2}
    for lv in ("patch", "frame"):
        torch.testing.assert_close(out[0][lv], out[1][lv], rtol=0, atol=1e-5)


def test_bad_per_layer_hits_are_refused(tiny_model):
    bad = Hits("frame", torch.tensor([0, 1]), torch.tensor([1.0, 0.5]), torch.tensor([0, 1]))
    with pytest.raises(RetrievalError, match=r"\[layers, k\]"):
        page_in(_Index(torch.zeros(4, 2, 2)), [bad], ["frame"], positions=False)


def test_an_impossible_window_is_a_config_error(tiny_model):
    from mukv.errors import ConfigError

    with pytest.raises(ConfigError):
        MukvConfig.build(rekv_config(window=10**6))
    with pytest.raises(ConfigError, match="window buffer"):
        WindowEncoder(tiny_model, tiny_model.prefix(), 100_000, 10**7)


def test_the_question_runs_through_each_layers_own_blocks(tiny_model, frames):
    """ReKV's question pass (layer_probe "memory"): layer y + 1's queries are formed after the question
    attended, in layer y, to the blocks layer y chose. The same as running the question over the
    assembled per-layer context; layer 0's queries are those after the system prompt alone."""
    from mukv.model import kv_to_cache
    from mukv.local_window import _Masked, question_probe

    with mukv.Session(model=tiny_model, config=rekv_config(window=2, top_k=2)) as s:
        s.feed(frames(6, seed=9))
        t, p = tiny_model.tokens_per_frame, s.prefix.length
        fixed = {0: [1, 3], 1: [0, 4]}
        probe = question_probe(tiny_model, s.prefix, "what color?", s.backend, 2 * t)

        def choose(layer, queries):
            return [Hits("frame", torch.tensor(fixed[layer]), torch.ones(2))]

        through = probe(choose)
        alone = probe()
        hits = Hits("frame", torch.tensor([0, 1, 3, 4]), torch.ones(4), torch.tensor([fixed[0], fixed[1]]))
        pieces = page_in(s.backend, [hits], ["frame"], positions=True)
        ctx = assemble_context(s.prefix.kv, pieces, "time", lambda k, old, new: rerotate(tiny_model, k, old, new),
                               tiny_model.timeline)
        ids = tiny_model.tokenize(tiny_model.query_template.format(question="what color?"))
        pos = torch.arange(p + 2 * t, p + 2 * t + ids.numel())
        got = []
        with _Masked(None, lambda m, q, k, v, sc: got.append(q[0])):
            tiny_model.language_model(input_ids=ids[None], past_key_values=kv_to_cache(ctx.kv, extra=ids.numel()),
                                      position_ids=pos[None], use_cache=True)
        ref = rerotate(tiny_model, torch.stack(got), pos, torch.zeros_like(pos)).float()
        torch.testing.assert_close(through, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(through[0], alone[0], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(through[1], alone[1], atol=1e-3)
        # the rekv policy runs it end to end
        assert MukvConfig.from_policy("rekv").retrieval.layer_probe == "memory"
        bad = question_probe(tiny_model, s.prefix, "what color?", s.backend, 3 * t)
        with pytest.raises(RetrievalError, match="every layer must read"):
            bad(choose)


@pytest.mark.parametrize("backend", ["memory", "lancedb"])
def test_a_failed_feed_of_a_windowed_level_leaves_no_trace_in_its_window(tiny_model, frames, tmp_path, backend):
    """A feed refused part-way (the third block's store fails) rolls back; its retry stores what one
    clean pass stores: the window encoder does not keep the rolled-back blocks (issue 15 with issue 19)."""
    fr = frames(10, seed=7)
    cfg = rekv_config(window=3)
    with mukv.Session(model=tiny_model, config=cfg) as s:
        s.feed(fr)
        ids = torch.arange(10)
        kv_ref, pos_ref = s.backend.load_kv("frame", ids), s.backend.positions("frame", ids)
        lk_ref = s.backend.layer_keys("frame", ids)
    opts = {"path": tmp_path / "s.mukv"} if backend == "lancedb" else {}
    with mukv.Session(model=tiny_model, backend=backend, config=cfg, **opts) as s:
        s.feed(fr[:4])
        real, calls = s.backend.add, []

        def failing(blocks):
            calls.append(1)
            if len(calls) == 3:
                raise StoreError("disk full (injected)")
            return real(blocks)

        s.backend.add = failing
        with pytest.raises(StoreError, match="injected"):
            s.feed(fr[4:8])
        s.backend.add = real
        assert s.backend.count("frame") == 4 and s.stats()["frames"] == 4
        s.feed(fr[4:8])
        s.feed(fr[8:])
        assert s.backend.count("frame") == 10
        kv, pos = s.backend.load_kv("frame", ids), s.backend.positions("frame", ids)
        torch.testing.assert_close(kv[:, :, 1], kv_ref[:, :, 1], rtol=1e-4, atol=1e-4)
        for b in range(10):
            moved = rerotate(tiny_model, kv[b, :, 0], pos[b], pos_ref[b])
            torch.testing.assert_close(moved, kv_ref[b, :, 0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(s.backend.layer_keys("frame", ids), lk_ref, rtol=0, atol=1e-3)
