"""Re-rotation onto one timeline: with one decoder layer, per-block KV equals full-context KV
up to rotation, so time-ordered re-rotated assembly must reproduce full-context logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mukv
from mukv.model import kv_to_cache
from mukv.rope import rerotate_1d


@pytest.fixture(scope="module")
def one_layer_model():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from mukv.plugins.models.llava_onevision import REAL_CONFIGS, LlavaOnevisionAdapter
    from mukv.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer()
    shape = REAL_CONFIGS["tiny-llava-ov"]
    cfg = LlavaOnevisionConfig(
        text_config={**shape["text_config"], "num_hidden_layers": 1, "vocab_size": len(tok)},
        vision_config=shape["vision_config"], image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=True)
    torch.manual_seed(3)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    attn = model.model.language_model.layers[0].self_attn
    with torch.no_grad():  # sharpen attention so positions matter (random weights attend almost uniformly)
        attn.q_proj.weight.mul_(6.0)
        attn.k_proj.weight.mul_(6.0)
    return LlavaOnevisionAdapter(model, tok, name="one-layer")


def test_rerotation_composes(tiny_model):
    rot = tiny_model.language_model.rotary_emb
    k = torch.randn(2, 5, 16)
    zero = torch.zeros(5, dtype=torch.long)
    at = torch.tensor([3, 7, 7, 100, 4])
    k_at = rerotate_1d(rot, k, zero, at)
    back = rerotate_1d(rot, k_at, at, zero)
    assert torch.allclose(back, k, atol=1e-5)
    two = rerotate_1d(rot, rerotate_1d(rot, k, zero, at), at, at + 9)
    assert torch.allclose(two, rerotate_1d(rot, k, zero, at + 9), atol=1e-4)


@torch.inference_mode()
def _full_context_logits(model, frames, question):
    prefix = model.prefix()
    embeds = model.encode_frames(torch.from_numpy(frames)).reshape(1, -1, model.hidden_size)
    prompt = model.tokenize(model.answer_template.format(question=question))
    seq = torch.cat([model.embed(prefix.token_ids[None]), embeds, model.embed(prompt[None])], dim=1)
    return model.lm_head(model.language_model(inputs_embeds=seq).last_hidden_state[:, -1])


@torch.inference_mode()
def _captured_logits(model, session, question, monkeypatch):
    box = {}
    real = model.generate

    def spy(context, q, max_new_tokens, start_position=None):
        box["context"] = context
        return real(context, q, max_new_tokens, start_position)

    monkeypatch.setattr(model, "generate", spy)
    session.ask(question, max_new_tokens=1)
    ctx = box["context"]
    prompt = model.tokenize(model.answer_template.format(question=question))
    cache = kv_to_cache(ctx)
    c = ctx.shape[4]
    pos = torch.arange(c, c + prompt.numel())[None]
    hidden = model.language_model(input_ids=prompt[None], past_key_values=cache, position_ids=pos).last_hidden_state
    return model.lm_head(hidden[:, -1])


FRAMES_ALL = {"levels": [{"name": "frame", "extractor": "frame", "keep_ratio": 1.0, "top_k": 1000}],
              "retrieval": {"retriever": "all"}}


def test_time_ordered_rerotated_assembly_reproduces_full_context(one_layer_model, monkeypatch):
    frames = np.random.default_rng(0).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    q = "what color was the circle?"
    ref = _full_context_logits(one_layer_model, frames, q)
    cfg = {**FRAMES_ALL, "assembly": {"order": "time", "rerotate": True}}
    with mukv.Session(model=one_layer_model, config=cfg) as s:
        s.feed(frames)
        got = _captured_logits(one_layer_model, s, q, monkeypatch)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


def test_without_rerotation_blocks_overlap_and_logits_differ(one_layer_model, monkeypatch):
    frames = np.random.default_rng(0).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    q = "what color was the circle?"
    ref = _full_context_logits(one_layer_model, frames, q)
    with mukv.Session(model=one_layer_model, config={**FRAMES_ALL, "assembly": {"order": "time"}}) as s:
        s.feed(frames)
        got = _captured_logits(one_layer_model, s, q, monkeypatch)
    assert (got - ref).abs().max() > 1e-2


def test_multi_level_rerotated_context_has_consecutive_positions(tiny_model, frames):
    with mukv.Session(model=tiny_model, policy="mukv_timeline") as s:
        s.feed(frames(8))
        a = s.ask("q?")
        assert [b.t_start for b in a.blocks] == sorted(b.t_start for b in a.blocks)
        assert a.kv_tokens == s.prefix.length + sum(b.tokens for b in a.blocks)
