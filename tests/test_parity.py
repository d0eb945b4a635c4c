"""Parity with the MuKV authors' code for LLaVA-OneVision: their prompt token ids and their
frame resizing, as the ``parity="authors"`` setting gives them (docs/concepts/method.md).

The authors' construction is written here from their code's strings, independently of
mukv's: the system prompt ``tokenizer(init_prompt)``, the query ``tokenizer(question)``
(its last key is the query vector) and the answer prompt ``tokenizer(get_prompt(question))``,
each with the tokenizer's default ``add_special_tokens``; frames through PIL bicubic to the
vision tower's size, ``rescale(1/255)`` and ``normalize`` as transformers' image transforms do.
The tokenizer is a Qwen2 byte-level BPE tokenizer built here (Qwen2's own pre-tokenizer, so
"\\n", " \\n" and "\\n\\n" split as they do for the real model).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mukv
from mukv.plugins.models.llava_onevision import REAL_CONFIGS, LlavaOnevisionAdapter, onevision_config

AUTHORS_INIT_PROMPT = "<|im_start|>system \nYou are a helpful assistant.<|im_end|><|im_start|>user "


def authors_answer_prompt(question: str) -> str:
    return f"\n{question}<|im_end|><|im_start|>assistant\n"


QUESTIONS = ["what color was the circle?", "How many squares moved?\nAnswer with one word.", "  spaces  and \n\n"]


@pytest.fixture(scope="module")
def qwen2_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    corpus = ["You are a helpful assistant.", "system user assistant", *QUESTIONS, "\n\n", " \n",
              "Question: which shape appeared first?\nOptions:\n(A) circle\n(B) square"] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>",
                                                         "<video>"]})
    return tok


def _adapter(tokenizer, **settings) -> LlavaOnevisionAdapter:
    from transformers import LlavaOnevisionForConditionalGeneration

    config = onevision_config(REAL_CONFIGS["tiny-llava-ov"], tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaOnevisionForConditionalGeneration(config).eval()
    return LlavaOnevisionAdapter(model, tokenizer, name="qwen2-tok", **settings)


def _fed_ids(adapter: LlavaOnevisionAdapter, call) -> list[list[int]]:
    """Token ids the language model is run on (``input_ids``) while ``call()`` runs."""
    seen: list[list[int]] = []

    def hook(_module, _args, kwargs):
        if kwargs.get("input_ids") is not None:
            seen.append(kwargs["input_ids"][0].tolist())

    handle = adapter.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("question", QUESTIONS)
def test_authors_parity_feeds_the_token_ids_of_their_prompts(qwen2_tokenizer, question):
    tok = qwen2_tokenizer
    adapter = _adapter(tok, parity="authors")
    assert _fed_ids(adapter, adapter.prefix) == [tok(AUTHORS_INIT_PROMPT).input_ids]
    prefix = adapter.prefix()
    assert prefix.token_ids.tolist() == tok(AUTHORS_INIT_PROMPT).input_ids
    # the query vector is the last key of the bare question, after the system prompt
    (query,) = _fed_ids(adapter, lambda: adapter.query_vector(prefix, question))
    assert query == tok(question).input_ids
    # the answer prompt, then one token per decoding step
    fed = _fed_ids(adapter, lambda: adapter.generate(prefix.kv, question, 3))
    assert fed[0] == tok(authors_answer_prompt(question)).input_ids
    assert all(len(step) == 1 for step in fed[1:])


def test_the_default_is_the_chat_template_and_differs_from_the_authors(qwen2_tokenizer):
    tok = qwen2_tokenizer
    default, authors = _adapter(tok), _adapter(tok, parity="authors")
    chat = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert _fed_ids(default, default.prefix) == [tok(chat).input_ids]
    # with Qwen2's pre-tokenizer the two system prompts differ in length, so every position moves
    assert default.prefix().length != authors.prefix().length
    q, kv = QUESTIONS[0], default.prefix().kv
    fed = _fed_ids(default, lambda: default.generate(kv, q, 1))
    assert fed[0] == tok(f"\n{q}<|im_end|>\n<|im_start|>assistant\n").input_ids


def test_prompts_and_resize_can_be_chosen_apart(qwen2_tokenizer):
    a = _adapter(qwen2_tokenizer, prompts="authors")
    assert a.settings.resize == "bilinear" and a.prefix().token_ids.tolist() == qwen2_tokenizer(AUTHORS_INIT_PROMPT).input_ids
    b = _adapter(qwen2_tokenizer, parity="authors", resize="bilinear")
    assert b.settings.prompts == "authors" and b.settings.resize == "bilinear"


def test_authors_resize_is_pil_bicubic_as_the_onevision_processor(qwen2_tokenizer):
    """The pixels equal transformers' image transforms (PIL bicubic resize, rescale, normalize)."""
    from transformers.image_transforms import normalize, rescale, resize
    from transformers.image_utils import ChannelDimension, PILImageResampling

    adapter = _adapter(qwen2_tokenizer, parity="authors")
    frames = np.random.default_rng(1).integers(0, 256, (3, 90, 70, 3), dtype=np.uint8)
    got = adapter.preprocess(torch.from_numpy(frames))
    s = adapter.image_size
    last = ChannelDimension.LAST
    want = np.stack([
        normalize(rescale(resize(f, (s, s), resample=PILImageResampling.BICUBIC, input_data_format=last), 1 / 255,
                          input_data_format=last), [0.5] * 3, [0.5] * 3, input_data_format=last)
        for f in frames])
    assert got.dtype == adapter.dtype and got.shape == (3, 3, s, s)
    assert torch.equal(got, torch.from_numpy(want).permute(0, 3, 1, 2).to(adapter.dtype))
    default = _adapter(qwen2_tokenizer).preprocess(torch.from_numpy(frames))
    assert not torch.equal(default, got)  # mukv's bilinear resize gives other pixels


def test_a_session_records_the_parity_setting_and_reopens_with_it(tmp_path, frames):
    pytest.importorskip("lancedb")
    spec = {"name": "tiny-llava-ov", "parity": "authors"}
    with mukv.Session(model=spec, backend="lancedb", path=tmp_path / "s", device="cpu") as s:
        assert s.model.settings.parity == "authors"
        s.feed(frames(4))
        first = s.ask("what color?", max_new_tokens=1).text
    with mukv.Session.open(tmp_path / "s", device="cpu") as s:
        assert s.backend.get_state("session")["model"] == spec
        assert s.model.settings.resize == "pil_bicubic"
        assert s.ask("what color?", max_new_tokens=1).text == first


def test_parity_settings_are_validated():
    with pytest.raises(mukv.ConfigError, match=r"model\.parity: Input should be 'mukv' or 'authors'"):
        mukv.Session(model={"name": "tiny-llava-ov", "parity": "official"})
    with pytest.raises(mukv.ConfigError, match="takes no settings"):
        mukv.Session(model={"name": "tiny-qwen2.5-vl", "parity": "authors"})
