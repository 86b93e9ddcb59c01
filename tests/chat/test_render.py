"""The rendering entry point picks harmony for gpt-oss tokenizers and the chat template otherwise."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from osstune.chat import generic, harmony
from osstune.chat.messages import Conversation, Message
from osstune.chat.options import IGNORE_INDEX, RenderOptions
from osstune.chat.render import render_prompt, render_training_samples

CONV = Conversation(messages=(Message("user", "hello"), Message("assistant", "world", thinking="hmm")))
OPTIONS = RenderOptions(current_date="2025-08-05")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny non-harmony tokenizer with a one-line chat template."""
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "user": 3, "assistant": 4, ":": 5, "|": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    template = (
        "{% for m in messages %}{{ m.role }} : {{ m.content }} | {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, eos_token="|")


def test_harmony_tokenizer_uses_the_harmony_renderer(o200k_tokenizer: Any) -> None:
    samples = render_training_samples(CONV, o200k_tokenizer, OPTIONS)
    assert samples == harmony.render_training_samples(CONV, o200k_tokenizer, OPTIONS)
    assert o200k_tokenizer.decode(samples[0].input_ids).endswith("<|channel|>final<|message|>world<|return|>")
    prompt = render_prompt(CONV.messages[:1], o200k_tokenizer, OPTIONS)
    assert prompt == harmony.render_prompt(CONV.messages[:1], o200k_tokenizer, OPTIONS)


def test_other_tokenizers_use_the_chat_template() -> None:
    tokenizer = word_tokenizer()
    (sample,) = render_training_samples(CONV, tokenizer, OPTIONS)
    assert sample.input_ids == [3, 5, 1, 6, 4, 5, 2, 6]
    assert sample.labels == [IGNORE_INDEX] * 6 + [2, 6]
    assert [sample] == generic.render_training_samples(CONV, tokenizer, OPTIONS)
    assert render_prompt(CONV.messages[:1], tokenizer, OPTIONS) == [3, 5, 1, 6, 4, 5]
