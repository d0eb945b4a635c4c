"""The fast path against the reference mode (the authors' path) on the tiny models, float32 on the CPU.

In float32 the two paths agree to rounding: the same kept tokens, vectors and
KV, the same retrieved blocks and the same greedy answer. ``tests/gpu/`` runs
the same comparisons on the real architectures in bf16 on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from mukv.model import attention_column_sums, causal_attention, kv_to_cache
from mukv.reference import ReferenceIngestor, ReferenceStore, compare_kept, compare_tokens, session_context
from mukv.session import Session

QUESTION = "what color was the car ?"


@pytest.fixture(scope="module", params=["tiny-llava-ov", "tiny-qwen2.5-vl"])
def pair(request):
    """A fast session and a reference path over the same tiny model (1D RoPE, or Qwen2.5-VL's M-RoPE),
    fed the same 12 frames."""
    s = Session(model=request.param, device="cpu")
    gen = torch.Generator().manual_seed(0)
    # frame embeddings at the scale the tiny vision tower produces (the vision tower is not under test)
    embeds = 0.01 * torch.randn(12, s.model.tokens_per_frame, s.model.hidden_size, generator=gen)
    times = torch.arange(12, dtype=torch.float64) * 2.0
    stored = []
    s._ingestor.on_stored = stored.append
    s._ingestor.add_frames(embeds, times)
    ref = ReferenceIngestor.from_session(s)
    ref.add_frames(embeds, times)
    return s, ref, stored


def test_same_blocks_stored(pair):
    s, ref, stored = pair
    for lp in s.levels:
        name = lp.level.name
        n = s.backend.count(name)
        assert n == ref.store.count(name) > 0
        ids = torch.arange(n)
        fast_kept = torch.cat([c.kept for c in stored if c.level == name])
        cmp = compare_kept(fast_kept, ref.store.kept(name), ref.store.token_scores(name))
        assert cmp["identical"] == cmp["blocks"], (name, cmp)
        torch.testing.assert_close(s.backend.vectors(name, ids), ref.store.vectors(name), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s.backend.load_kv(name, ids), ref.store.kv(name), rtol=1e-4, atol=1e-5)
        assert torch.equal(s.backend.token_index(name, ids), ref.store.token_index(name))
        assert torch.equal(s.backend.positions(name, ids), ref.store.positions(name))


def test_same_retrieval_and_answer(pair):
    s, ref, _ = pair
    answer = s.ask(QUESTION, max_new_tokens=6)
    r = ref.ask(QUESTION, max_new_tokens=6)
    assert [(b.level, b.block_id) for b in answer.blocks] == [(lv, i) for lv, i, _ in r.blocks]
    assert answer.kv_tokens == r.kv_tokens
    assert answer.text == r.text
    context, order = session_context(s, QUESTION)
    assert order == [(lv, i) for lv, i, _ in r.blocks]
    _, tokens, _ = s.model.generate(context, QUESTION, 6)
    assert compare_tokens(tokens, r.tokens, r.margins)["same"]


def test_reference_over_a_fast_store(pair):
    """The reference question path over the fast backend's blocks retrieves the same blocks."""
    s, ref, _ = pair
    store = ReferenceStore.from_backend(s.backend, [lp.level.name for lp in s.levels])
    other = ReferenceIngestor.from_session(s, store)
    r = other.ask(QUESTION, max_new_tokens=3, stop=False)
    assert [(lv, i) for lv, i, _ in r.blocks] == session_context(s, QUESTION)[1]
    assert len(r.tokens) == 3


def test_compare_kept_reports_ties():
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1]])
    same = compare_kept(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]), scores)
    assert same == {"blocks": 1, "identical": 1, "max_gap": 0.0}
    tie = compare_kept(torch.tensor([[0, 2]]), torch.tensor([[0, 1]]), scores)
    assert tie["identical"] == 0 and tie["max_gap"] == 0.0
    wrong = compare_kept(torch.tensor([[0, 3]]), torch.tensor([[0, 1]]), scores)
    assert wrong["max_gap"] == pytest.approx(0.4)
    assert compare_tokens([1, 2], [1, 3], [5.0, 0.01]) == {"same": False, "first_diff": 1, "margin": 0.01}


@pytest.mark.parametrize("past,length,heads,kv_heads", [(0, 7, 4, 2), (5, 9, 6, 2), (3, 1, 4, 4)])
def test_column_sums_match_dense_attention(past, length, heads, kv_heads):
    gen = torch.Generator().manual_seed(past + length)
    b, d = 3, 8
    q = torch.randn(b, heads, length, d, generator=gen)
    k = torch.randn(b, kv_heads, past + length, d, generator=gen)
    rep = heads // kv_heads
    logits = q @ k.repeat_interleave(rep, dim=1).transpose(-1, -2) * d**-0.5
    mask = torch.ones(length, past + length, dtype=torch.bool).tril(past)
    weights = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    dense = weights.sum(dim=2).mean(dim=1)  # [B, S]
    for chunk_bytes in (None, 1):  # one chunk, and one query row per chunk
        got = attention_column_sums(q, k, None, chunk_bytes=chunk_bytes)
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


def test_causal_attention_matches_masked_sdpa():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=gen)
    k, v = torch.randn(2, 2, 9, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen)
    mask = torch.ones(5, 9, dtype=torch.bool).tril(4)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    torch.testing.assert_close(causal_attention(q, k, v, None), ref, rtol=1e-5, atol=1e-5)


def test_buffer_cache_grows_past_its_capacity():
    kv = torch.randn(2, 2, 1, 2, 3, 4)
    cache = kv_to_cache(kv, extra=1)
    new = torch.randn(1, 2, 1, 4)
    k, _ = cache.layers[0].update(new, new)
    assert k.shape[2] == 4 and torch.equal(k[:, :, :3], kv[0, 0]) and torch.equal(k[:, :, 3:], new)
    k, v = cache.layers[0].update(new * 2, new * 3)  # past the preallocated room: the buffer doubles
    assert k.shape[2] == 5 and torch.equal(k[:, :, 3:4], new) and torch.equal(v[:, :, 4:], new * 3)
    assert cache.get_seq_length() == 5


def test_static_decode_matches_eager():
    """The question-time workspace path (CUDA graphs on a GPU) run eagerly on the CPU
    gives the eager path's query vector and greedy tokens, for any start position."""
    from mukv.plugins.models.llava_onevision import build_llava_onevision

    model = build_llava_onevision("tiny-llava-ov", device="cpu", seed=3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a random lm_head and embeddings, so that greedy tokens vary
        model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=gen))
        emb = model.language_model.get_input_embeddings().weight
        emb.copy_(0.5 * torch.randn(emb.shape, generator=gen))
    model.stop_ids = []
    prefix = model.prefix()
    context = torch.cat([prefix.kv, torch.randn(*prefix.kv.shape[:4], 300, prefix.kv.shape[5], generator=gen)], dim=4)
    for question, start in ((QUESTION, None), ("where did the red square move after the blue circle appeared ?", 999)):
        model.static_decode = False
        vec, (_, tokens, _) = model.query_vector(prefix, question), model.generate(context, question, 12, start)
        model.static_decode = True
        vec_s, (_, tokens_s, _) = model.query_vector(prefix, question), model.generate(context, question, 12, start)
        torch.testing.assert_close(vec_s, vec, rtol=1e-4, atol=1e-5)
        assert tokens_s == tokens and len(set(tokens)) > 1
