"""Qwen2.5-VL and Qwen3-VL adapters: patch layout, M-RoPE positions, DeepStack, re-rotated
assembly against the full context, checkpoints, and a session end to end.

References are transformers' own code: ``Qwen2VLImageProcessorPil`` for the patch layout,
the models' own forward (vision tower, ``get_rope_index``, DeepStack) for block prefill,
and ``get_rope_index`` positions for the full-context logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mukv
from mukv.model import kv_to_cache
from mukv.plugins.models.qwen2_5_vl import CLIP_MEAN, CLIP_STD, Qwen2_5_VLAdapter, build_qwen2_5_vl, patchify
from mukv.plugins.models.qwen3_vl import Qwen3VLAdapter, build_qwen3_vl
from mukv.rope import MRopeLayout, mrope_rows, pack_mrope, rerotate_rows, unpack_mrope

FAMILIES = ["qwen2.5-vl", "qwen3-vl"]
#: Float32 logits of the re-rotated context against the full context (the LLaVA test's tolerance).
LOGITS_ATOL = 1e-4


def _build(family: str, **kwargs):
    if family == "qwen2.5-vl":
        return build_qwen2_5_vl("tiny-qwen2.5-vl", **kwargs)
    return build_qwen3_vl("tiny-qwen3-vl", **kwargs)


@pytest.fixture(scope="module")
def models():
    """The tiny presets (2 decoder layers), built once."""
    return {f: _build(f) for f in FAMILIES}


def _one_layer(family: str):
    """A 1-layer model with sharpened attention (random weights attend almost uniformly,
    so positions would hardly matter). Qwen2.5-VL at 1 s per frame: t_stride 1."""
    kwargs = {"seconds_per_frame": 1.0} if family == "qwen2.5-vl" else {}
    model = _build(family, seed=3, text_overrides={"num_hidden_layers": 1}, **kwargs)
    attn = model.language_model.layers[0].self_attn
    with torch.no_grad():
        if hasattr(attn, "q_norm"):  # Qwen3: q/k are RMS-normalised after the projection
            attn.q_norm.weight.mul_(6.0)
            attn.k_norm.weight.mul_(6.0)
        else:
            attn.q_proj.weight.mul_(6.0)
            attn.k_proj.weight.mul_(6.0)
    return model


def _frames(n: int, seed: int = 0, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------ patch layout
def _slow_patchify(img: np.ndarray, p: int, m: int, t: int) -> np.ndarray:
    """The documented layout, one patch at a time: merge groups of m x m patches in raster
    order, patches in raster order inside a group, each patch flattened (C, t, ph, pw)."""
    c, h, w = img.shape
    gh, gw = h // p, w // p
    rows = []
    for bi in range(gh // m):
        for bj in range(gw // m):
            for mi in range(m):
                for mj in range(m):
                    r, col = bi * m + mi, bj * m + mj
                    patch = img[:, r * p:(r + 1) * p, col * p:(col + 1) * p]  # [C, p, p]
                    rows.append(np.repeat(patch[:, None], t, axis=1).reshape(-1))
    return np.stack(rows)


def test_patch_layout_matches_qwen_image_processor_and_slow_reference():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    x = torch.randn(2, 3, 16, 24)
    got = patchify(x, patch_size=2, merge_size=2, temporal_patch_size=2)
    assert got.shape == (2 * 8 * 12, 3 * 2 * 2 * 2)
    slow = np.concatenate([_slow_patchify(img.numpy(), 2, 2, 2) for img in x])
    assert np.array_equal(got.numpy(), slow)

    frames = _frames(2, size=56)
    adapter = Qwen2_5_VLAdapter.__new__(Qwen2_5_VLAdapter)  # only the preprocessing fields
    adapter.device, adapter.dtype = torch.device("cpu"), torch.float32
    adapter.patch_size, adapter.merge_size, adapter.temporal_patch_size = 2, 2, 2
    adapter.frame_size = (56, 56)
    adapter._mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    adapter._std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    flat, grid = adapter.pixel_values(torch.from_numpy(frames))
    proc = Qwen2VLImageProcessorPil(patch_size=2, merge_size=2, temporal_patch_size=2, do_resize=False)
    ref = proc(images=list(frames), return_tensors="pt")
    assert grid.tolist() == ref["image_grid_thw"].tolist() == [[1, 28, 28]] * 2
    assert torch.allclose(flat, ref["pixel_values"].float(), atol=1e-5)


def test_resize_follows_the_processors_bicubic_resize(models):
    """Frames of any size are resized as Qwen's processor does (PIL bicubic): on a smooth
    non-square image the normalised pixels agree closely (torch's antialiased bicubic)."""
    from PIL import Image

    m = models["qwen2.5-vl"]
    y, x = np.mgrid[0:90, 0:150]
    img = np.stack([(127 + 100 * np.sin(x / 9.0 + c) * np.cos(y / 7.0)).astype(np.uint8) for c in range(3)], -1)
    ours = m.preprocess(torch.from_numpy(img[None]))[0]
    pil = np.asarray(Image.fromarray(img).resize(m.frame_size[::-1], Image.BICUBIC), dtype=np.float32) / 255
    ref = (torch.from_numpy(pil).permute(2, 0, 1) - m._mean[0]) / m._std[0]
    assert (ours - ref).abs().mean() < 0.02 and (ours - ref).abs().max() < 0.1


# ------------------------------------------------------------------------------ M-RoPE positions
def test_mrope_codes_round_trip_and_rows():
    o, dt = torch.tensor([5, 900_000]), torch.tensor([0, 2_000_000])
    h, w = torch.tensor([3, 2047]), torch.tensor([0, 9])
    codes = pack_mrope(o, dt, h, w)
    assert all(torch.equal(a, b) for a, b in zip(unpack_mrope(codes), (o, dt, h, w)))
    assert mrope_rows(codes).tolist() == [[5, 2_900_000], [8, 902_047], [5, 900_009]]
    with pytest.raises(ValueError):
        pack_mrope(torch.tensor([0]), torch.tensor([0]), torch.tensor([2048]), torch.tensor([0]))


def test_mrope_timeline_lays_units_out_as_one_video():
    lay = MRopeLayout((2, 3), t_stride=4, origin_stride=0)
    # a 2-frame block (cells 0 and 5 of each frame) then a 1-frame block, prefilled after P = 7
    a = lay.block_codes(7, torch.tensor([[0, 5, 6, 11]]))[0]
    b = lay.block_codes(7, torch.tensor([[12, 17]]))[0]  # its own window: frame 2 counts as the block's frame 0
    assert mrope_rows(a).tolist() == [[7, 7, 11, 11], [7, 8, 7, 8], [7, 9, 7, 9]]
    assert torch.equal(a[:2], b)
    new, nxt = lay.timeline(torch.cat([b, a]), torch.tensor([0, 0, 1, 1, 1, 1]), 7)
    assert mrope_rows(new)[0].tolist() == [7, 7, 11, 11, 15, 15]  # three frames, t_stride apart
    assert torch.equal(mrope_rows(new)[1:], mrope_rows(torch.cat([b, a]))[1:])  # cells kept
    assert nxt == 7 + 8 + 1  # after the largest row of the video (Qwen's max + 1)
    q3 = MRopeLayout((2, 3), t_stride=0, origin_stride=3)
    new, nxt = q3.timeline(q3.block_codes(7, torch.tensor([[0, 5, 6, 11]]))[0], torch.zeros(4, dtype=torch.long), 7)
    assert mrope_rows(new).tolist() == [[7, 7, 10, 10], [7, 8, 10, 11], [7, 9, 10, 12]]
    assert nxt == 7 + 2 * 3


@pytest.mark.parametrize("family", FAMILIES)
def test_mrope_rerotation_moves_keys_between_positions(models, family):
    rot = models[family].language_model.rotary_emb
    k = torch.randn(2, 5, models[family].layout.head_dim)
    a = torch.randint(0, 300, (3, 5))
    b = torch.randint(0, 300, (3, 5))
    at_a = rerotate_rows(rot, k, a)
    assert torch.allclose(rerotate_rows(rot, at_a, b - a), rerotate_rows(rot, k, b), atol=1e-4)
    assert torch.allclose(rerotate_rows(rot, at_a, -a), k, atol=1e-4)
    # equal rows are plain 1D RoPE: the rows of text positions
    one = torch.tensor([4, 9, 0, 17, 2])
    assert torch.allclose(rerotate_rows(rot, k, one.expand(3, -1)), rerotate_rows(rot, k, one[None].expand(3, -1)))


# ------------------------------------------------------------------------------ block prefill vs transformers
def test_qwen2_5_segment_block_prefill_equals_transformers_forward(models):
    """A 4-frame block as transformers runs a video: vision tower, get_rope_index (t spaced by
    tokens_per_second * second_per_grid_ts), decoder; every layer's block KV must match."""
    m = models["qwen2.5-vl"]
    frames = torch.from_numpy(_frames(4))
    prefix, t = m.prefix(), m.tokens_per_frame
    p, n = prefix.length, 4 * t
    kv, _, pos = m.prefill_blocks(prefix, m.encode_frames(frames).reshape(1, n, -1),
                                  token_index=torch.arange(n)[None])
    flat, grid = m.pixel_values(frames)
    ids = torch.cat([prefix.token_ids, torch.full((n,), m.model.config.video_token_id)])[None]
    mm = torch.zeros_like(ids, dtype=torch.int32)
    mm[:, p:] = 2
    video_grid = torch.tensor([[4, int(grid[0, 1]), int(grid[0, 2])]])
    seconds = torch.tensor([m.t_stride / m.model.config.vision_config.tokens_per_second])
    with torch.inference_mode():
        out = m.model.model(input_ids=ids, pixel_values_videos=flat, video_grid_thw=video_grid,
                            second_per_grid_ts=seconds, mm_token_type_ids=mm, use_cache=True)
        ref_pos, _ = m.model.model.get_rope_index(ids, mm, video_grid_thw=video_grid, second_per_grid_ts=seconds)
    assert torch.equal(m.position_ids(pos)[:, 0], ref_pos[:, 0, p:])
    for y, layer in enumerate(out.past_key_values.layers):
        assert torch.allclose(kv[y, 0, 0], layer.keys[0, :, p:], atol=1e-5), y
        assert torch.allclose(kv[y, 1, 0], layer.values[0, :, p:], atol=1e-5), y


def test_qwen3_block_prefill_equals_transformers_forward_with_deepstack(models):
    """A 2-frame block as transformers runs two consecutive frames (one as an image, one as a
    one-frame video, so get_rope_index sees two grids with no text between): vision tower
    with DeepStack, positions, decoder; every layer's block KV must match."""
    m = models["qwen3-vl"]
    frames = torch.from_numpy(_frames(2, seed=1))
    prefix, t = m.prefix(), m.tokens_per_frame
    p = prefix.length
    emb = m.encode_frames(frames)
    assert emb.shape == (2, t, m.hidden_size * (1 + 2))
    kv, _, _ = m.prefill_blocks(prefix, emb.reshape(1, 2 * t, -1), token_index=torch.arange(2 * t)[None])
    flat, grid = m.pixel_values(frames)
    cfg = m.model.config
    image, video = torch.full((t,), cfg.image_token_id), torch.full((t,), cfg.video_token_id)
    ids = torch.cat([prefix.token_ids, image, video])[None]
    mm = torch.zeros_like(ids, dtype=torch.int32)
    mm[:, p:p + t], mm[:, p + t:] = 1, 2
    half = flat.shape[0] // 2
    with torch.inference_mode():
        out = m.model.model(input_ids=ids, pixel_values=flat[:half], image_grid_thw=grid[:1],
                            pixel_values_videos=flat[half:], video_grid_thw=grid[1:], mm_token_type_ids=mm,
                            use_cache=True)
    for y, layer in enumerate(out.past_key_values.layers):
        assert torch.allclose(kv[y, 0, 0], layer.keys[0, :, p:], atol=1e-5), y
        assert torch.allclose(kv[y, 1, 0], layer.values[0, :, p:], atol=1e-5), y


def test_qwen3_deepstack_features_reach_the_early_layers(models):
    """DeepStack features are added after the first decoder layers: dropping them leaves
    layer 0's KV unchanged and changes every later layer's."""
    m = models["qwen3-vl"]
    prefix = m.prefix()
    emb = m.encode_frames(torch.from_numpy(_frames(1))).reshape(1, m.tokens_per_frame, -1)
    e = m.hidden_size
    with_ds, _, _ = m.prefill_blocks(prefix, emb)
    without, _, _ = m.prefill_blocks(prefix, emb[..., :e])  # plain inputs_embeds
    assert torch.equal(with_ds[0], without[0])
    assert (with_ds[1] - without[1]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="DeepStack"):
        m.prefill_blocks(prefix, emb[..., : 2 * e])


# ------------------------------------------------------------------------------ full-context equivalence
@torch.inference_mode()
def _full_context_logits(model, frames: np.ndarray, question: str):
    """Logits of prefix + every frame as one video + answer prompt, with get_rope_index positions."""
    prefix = model.prefix()
    p, t, n = prefix.length, model.tokens_per_frame, frames.shape[0]
    visual = model.encode_frames(torch.from_numpy(frames)).reshape(1, n * t, -1)
    prompt = model.tokenize(model.answer_template.format(question=question))
    inner = model.model.model
    cfg = model.model.config
    side = model.merge_size * model.grid[0], model.merge_size * model.grid[1]  # patches per side
    if isinstance(model, Qwen3VLAdapter):  # one grid per frame, alternating image / video groups
        kinds = [1 + f % 2 for f in range(n)]
        grids = {k: torch.tensor([[1, *side]] * kinds.count(k)) for k in (1, 2)}
        vis_ids = torch.cat([torch.full((t,), cfg.image_token_id if k == 1 else cfg.video_token_id) for k in kinds])
        ids = torch.cat([prefix.token_ids, vis_ids, prompt])[None]
        mm = torch.zeros_like(ids, dtype=torch.int32)
        mm[0, p:p + n * t] = torch.tensor(kinds).repeat_interleave(t).to(torch.int32)
        pos, _ = inner.get_rope_index(ids, mm, image_grid_thw=grids[1], video_grid_thw=grids[2])
    else:  # one video of n frames, each a temporal step
        ids = torch.cat([prefix.token_ids, torch.full((n * t,), cfg.video_token_id), prompt])[None]
        mm = torch.zeros_like(ids, dtype=torch.int32)
        mm[0, p:p + n * t] = 2
        seconds = torch.tensor([model.t_stride / cfg.vision_config.tokens_per_second])
        pos, _ = inner.get_rope_index(ids, mm, video_grid_thw=torch.tensor([[n, *side]]), second_per_grid_ts=seconds)
        # the text after the video starts at max(vision positions) + 1 (Qwen's rule; transformers 5.x
        # uses start + max(h, w), the same here because the video is shorter than its grid side)
        assert int(pos[0, 0, p + n * t]) == int(pos[:, 0, p:p + n * t].max()) + 1
    inputs, extra = model.block_inputs(visual)
    seq = torch.cat([model.embed(prefix.token_ids[None]), inputs, model.embed(prompt[None])], dim=1)
    if extra:
        mask = torch.zeros(1, seq.shape[1], dtype=torch.bool)
        mask[0, p:p + n * t] = True
        extra["visual_pos_masks"] = mask
    hidden = model.language_model(inputs_embeds=seq, position_ids=pos, **extra).last_hidden_state
    return model.lm_head(hidden[:, -1]), int(pos[0, 0, p + n * t])


@torch.inference_mode()
def _session_logits(model, session, question, monkeypatch):
    box = {}
    real = model.generate

    def spy(context, q, max_new_tokens, start_position=None):
        box["context"], box["start"] = context, start_position
        return real(context, q, max_new_tokens, start_position)

    monkeypatch.setattr(model, "generate", spy)
    session.ask(question, max_new_tokens=1)
    ctx, start = box["context"], box["start"]
    prompt = model.tokenize(model.answer_template.format(question=question))
    first = ctx.shape[4] if start is None else start  # generate's default: the context length
    pos = torch.arange(first, first + prompt.numel())[None]
    hidden = model.language_model(input_ids=prompt[None], past_key_values=kv_to_cache(ctx),
                                  position_ids=pos).last_hidden_state
    return model.lm_head(hidden[:, -1]), start


ALL_BLOCKS = {"retrieval": {"retriever": "all"}, "assembly": {"order": "time", "rerotate": True}}
LEVELS = {
    "frame": [{"name": "frame", "extractor": "frame", "keep_ratio": 1.0, "top_k": 1000}],
    "segment": [{"name": "segment", "extractor": "segment", "frames": 4, "keep_ratio": 1.0, "top_k": 1000}],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_time_ordered_rerotated_assembly_reproduces_full_context(family, monkeypatch):
    """One decoder layer: each block's KV equals the full context's up to rotation, so every
    block retrieved in time order and re-rotated onto the M-RoPE timeline must give the full
    context's logits (float32, atol 1e-4), and the answer must start where Qwen puts it."""
    model = _one_layer(family)
    frames = _frames(8, seed=2)
    q = "what color was the circle?"
    ref, ref_start = _full_context_logits(model, frames, q)
    for level, levels in LEVELS.items():
        with mukv.Session(model=model, config={**ALL_BLOCKS, "levels": levels}) as s:
            s.feed(frames)
            got, start = _session_logits(model, s, q, monkeypatch)
            monkeypatch.undo()
        assert start == ref_start, level
        assert torch.allclose(got, ref, atol=LOGITS_ATOL, rtol=LOGITS_ATOL), (level, (got - ref).abs().max())
    # the authors' behaviour (overlapping positions, answer at the context length) does not
    paper = {**ALL_BLOCKS, "levels": LEVELS["frame"], "assembly": {"order": "time"}}
    with mukv.Session(model=model, config=paper) as s:
        s.feed(frames)
        got, start = _session_logits(model, s, q, monkeypatch)
    assert start is None
    assert (got - ref).abs().max() > 1e-2


# ------------------------------------------------------------------------------ sessions and checkpoints
@pytest.mark.parametrize("family", FAMILIES)
def test_session_end_to_end_uses_every_level(models, family):
    with mukv.Session(model=models[family], policy="mukv_time", config={"assembly": {"rerotate": True}}) as s:
        stored = s.feed(_frames(8))
        assert stored == 8 * 4 + 8 + 2  # patch, frame and segment blocks
        a = s.ask("what color was the circle?", max_new_tokens=3)
        assert set(a.levels()) == {"patch", "frame", "segment"}
        assert a.kv_tokens == s.prefix.length + sum(b.tokens for b in a.blocks)
        assert [b.t_start for b in a.blocks] == sorted(b.t_start for b in a.blocks)


@pytest.mark.parametrize("family", FAMILIES)
def test_local_checkpoint_round_trip(models, family, tmp_path):
    """save_pretrained of a tiny random model, then Session(model=dir) loads it through the
    adapter registered for its model_type (safetensors only), mean/std from preprocessor_config."""
    src = models[family]
    src.model.save_pretrained(tmp_path, safe_serialization=True)
    src.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                   "image_std": [0.5, 0.5, 0.5]}))
    assert any(tmp_path.glob("*.safetensors")) and not any(tmp_path.glob("*.bin"))
    with mukv.Session(model=str(tmp_path)) as s:
        assert type(s.model) is type(src) and s.model.name == tmp_path.name
        assert s.model.grid == src.grid and s.model.mrope == src.mrope
        assert s.model._mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
        s.model._mean, s.model._std = src._mean, src._std
        frames = torch.from_numpy(_frames(1))
        assert torch.allclose(s.model.encode_frames(frames), src.encode_frames(frames), atol=1e-6)
        assert torch.equal(s.prefix.token_ids, src.prefix().token_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_decoding_matches_eager_decoding(models, family):
    """The question-time path that CUDA graphs capture (run eagerly here) gives the eager
    path's query vector, and writes the answer prompt's KV at the start position it is given."""
    m = models[family]
    prefix = m.prefix()
    torch.manual_seed(0)
    context = torch.cat([prefix.kv, torch.randn(*prefix.kv.shape[:4], 30, prefix.kv.shape[5])], dim=4)
    c, q = context.shape[4], "what color?"
    prompt = m.tokenize(m.answer_template.format(question=q))
    out = {}
    try:
        for static in (False, True):
            m.static_decode = static
            out[static] = (m.query_vector(prefix, q), m.generate(context, q, 4, 77)[1])
        written = m._answer_decoder.kv[..., c:c + prompt.numel(), :]
    finally:
        m.static_decode = None
    assert torch.allclose(out[True][0], out[False][0], atol=1e-5)
    assert out[True][1] == out[False][1]
    with torch.inference_mode():
        cache = kv_to_cache(context)
        m.language_model(input_ids=prompt[None], past_key_values=cache,
                         position_ids=torch.arange(77, 77 + prompt.numel())[None])
    ref = torch.stack([torch.stack((lay.keys, lay.values)) for lay in cache.layers])[..., c:, :]
    assert torch.allclose(written, ref, atol=1e-5)
