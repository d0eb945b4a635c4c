"""mukv-tiny's training code (on a toy shape, CPU) and the shipped checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mukv import train as T


@pytest.fixture(scope="module")
def toy():
    """A random toy-shape model (49 tokens per frame) in float32."""
    return T.build_model("toy", seed=1)


def _in_training_forward(adapter):
    T.training_mode(adapter, True)
    adapter.model.eval()


def test_training_forward_equals_inference(toy):
    """Prefix, block prefill (KV and column sums) and answer logits of the training
    forward equal mukv's inference path (HFVideoLLM) for the same weights."""
    from mukv.bench import sample_clip
    from mukv.model import _Causal, kv_to_cache

    clip = sample_clip(3, 8)
    frames = torch.from_numpy(clip.frames)
    T.training_mode(toy, False)
    ref_prefix = toy.prefix()
    ref_visual = toy.encode_frames(frames)
    embeds = ref_visual.reshape(8, toy.tokens_per_frame, -1)
    ref_kv, ref_cols, _ = toy.prefill_blocks(ref_prefix, embeds, attention=True)
    _in_training_forward(toy)
    try:
        with torch.no_grad():
            visual = T.encode(toy, frames[None])[0]
            prefix = T.prefix_kv(toy)
            kv, cols = T.prefill(toy, prefix, embeds, attention=True)
            # system prompt + two frame blocks (both at positions P .. P + T - 1)
            ctx = T._cat_kv([prefix] + [[(k[i : i + 1], v[i : i + 1]) for k, v in kv] for i in range(2)])
            c = ctx[0][0].shape[2]
            qb = T.encode_questions(toy, [clip.question])
            logits = T.answer_logits(toy, ctx, qb.ids, torch.tensor([c]), qb.at)[0, 0]
    finally:
        T.training_mode(toy, False)
    torch.testing.assert_close(visual, ref_visual)
    for y in range(len(kv)):
        torch.testing.assert_close(prefix[y][0][0], ref_prefix.kv[y, 0, 0])
        torch.testing.assert_close(kv[y][0], ref_kv[y, 0])
        torch.testing.assert_close(kv[y][1], ref_kv[y, 1])
    torch.testing.assert_close(cols, ref_cols)
    # the first decoding step of HFVideoLLM.generate, from the same context
    ref_ctx = torch.cat([ref_prefix.kv] + [ref_kv[:, :, i : i + 1] for i in range(2)], dim=4)
    ids = toy.tokenize(toy.answer_template.format(question=clip.question))
    cache = kv_to_cache(ref_ctx, extra=ids.numel())
    with torch.inference_mode(), _Causal():
        hidden = toy.language_model(input_ids=ids[None], past_key_values=cache,
                                    position_ids=torch.arange(c, c + ids.numel())[None], use_cache=True
                                    ).last_hidden_state[:, -1]
        ref_logits = toy.lm_head(hidden)[0]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_prefill_with_recomputed_prefix_equals_cached_prefix(toy):
    """prefill(prefix_ids=...) runs the system prompt again in front of every block
    (square causal attention, the fast training path): same KV and hidden states
    as reading the cached prefix."""
    _in_training_forward(toy)
    try:
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            embeds = torch.randn(3, 20, toy.language_model.config.hidden_size, generator=g) * 0.05
            prefix = T.prefix_kv(toy)
            ids = toy.tokenize(toy.default_system_prompt)
            h_ref, h_new = [], []
            kv_ref, _ = T.prefill(toy, prefix, embeds, hidden=h_ref)
            kv_new, cols = T.prefill(toy, prefix, embeds, hidden=h_new, prefix_ids=ids)
    finally:
        T.training_mode(toy, False)
    assert cols is None
    torch.testing.assert_close(h_new[0], h_ref[0], rtol=1e-4, atol=1e-5)
    for (k1, v1), (k2, v2) in zip(kv_new, kv_ref):
        torch.testing.assert_close(k1, k2, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v1, v2, rtol=1e-4, atol=1e-5)


def test_evidence_mask_covers_the_questioned_object():
    """The attention-supervision target lies on the subject's tokens inside the questioned scene's frames."""
    from mukv.bench import sample_clip

    hits = total = 0
    for seed in range(60):
        clip = sample_clip(seed, 8)
        m = T.evidence_mask(clip.scene, clip.evidence_start, 8, 14)
        outside = np.ones(8, dtype=bool)
        outside[clip.evidence_start : clip.evidence_end] = False
        assert not m[outside].any()
        assert m.any()
        if clip.kind in ("object_color", "object_place", "motion", "count", "color_change", "event"):
            subject = clip.scene.objects[clip.scene.query["subject"]]
            labels = T.token_labels(clip.frames, 14)[:, 1]
            hits += int((labels[m] == subject.shape).sum())
            total += int(m.sum())
    assert total and hits / total > 0.4  # the rest are border tokens that overlap the object's box


def test_attention_supervision_is_recorded_and_trainable():
    """A step with attn_sup reports the evidence attention mass and its loss; the
    evidence recorded for a packed clip has one mask per question."""
    ds = T.TrainingClips(0, 100, label_grid=7, evidence_grid=7, num_frames=8, single=0.0)
    batch = T.collate([ds[i] for i in range(2)])
    assert batch["evidence"].shape == (len(batch["questions"]), 8, 7, 7)
    adapter = T.build_model("toy", seed=0)
    T.training_mode(adapter, True)
    cfg = T.TrainConfig(shape="toy", batch=2, weights={"full": 1.0, "frames": 1.0, "mukv": 0.0}, attn_sup=1.0,
                        attn_layers=(0, 1), attn_heads=1, bf16=False)
    trainer = T.Trainer(adapter, cfg, T.toy_config())
    stats = trainer.train_step(batch)
    for regime in ("full", "frames"):
        assert 0.0 < stats[f"attn_mass_{regime}"] < 1.0
        assert stats[f"loss_attn_{regime}"] > 0.0
    T.training_mode(adapter, False)


def test_mid_layer_and_query_losses_train_and_resume(tmp_path):
    """aux_mid and query_aux read the residual stream entering mid_layer (visual tokens
    and answer positions); their heads are saved and restored with the checkpoint."""
    ds = T.TrainingClips(0, 100, label_grid=7, query_labels=True, num_frames=4, plain=1.0, extra=3)
    batch = T.collate([ds[i] for i in range(2)])
    q = len(batch["questions"])
    assert batch["query_labels"].shape == (q, 3)
    # every question names exactly one thing to look for, except dot_color (the host's shape) and marks (corner)
    assert ((batch["query_labels"] >= 0).sum(1) == 1).all()
    cfg = T.TrainConfig(shape="toy", batch=2, weights={"full": 1.0, "frames": 0.0, "mukv": 0.0}, aux_mid=1.0,
                        query_aux=1.0, mid_layer=1, bf16=False)
    adapter = T.build_model("toy", seed=0)
    T.training_mode(adapter, True)
    trainer = T.Trainer(adapter, cfg, T.toy_config())
    stats = trainer.train_step(batch)
    assert stats["loss_query"] > 0 and stats["loss_aux_lm_mid"] > 0
    trainer.save(tmp_path / "ckpt")
    again = T.Trainer(T.build_model("toy", seed=5), cfg, T.toy_config())
    again.load(tmp_path / "ckpt")
    torch.testing.assert_close(again.query_head.weight, trainer.query_head.weight)
    torch.testing.assert_close(again.aux_head_mid.weight, trainer.aux_head_mid.weight)
    T.training_mode(adapter, False)


def test_frozen_vision_tower_gets_no_gradient():
    """freeze_vision: the vision tower and projector run without gradients; the language model still trains."""
    ds = T.TrainingClips(0, 100, num_frames=4, plain=1.0)
    batch = T.collate([ds[i] for i in range(2)])
    adapter = T.build_model("toy", seed=0)
    T.training_mode(adapter, True)
    cfg = T.TrainConfig(shape="toy", batch=2, weights={"full": 1.0, "frames": 0.0, "mukv": 0.0}, freeze_vision=True,
                        bf16=False)
    trainer = T.Trainer(adapter, cfg, T.toy_config())
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    trainer.train_step(batch)
    changed = {n for n, p in adapter.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("language_model" in n or "lm_head" in n for n in changed)
    T.training_mode(adapter, False)


def test_attention_report_shares(toy):
    """attention_report: per kind, layer and head, shares of attention in [0, 1] on disjoint token sets."""
    clips = T.eval_clips(3, 1, kinds=["object_color", "mark_color"])
    report = T.attention_report(toy, clips, T.toy_config())
    assert set(report) == {"object_color", "mark_color"}
    lm = toy.language_model.config
    for by_target in report.values():
        total = sum(np.asarray(by_target[t]) for t in T.ATTENTION_TARGETS)
        assert total.shape == (lm.num_hidden_layers, lm.num_attention_heads)
        assert (total >= 0).all() and (total <= 1 + 1e-4).all()


def test_batched_mukv_memory_matches_session(toy):
    """Regime (c) of training picks the blocks mukv's Session retrieves and predicts its answer."""
    import mukv
    from mukv.bench import sample_clip

    config = T.toy_config()
    levels = T.resolve_levels(toy, config)
    for seed in (0, 1):
        clip = sample_clip(seed, 8)
        with mukv.Session(model=toy, config=config) as s:
            s.feed(clip.frames)
            answer = s.ask(clip.question, max_new_tokens=1)
        retrieved: dict[str, list[int]] = {}
        for b in answer.blocks:
            retrieved.setdefault(b.level, []).append(b.block_id)
        _in_training_forward(toy)
        try:
            with torch.no_grad():
                frames = torch.from_numpy(clip.frames)[None]
                qb = T.encode_questions(toy, [clip.question])
                prefix = T.prefix_kv(toy)
                visual = T.encode(toy, frames)
                memories = [T.level_memory(toy, prefix, visual, lv) for lv in levels]
                chosen = T.retrieve(memories, config, T.query_vectors(toy, prefix, qb.query_ids, qb.query_len),
                                    torch.tensor([0]))
                logits = T.memory_logits(toy, levels, config, frames, torch.tensor([0]), qb,
                                         T.RegimeOptions(("mukv",), 0.0, 0))["mukv"]
        finally:
            T.training_mode(toy, False)
        assert {k: sorted(v) for k, v in retrieved.items()} == {k: sorted(v[0].tolist()) for k, v in chosen.items()}
        assert toy.tokenizer.decode([int(logits[0, 0].argmax())]).strip() == answer.text


def test_training_steps_decrease_loss():
    """A few steps on one batch of a toy model lower the loss of every regime."""
    adapter = T.build_model("toy", seed=0)
    cfg = T.TrainConfig(shape="toy", batch=2, frames=4, lr=3e-3, warmup=1, steps=100, bf16=False, workers=0)
    trainer = T.Trainer(adapter, cfg, T.toy_config())
    T.training_mode(adapter, True)
    batch = T.collate([T.TrainingClips(0, 10, num_frames=4)[i] for i in range(2)])
    first = trainer.train_step(batch)
    for _ in range(6):
        last = trainer.train_step(batch)
    T.training_mode(adapter, False)
    for regime in T.REGIMES:
        assert last[f"loss_{regime}"] < first[f"loss_{regime}"] - 0.5, (first, last)


def _data_parallel_rank(rank: int, world: int, init: str, out: str) -> None:
    """One rank of test_data_parallel_gradients_are_averaged (a spawned process, gloo on CPU)."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        adapter = T.build_model("toy", seed=0)
        cfg = T.TrainConfig(shape="toy", batch=1, frames=4, lr=1e-3, warmup=1, steps=10, bf16=False, workers=0)
        trainer = T.Trainer(adapter, cfg, T.toy_config())
        T.training_mode(adapter, True)
        data = T.TrainingClips(0, 10, num_frames=4)
        batch = next(T.iterate_batches(data, 1, 0, 0, rank, world))  # rank r reads item r
        local: list[torch.Tensor] = []
        average = trainer._average_gradients

        def spy() -> None:
            params = [p for g in trainer.opt.param_groups for p in g["params"]]
            local.extend(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params)
            average()

        trainer._average_gradients = spy
        trainer.train_step(batch)
        params = [p for g in trainer.opt.param_groups for p in g["params"]]
        torch.save({"world": trainer.world, "samples": trainer.samples, "local": local,
                    "weights": [p.detach().clone() for p in params]}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_data_parallel_gradients_are_averaged(tmp_path):
    """Two ranks (gloo, CPU) read different clips, average their gradients before the
    optimiser step, and end the step with identical weights; the data position counts
    both ranks' clips."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_data_parallel_rank, args=(2, f"tcp://127.0.0.1:{port}", str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["samples"] == r1["samples"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(r0["local"], r1["local"]))  # different clips
    for a, b in zip(r0["weights"], r1["weights"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # one process stepping on the mean gradient lands on the same weights
    adapter = T.build_model("toy", seed=0)
    cfg = T.TrainConfig(shape="toy", batch=1, frames=4, lr=1e-3, warmup=1, steps=10, bf16=False, workers=0)
    ref = T.Trainer(adapter, cfg, T.toy_config())
    params = [p for g in ref.opt.param_groups for p in g["params"]]
    for p, a, b in zip(params, r0["local"], r1["local"]):
        p.grad = (a + b) / 2
    torch.nn.utils.clip_grad_norm_(adapter.model.parameters(), cfg.grad_clip)
    for g in ref.opt.param_groups:
        g["lr"] = cfg.lr_at(0)
    ref.opt.step()
    for p, w in zip(params, r0["weights"]):
        torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)


def test_checkpoint_resumes(tmp_path):
    """save() / load() restore weights, Adam moments and the step."""
    adapter = T.build_model("toy", seed=0)
    cfg = T.TrainConfig(shape="toy", batch=1, frames=4, lr=1e-3, warmup=1, steps=10, bf16=False, workers=0)
    trainer = T.Trainer(adapter, cfg, T.toy_config())
    T.training_mode(adapter, True)
    batch = T.collate([T.TrainingClips(0, 10, num_frames=4)[0]])
    trainer.train_step(batch)
    trainer.save(tmp_path / "ckpt")
    other = T.Trainer(T.build_model("toy", seed=5), cfg, T.toy_config())
    other.load(tmp_path / "ckpt")
    assert other.step == 1
    for (n, p), (_, q) in zip(adapter.model.named_parameters(), other.adapter.model.named_parameters()):
        torch.testing.assert_close(p, q, msg=n)
    p = next(iter(trainer.opt.state))
    q = dict(other.adapter.model.named_parameters())[{id(v): k for k, v in adapter.model.named_parameters()}[id(p)]]
    torch.testing.assert_close(other.opt.state[q]["exp_avg"], trainer.opt.state[p]["exp_avg"], rtol=1e-2, atol=1e-6)
    assert all(f.stat().st_size <= T.SHARD_BYTES for f in (tmp_path / "ckpt").glob("*.safetensors"))
    T.training_mode(adapter, False)


def test_packed_clips_are_unambiguous():
    """Every question of a packed training clip is answered correctly by the pixel oracle."""
    from mukv.bench import solve

    ds = T.TrainingClips(3, 100)
    n = 0
    for i in range(60):
        clip = ds[i]
        assert clip.frames.shape == (8, 64, 64, 3)
        for question, answer, _ in clip.questions:
            assert solve(question, clip.frames) == answer
            n += 1
    assert n > 80  # packing puts more than one question in many clips


def test_stream_like_clips_with_hard_negatives_are_unambiguous():
    """Long clips filled with many short filler scenes, all of them built around a key object of a
    questioned scene: every question still has one answer in its clip (the pixel oracle), and other
    scenes of the clip show one of its named objects without the other."""
    import re

    from mukv.bench import COLORS, SHAPES, perceive, solve

    ds = T.TrainingClips(5, 100, num_frames=32, max_questions=6, single=0.0, fillers="many", max_filler=8,
                         hard_negatives=1.0)
    easy = T.TrainingClips(5, 100, num_frames=32, max_questions=6, single=0.0, fillers="many", max_filler=8)
    counts = {}
    for name, data in (("hard", ds), ("easy", easy)):
        n = halves = 0
        for i in range(10):
            clip = data[i]
            assert clip.frames.shape == (32, 64, 64, 3)
            seen = [{(o.color, o.shape) for o in perceive(f).objects} for f in clip.frames]
            for (question, answer, _), (s0, s1) in zip(clip.questions, clip.spans):
                assert solve(question, clip.frames) == answer, question
                n += 1
                m = re.search(r"with the (\w+) (\w+) and the (\w+) (\w+),", question)
                a = (COLORS.index(m.group(1)), SHAPES.index(m.group(2)))
                b = (COLORS.index(m.group(3)), SHAPES.index(m.group(4)))
                halves += sum((a in f) != (b in f) for j, f in enumerate(seen) if not s0 <= j < s1)
        counts[name] = (n, halves)
    assert counts["hard"][0] >= 30 and counts["hard"][1] > 1.3 * counts["easy"][1]
    with pytest.raises(ValueError):
        T.sample_training_clip(0, fillers="some")


def test_extra_questions_are_unambiguous():
    """Questions added per scene (extra_questions) are answered correctly by the pixel
    oracle from the whole clip, are unique in their clip, and come with their evidence."""
    from mukv.bench import solve

    ds = T.TrainingClips(4, 100, evidence_grid=14, extra=3, single=0.4, plain=0.2)
    kinds, n = set(), 0
    for i in range(40):
        clip = ds[i]
        texts = [q[0] for q in clip.questions]
        assert len(set(texts)) == len(texts)
        assert clip.evidence.shape[0] == len(texts) and clip.evidence.reshape(len(texts), -1).any(1).all()
        for question, answer, kind in clip.questions:
            assert solve(question, clip.frames) == answer, question
            kinds.add(kind)
            n += 1
    assert n > 150 and {"mark_exists", "mark_color", "object_color", "object_shape"} <= kinds


def test_export_round_trip(toy, tmp_path):
    """export() writes a checkpoint that LlavaOnevisionAdapter.from_pretrained loads offline."""
    from mukv.plugins.models.llava_onevision import LlavaOnevisionAdapter

    path = T.export(toy, tmp_path / "toy-export")
    loaded = LlavaOnevisionAdapter.from_pretrained(path)
    assert loaded.grid == toy.grid and loaded.dtype == torch.float32
    # the levels it trains with (49 tokens per frame: toy_config's) travel in mukv_config.json
    assert T.MukvConfig.build(loaded.default_config).levels == T.toy_config().levels
    for (n, p), (_, q) in zip(toy.model.named_parameters(), loaded.model.named_parameters()):
        torch.testing.assert_close(q, p.to(torch.bfloat16).float(), msg=n)


# ------------------------------------------------------------------------------ the shipped model
def _shipped():
    from mukv.plugins.models.mukv_tiny import asset_dir

    path = asset_dir()
    if not (path / "model.safetensors").exists():
        pytest.skip("the mukv-tiny checkpoint is not installed")
    return path


def test_shipped_checkpoint_is_small():
    path = _shipped()
    assert T.directory_bytes(path) <= 15 * 10**6
    assert (path / "MODEL_CARD.md").exists()


@pytest.fixture(scope="module")
def shipped_session_answer():
    """The shipped mukv-tiny through Session(model="mukv-tiny"): a 4-frame clip fed, its question asked."""
    import mukv
    from mukv.bench import sample_clip

    _shipped()
    clip = sample_clip(SHIPPED_CLIP_SEED, 4, kinds=("object_color",))
    with mukv.Session(model="mukv-tiny", device="cpu") as s:
        grid = s.model.grid
        s.feed(clip.frames)
        answer = s.ask(clip.question)
    return clip, answer, grid


def test_session_mukv_tiny_loads_and_answers(shipped_session_answer):
    """Session(model="mukv-tiny") loads the shipped checkpoint (49 tokens per frame), takes
    the levels it was trained with from its mukv_config.json, and answers with a word of the
    question kind's answer set from all three levels."""
    from mukv.bench import answer_space

    clip, answer, grid = shipped_session_answer
    assert grid == (7, 7)
    assert answer.text in answer_space(clip.kind)
    assert {b.level for b in answer.blocks} == {"patch", "frame", "segment"}
    assert {b.level: b.tokens for b in answer.blocks if b.level == "patch"} == {"patch": 2}  # 7-token rows, 30%


def test_session_mukv_tiny_answers_a_clip_correctly(shipped_session_answer):
    from mukv.bench import score

    clip, answer, _ = shipped_session_answer
    assert score(answer.text, clip.answer), (clip.question, clip.answer, answer.text)


def test_session_mukv_tiny_answers_held_out_clips():
    """Through the product path (one Session per clip, 8-frame held-out clips with
    distractors, 2 per kind), MuKV's memory answers most questions; the answer prior is
    about 25% (the checkpoint before this one scored 29.5%)."""
    import mukv
    from mukv.bench import score

    _shipped()
    from mukv.session import load_model

    model = load_model("mukv-tiny", torch.device("cpu"), None)
    clips = T.eval_clips(seed=1, per_kind=2)
    right = 0
    for clip in clips:
        with mukv.Session(model=model, device="cpu") as s:
            s.feed(clip.frames)
            right += score(s.ask(clip.question).text, clip.answer)
    assert right / len(clips) >= 0.6, f"{right}/{len(clips)}"


def test_calibrated_projector_matches_text_scale():
    """build_model initialises the projector so that visual tokens enter the language model
    at the RMS of the text embeddings (the uncalibrated init is several times larger)."""
    raw = T.build_model("toy", seed=2, calibrate=False)
    vis, txt = T.visual_text_rms(raw)
    cal = T.build_model("toy", seed=2)
    vis_c, txt_c = T.visual_text_rms(cal)
    assert txt_c == pytest.approx(txt)
    assert vis_c / txt_c == pytest.approx(1.0, rel=1e-3)
    assert abs(vis / txt - 1.0) > 0.2  # the calibration did something
    proj = cal.model.model.multi_modal_projector
    assert float(proj.linear_2.bias.detach().abs().max()) == 0.0


def test_visual_rms_regulariser_in_the_loss():
    """The training loss carries (log(rms_vis / rms_txt))**2 with weight vis_rms (stats: rms_ratio)."""
    from mukv.bench import sample_clip

    model = T.build_model("toy", seed=3, calibrate=False)
    clips = [T.TrainingClip(sample_clip(s, 4).frames, [(sample_clip(s, 4).question, sample_clip(s, 4).answer,
                                                          sample_clip(s, 4).kind)]) for s in (1, 2)]
    batch = T.collate(clips)
    losses = {}
    for w in (0.0, 1.0):
        T.training_mode(model, True)
        tr = T.Trainer(model, T.TrainConfig(shape="toy", batch=2, frames=4, vis_rms=w, offset_prob=0.0,
                                            weights={"full": 1.0}), T.toy_config())
        model.model.eval()
        with torch.no_grad():
            loss, stats = tr.batch_loss(batch)
        losses[w] = (float(loss), stats["rms_ratio"])
    T.training_mode(model, False)
    ratio = losses[1.0][1]
    assert losses[0.0][1] == pytest.approx(ratio)
    assert losses[1.0][0] - losses[0.0][0] == pytest.approx(math.log(ratio) ** 2, rel=1e-3, abs=1e-5)


def test_shipped_mukv_tiny_reads_the_clip():
    """Regression test for the collapse of the first checkpoint (visual tokens 40x the text
    scale, identical across clips inside the language model, answer logits equal to 1e-3
    whatever the clip): the shipped model's visual tokens stay near the text scale and the
    answer logits for one question depend on the clip."""
    _shipped()
    from mukv.bench import sample_clip
    from mukv.plugins.models.mukv_tiny import load_mukv_tiny

    m = load_mukv_tiny("cpu")
    c1, c2 = sample_clip(1, 4), sample_clip(2, 4)
    vis, txt = T.visual_text_rms(m, torch.from_numpy(c1.frames)[None])
    assert 0.5 < vis / txt < 4.0
    q = m.tokenize(m.answer_template.format(question=c1.question))
    pre = m.embed(m.tokenize(m.default_system_prompt))
    logits = []
    with torch.no_grad():
        for c in (c1, c2):
            e = m.encode_frames(torch.from_numpy(c.frames))
            seq = torch.cat([pre, e.reshape(-1, e.shape[-1]), m.embed(q)])[None]
            h = m.language_model(inputs_embeds=seq).last_hidden_state
            logits.append(m.lm_head(h[:, -1]))
    assert float((logits[0] - logits[1]).abs().max()) > 0.05


def test_mukv_tiny_missing_asset_is_a_clear_error(monkeypatch, tmp_path):
    from mukv.errors import StoreError
    from mukv.plugins.models import mukv_tiny

    monkeypatch.setattr(mukv_tiny, "asset_dir", lambda: tmp_path / "nowhere")
    with pytest.raises(StoreError, match="mukv-tiny checkpoint is missing"):
        mukv_tiny.load_mukv_tiny()


#: The clip (``sample_clip(seed, 4, kinds=("object_color",))``) the shipped-model tests ask about.
SHIPPED_CLIP_SEED = 0


def test_retrieval_loss_positives_are_the_questioned_scene():
    """retrieval_loss: positives are the blocks of the question's own clip that overlap its
    scene's frames; everything else in the batch is a negative (hand-computed case)."""
    b, n, dim = 2, 4, 3
    keys = torch.randn(b * n, 1, 2, dim, generator=torch.Generator().manual_seed(0))
    mem = T.LevelMemory("frame", [(keys, keys.clone())], keys.mean(2).reshape(b, n, -1), n, 1, 1)
    query = torch.randn(1, dim, requires_grad=True)
    clip, spans = torch.tensor([0]), torch.tensor([[1, 3]])
    loss, stats = T.retrieval_loss([mem], query, clip, spans, tau=0.5)
    vec = torch.nn.functional.normalize(keys.mean(2).reshape(b * n, -1), dim=-1)
    logits = torch.nn.functional.normalize(query, dim=-1) @ vec.T / 0.5
    expected = logits.logsumexp(1) - logits[:, [1, 2]].logsumexp(1)
    torch.testing.assert_close(loss, expected.mean())
    assert stats["ret_top1_frame"] == float(int(logits.argmax()) in (1, 2))
    loss.backward()
    assert query.grad is not None and float(query.grad.abs().sum()) > 0
    # 4-frame segment blocks: of clip 0's two windows only frames 0-3 overlap the scene (frames 1-2)
    seg_keys = keys[:4]  # [B * 2, 1, 2, D]
    seg = T.LevelMemory("segment", [(seg_keys, seg_keys)], seg_keys.mean(2).reshape(b, 2, -1), 2, 4, 1)
    vectors = seg_keys.mean(2).reshape(b * 2, -1)
    for block, positive in ((0, 1.0), (1, 0.0), (2, 0.0)):
        _, s = T.retrieval_loss([seg], vectors[block:block + 1], clip, spans)
        assert s["ret_top1_segment"] == positive, block


def test_retrieval_loss_trains_with_the_mukv_regime():
    """With TrainConfig.retrieval the mukv regime reports the loss and the top-1 share, and
    the loss falls over a few steps on one batch."""
    adapter = T.build_model("toy", seed=0)
    cfg = T.TrainConfig(shape="toy", batch=4, frames=8, lr=3e-3, warmup=1, steps=100, bf16=False, workers=0,
                        weights={"mukv": 1.0}, retrieval=1.0, offset_prob=0.0)
    trainer = T.Trainer(adapter, cfg, T.toy_config())
    T.training_mode(adapter, True)
    data = T.TrainingClips(3, 10, num_frames=8, max_questions=3, single=0.0)
    batch = T.collate([data[i] for i in range(4)])
    assert batch["spans"].shape == (len(batch["questions"]), 2)
    first = trainer.train_step(batch)
    for _ in range(8):
        last = trainer.train_step(batch)
    T.training_mode(adapter, False)
    assert {"loss_retrieval", "ret_top1_frame", "ret_top1_segment"} <= set(first)
    assert last["loss_retrieval"] < first["loss_retrieval"], (first["loss_retrieval"], last["loss_retrieval"])


def test_training_clips_follow_the_kind_weights():
    """kinds= restricts and weights the question kinds of every branch (plain, single,
    packed); an unknown kind is a clear error."""
    from collections import Counter

    from mukv.bench import KINDS

    only = Counter(q[2] for i in range(30)
                   for q in T.sample_training_clip(i, 8, kinds=("event", "after"), plain=0.2, single=0.3).questions)
    assert set(only) == {"event", "after"}
    weighted = Counter(q[2] for i in range(200) for q in T.sample_training_clip(i, 8, kinds=KINDS + ("event",) * 10,
                                                                                   single=1.0).questions)
    assert weighted["event"] > 0.3 * sum(weighted.values())
    with pytest.raises(ValueError, match="unknown question kinds"):
        T.sample_training_clip(0, 8, kinds=("no_such_kind",))
