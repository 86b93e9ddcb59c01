"""Parsing harmony completions and the stop rule, with the real o200k_harmony tokenizer."""

from __future__ import annotations

from typing import Any

import torch

from osstune.chat.messages import Conversation, Message
from osstune.chat.options import IGNORE_INDEX, RenderOptions
from osstune.chat.render import render_prompt, render_training_samples
from osstune.infer.generate import HarmonyStop, parse_completion, stop_token_ids


def ids(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def test_parse_reasoning_and_final(o200k_tokenizer: Any) -> None:
    text = ("<|channel|>analysis<|message|>User greets; reply.<|end|><|start|>assistant<|channel|>final"
            "<|message|>Hello there!<|return|>")
    reply = parse_completion(o200k_tokenizer, ids(o200k_tokenizer, text))
    assert reply.reasoning == "User greets; reply."
    assert reply.final == "Hello there!"
    assert reply.tool_calls == [] and reply.finished


def test_parse_tool_call(o200k_tokenizer: Any) -> None:
    text = ("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant to=functions.get_weather"
            "<|channel|>commentary json<|message|>{\"city\": \"Paris\"}<|call|>")
    reply = parse_completion(o200k_tokenizer, ids(o200k_tokenizer, text))
    assert reply.reasoning == "Need weather."
    assert reply.final == ""
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("get_weather", '{"city": "Paris"}')]


def test_parse_cut_off(o200k_tokenizer: Any) -> None:
    reply = parse_completion(o200k_tokenizer, ids(o200k_tokenizer, "<|channel|>final<|message|>Hel"))
    assert reply.final == "Hel" and not reply.finished


def test_stop_rule(o200k_tokenizer: Any) -> None:
    """<|return|> and <|call|> stop; <|end|> stops unless it closes an analysis message."""
    tok = o200k_tokenizer
    prompt = [1, 2, 3]
    rows = [
        prompt + ids(tok, "<|channel|>analysis<|message|>think<|end|>"),
        prompt + ids(tok, "<|channel|>analysis<|message|>t<|end|><|start|>assistant<|channel|>final<|message|>ok<|end|>"),
        prompt + ids(tok, "<|channel|>final<|message|>ok<|return|>"),
        prompt + ids(tok, "<|channel|>final<|message|>ok"),
    ]
    results = [bool(HarmonyStop(tok, len(prompt))(torch.tensor([r]), None)[0]) for r in rows]
    assert results == [False, True, True, False]
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|return|>"), tok.convert_tokens_to_ids("<|call|>")]


def test_prompt_equals_training_context(o200k_tokenizer: Any) -> None:
    """The inference prompt is token for token the context of the trained turn."""
    opts = RenderOptions(current_date="2026-01-01")
    msgs = (Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello", thinking="greet"),
            Message("user", "2+2?"), Message("assistant", "4", thinking="add"))
    last = render_training_samples(Conversation(msgs), o200k_tokenizer, opts)[-1]
    first_trained = next(i for i, label in enumerate(last.labels) if label != IGNORE_INDEX)
    assert render_prompt(msgs[:-1], o200k_tokenizer, opts) == last.input_ids[:first_trained]


def test_batch_equals_one_by_one(tiny_model_dir: Any) -> None:
    """Left-padded batched greedy generation gives each row the tokens it gets alone."""
    from osstune.infer.generate import generate, generate_batch
    from osstune.infer.loading import load_for_inference

    loaded = load_for_inference(model=str(tiny_model_dir), torch_dtype="float32")
    opts = RenderOptions(current_date="2026-01-01")
    convs = [[Message("user", "Hi")], [Message("system", "Be brief."), Message("user", "What is the capital of "
                                                                               "France? Answer in one word.")]]
    batch = generate_batch(loaded.model, loaded.tokenizer, convs, opts, max_new_tokens=12)
    single = [generate(loaded.model, loaded.tokenizer, c, opts, max_new_tokens=12) for c in convs]
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]
    assert all(len(r.token_ids) > 0 for r in batch)
