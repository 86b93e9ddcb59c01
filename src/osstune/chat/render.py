"""The one rendering entry point: harmony for gpt-oss tokenizers, the chat template for every other model.

The data pipeline, inference and evaluation call these two functions and never pick a renderer themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from osstune.chat import generic, harmony
from osstune.chat.messages import Conversation, Message
from osstune.chat.options import RenderOptions, Sample
from osstune.chat.tokenizer import is_harmony_tokenizer


def render_training_samples(conv: Conversation, tokenizer: Any, options: RenderOptions) -> list[Sample]:
    """Render a conversation into training samples (token ids and loss labels).

    Args:
        conv: the conversation.
        tokenizer: the model's tokenizer; harmony rendering is used when it has the harmony special tokens.
        options: rendering options, including the loss policy ``loss_scale``.

    Returns:
        One or more samples; see :func:`osstune.chat.harmony.render_training_samples` and
        :func:`osstune.chat.generic.render_training_samples` for how each path splits and masks.
    """
    if is_harmony_tokenizer(tokenizer):
        return harmony.render_training_samples(conv, tokenizer, options)
    return generic.render_training_samples(conv, tokenizer, options)


def render_prompt(
    messages: Sequence[Message],
    tokenizer: Any,
    options: RenderOptions,
    tools: Sequence[dict[str, Any]] = (),
) -> list[int]:
    """Render the inference prompt: ``messages`` followed by the assistant generation prompt.

    Args:
        messages: the conversation so far.
        tokenizer: the model's tokenizer; harmony rendering is used when it has the harmony special tokens.
        options: rendering options (``loss_scale`` is unused).
        tools: function definitions in the OpenAI ``tools`` schema.

    Returns:
        The prompt token ids.
    """
    if is_harmony_tokenizer(tokenizer):
        return harmony.render_prompt(messages, tokenizer, options, tools)
    return generic.render_prompt(messages, tokenizer, options, tools)
