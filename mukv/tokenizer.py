"""A word-level tokenizer built locally (no download), for tiny and trained-here models."""

from __future__ import annotations

from typing import Iterable

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

#: Words every locally built tokenizer knows, besides the ones a caller adds.
BASE_WORDS = sorted(set("""
system user assistant you are a an the helpful of in on at to and or is was were what which who where when
why how many much color colour shape size object objects frame frames video stream scene moment time after before
first last left right up down top bottom middle center corner small large big tiny one two three four five six
seven eight nine ten zero yes no red green blue yellow orange purple white black gray grey pink brown cyan
square circle triangle star cross ring moved move moving appear appeared disappear disappeared change changed
did does do it its this that there here car person dog cat ? . , ! : ; ' " - ( ) \\n
""".split()))


def build_word_tokenizer(words: Iterable[str] = ()):
    """A ``PreTrainedTokenizerFast`` over special tokens + :data:`BASE_WORDS` + ``words``.

    Text is lower-cased and split on whitespace and punctuation; unknown words
    map to ``<unk>``. Token ids are stable for a given word list (sorted).
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab_words = sorted(set(BASE_WORDS) | {w.lower() for w in words} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + vocab_words)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>", "<image>", "<video>"],
    )
    return fast
