"""The language-model side: batched block prefill, last-layer column sums, query vector, decoding."""

from __future__ import annotations

import torch

from mukv.model import cache_to_kv, kv_to_cache


def _eager_colsums(model, prefix, embeds):
    """Reference: one block at a time, eager attention with weights from every layer."""
    lm = model.language_model
    old = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"
    try:
        out = []
        for e in embeds:
            cache = kv_to_cache(prefix.kv.clone())
            p = prefix.length
            pos = torch.arange(p, p + e.shape[0])[None]
            r = lm(inputs_embeds=e[None], past_key_values=cache, position_ids=pos, use_cache=True,
                   output_attentions=True)
            w = r.attentions[-1]  # [1, heads, L, P + L]
            out.append((w.sum(dim=2).mean(dim=1)[0, p:], cache_to_kv(cache)[:, :, :, :, p:]))
        return out
    finally:
        lm.config._attn_implementation = old


def test_batched_prefill_matches_one_block_at_a_time(tiny_model):
    torch.manual_seed(0)
    prefix = tiny_model.prefix()
    embeds = torch.randn(3, 20, tiny_model.hidden_size)
    kv, cols, positions = tiny_model.prefill_blocks(prefix, embeds)
    assert kv.shape == (2, 2, 3, 2, 20, 16)
    assert positions.tolist() == list(range(prefix.length, prefix.length + 20))
    ref = _eager_colsums(tiny_model, prefix, embeds)
    for b, (ref_cols, ref_kv) in enumerate(ref):
        assert torch.allclose(cols[b], ref_cols, atol=1e-4), (cols[b], ref_cols)
        assert torch.allclose(kv[:, :, b], ref_kv[:, :, 0], atol=1e-4)


def test_column_sums_sum_to_query_count_minus_prefix_share(tiny_model):
    prefix = tiny_model.prefix()
    embeds = torch.randn(2, 12, tiny_model.hidden_size)
    _, cols, _ = tiny_model.prefill_blocks(prefix, embeds)
    # every query distributes 1.0 over prefix + block; the block share is at most L
    assert (cols.sum(-1) <= 12 + 1e-4).all() and (cols >= 0).all()
    # the first token is seen by every query: it gets at least the last query's share
    assert cols.shape == (2, 12)


def test_prefill_without_attention_skips_column_sums(tiny_model):
    _, cols, _ = tiny_model.prefill_blocks(tiny_model.prefix(), torch.randn(1, 5, tiny_model.hidden_size),
                                           attention=False)
    assert cols is None


def test_query_vector_is_last_layer_key_of_final_token(tiny_model):
    prefix = tiny_model.prefix()
    v = tiny_model.query_vector(prefix, "what color was the car?")
    assert v.shape == (tiny_model.layout.vector_dim,)
    ids = tiny_model.tokenize(tiny_model.query_template.format(question="what color was the car?"))
    full = torch.cat([prefix.token_ids, ids])[None]
    out = tiny_model.language_model(input_ids=full, use_cache=True)
    assert torch.allclose(v, out.past_key_values.layers[-1].keys[0, :, -1].reshape(-1), atol=1e-5)


def test_generate_matches_plain_greedy_decoding(tiny_model):
    prefix = tiny_model.prefix()
    text, ids, timings = tiny_model.generate(prefix.kv, "what is it?", max_new_tokens=5)
    prompt = tiny_model.tokenize(tiny_model.answer_template.format(question="what is it?"))
    seq = torch.cat([prefix.token_ids, prompt])[None]
    ref = []
    for _ in range(len(ids)):
        logits = tiny_model.lm_head(tiny_model.language_model(input_ids=seq).last_hidden_state[:, -1])
        tok = int(logits.argmax(-1))
        ref.append(tok)
        seq = torch.cat([seq, torch.tensor([[tok]])], dim=1)
    assert ids == ref
    assert set(timings) >= {"prefill", "first_token", "generate"}


def test_encode_frames_gives_grid_tokens(tiny_model):
    frames = torch.randint(0, 255, (3, 40, 50, 3), dtype=torch.uint8)
    e = tiny_model.encode_frames(frames)
    assert e.shape == (3, 196, tiny_model.hidden_size)
    assert tiny_model.grid == (14, 14)


def test_sessions_of_one_model_and_prompt_share_one_query_workspace(tiny_model):
    """Each session computes its own prefix; equal prefixes reuse one static workspace (on CUDA: graphs captured
    once, not per session), a different system prompt gets its own, and the vectors are those of the eager path."""
    import mukv

    question = "what color was the car ?"
    tiny_model.static_decode = True  # the static path, run eagerly on the CPU
    try:
        sessions = [mukv.Session(model=tiny_model, backend="memory") for _ in range(6)]
        vectors = [tiny_model.query_vector(s.prefix, question) for s in sessions]
        assert len({id(d) for kv, d in tiny_model._query_decoders if torch.equal(kv, sessions[0].prefix.kv)}) == 1
        other = tiny_model.prefix("another system prompt")
        tiny_model.query_vector(other, question)
        assert tiny_model._query_decoders[0][0] is other.kv
        again = tiny_model.query_vector(sessions[3].prefix, question)  # found again, moved to the front
        assert torch.equal(tiny_model._query_decoders[0][0], sessions[3].prefix.kv)
        tiny_model.static_decode = False
        eager = tiny_model.query_vector(sessions[0].prefix, question)
    finally:
        tiny_model.static_decode = None
    for v in [*vectors, again]:
        torch.testing.assert_close(v, eager, rtol=1e-4, atol=1e-5)
