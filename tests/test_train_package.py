"""mukv.train is a package of modules behind one namespace: every name it had as one module
stays importable from it, and rebinding a name there reaches the modules that use it."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

import mukv.train as T

#: Every name that mukv.train held when it was one module (mukv/train.py), private ones included:
#: tests, benchmarks and docs import them from mukv.train.
NAMES_OF_THE_ONE_MODULE = """
ATTENTION_TARGETS AUX_CLASSES Any EvidenceAttention F Iterator KV LevelConfig LevelMemory MEDIUM_196_SHAPE
MEDIUM_SHAPE MUKV_TINY_SHAPE MidCapture MukvConfig Path PrefilledBlocks QUERY_CLASSES QuestionBatch REGIMES
RegimeOptions SHAPES SHARD_BYTES SMALL_196_SHAPE SMALL_SHAPE Sequence TAG_EVAL TAG_TRAIN TOY_SHAPE TRAIN_ATTN_IMPL
TrainConfig Trainer TrainingClip TrainingClips _Level _cache _cat_kv _filler_length _filler_scene _load_sharded _ours
_save_sharded _state _take _train_registered annotations answer_logits asdict attention_report build_model
calibrate_projector collate config_for contextlib count_parameters dataclass directory_bytes encode encode_questions
eval_clips evaluate evidence_mask export extra_questions field format_report iterate_batches json level_memory
load_weights loss_from_logits make_optimizer math memory_logits mukv_context np prefill prefix_kv query_targets
query_vectors register_train_attention resolve_levels retrieval_loss retrieve sample_training_clip session_accuracy
threading token_labels torch toy_config training_mode visual_text_rms
""".split()


@pytest.mark.parametrize("name", NAMES_OF_THE_ONE_MODULE)
def test_every_name_of_the_one_module_is_importable(name):
    namespace: dict = {}
    exec(f"from mukv.train import {name}", namespace)
    assert namespace[name] is getattr(T, name)


def test_each_name_lives_in_one_module_and_is_the_same_object_everywhere():
    """A function or class is defined once; the namespace and every module that imports it
    hold that one object."""
    for name in NAMES_OF_THE_ONE_MODULE:
        value = getattr(T, name)
        for part in T._PARTS:
            if name in vars(part) and not isinstance(value, (bool, int, float, str)):
                assert vars(part)[name] is value, (part.__name__, name)


def _fake_adapter(text_rms: float):
    weight = torch.full((4, 4), text_rms)
    return SimpleNamespace(device="cpu", model=torch.nn.Linear(1, 1),
                           language_model=SimpleNamespace(embed_tokens=SimpleNamespace(weight=weight)))


def test_monkeypatching_a_name_reaches_the_modules_that_use_it():
    """visual_text_rms (build.py) calls encode (forward.py): patched through mukv.train, the
    patch is what it calls, and undoing the patch restores the original everywhere."""
    original = T.encode
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "encode", lambda adapter, frames: torch.full((1, 1, 1, 1), 3.0))
        assert T.build.encode is T.regimes.encode is T.trainer.encode is T.forward.encode is T.encode
        vis, txt = T.visual_text_rms(_fake_adapter(2.0), frames=torch.zeros(1, 1, 2, 2, 3, dtype=torch.uint8))
        assert (vis, txt) == pytest.approx((3.0, 2.0))
    assert T.encode is original
    assert all(vars(part).get("encode", original) is original for part in T._PARTS)


def test_assigning_a_name_reaches_the_modules_that_use_it():
    original = T.config_for
    try:
        T.config_for = marker = lambda adapter: "patched"
        assert T.shipping.config_for is marker and T.build.config_for is marker
    finally:
        T.config_for = original
    assert T.shipping.config_for is original and T.build.config_for is original


def test_a_new_name_set_on_the_namespace_touches_no_module():
    try:
        T.not_a_name_of_mukv_train = 1
        assert not any("not_a_name_of_mukv_train" in vars(part) for part in T._PARTS)
    finally:
        del T.not_a_name_of_mukv_train


def test_registration_state_is_read_live():
    """_train_registered changes when the training attention is registered; mukv.train reads
    it from its owner rather than keeping a stale copy."""
    T.register_train_attention()
    assert T._train_registered is True
    assert T.forward._train_registered is True


def test_reimporting_keeps_the_namespace():
    assert importlib.import_module("mukv.train") is T
    assert callable(T.export) and callable(T.evaluate)
