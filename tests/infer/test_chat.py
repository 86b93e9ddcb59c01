"""The interactive chat: the stream splitter, the reply layout, the slash commands and the history, driven without a
TTY (lines from a list, output into a string console)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from osstune.chat.messages import Message, ToolCall
from osstune.chat.options import RenderOptions
from osstune.chat.render import render_prompt
from osstune.infer.chat import (
    HELP,
    ChatSession,
    ChatSettings,
    ReplyPrinter,
    StreamPiece,
    StreamSplitter,
    assistant_message,
    chat_loop,
    reply_pieces,
)
from osstune.infer.generate import Reply, generate, parse_completion

DATE = "2026-01-01"
OPTIONS = RenderOptions(current_date=DATE)
REASONED = ("<|channel|>analysis<|message|>User greets; reply.<|end|><|start|>assistant<|channel|>final"
            "<|message|>Hello there!<|return|>")
TOOL_CALL = ("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant to=functions.get_weather"
             "<|channel|>commentary json<|message|>{\"city\": \"Paris\"}<|call|>")


def ids(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def split(tok: Any, tokens: Sequence[int]) -> tuple[list[StreamPiece], list[list[StreamPiece]]]:
    """All pieces of a token stream, and the pieces each token released."""
    splitter = StreamSplitter(tok)
    per_token = [splitter.feed(t) for t in tokens]
    pieces = [p for step in per_token for p in step] + splitter.flush()
    return pieces, per_token


def joined(pieces: Sequence[StreamPiece]) -> list[tuple[int, str, str, str | None]]:
    """Pieces merged per message: (message, kind, text, name)."""
    out: list[tuple[int, str, str, str | None]] = []
    for p in pieces:
        if out and out[-1][0] == p.message:
            out[-1] = (p.message, p.kind, out[-1][2] + p.text, p.name)
        else:
            out.append((p.message, p.kind, p.text, p.name))
    return out


def string_console() -> Console:
    return Console(file=io.StringIO(), width=100)


def output(console: Console) -> str:
    return console.file.getvalue()  # type: ignore[attr-defined]


class ScriptedModel(torch.nn.Module):
    """A stand-in for a causal LM whose ``generate`` returns scripted replies and records each prompt.

    A reply that is an exception is raised instead (as Ctrl-C raises KeyboardInterrupt inside ``generate``).
    """

    def __init__(self, replies: Sequence[list[int] | BaseException]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.replies = list(replies)
        self.prompts: list[list[int]] = []

    def generate(self, input_ids: torch.Tensor, streamer: Any = None, **kwargs: Any) -> torch.Tensor:
        self.prompts.append(input_ids[0].tolist())
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        if streamer is not None:
            streamer.put(input_ids)
            for token in reply:
                streamer.put(torch.tensor([token]))
            streamer.end()
        return torch.cat([input_ids, torch.tensor([reply])], dim=1)


def session(model: Any, tok: Any, stream: bool = True, **settings: Any) -> ChatSession:
    return ChatSession(model, tok, OPTIONS, ChatSettings(stream=stream, max_new_tokens=64, **settings),
                       string_console())


def transcript(text: str) -> str:
    """The chat output without the timing lines, which differ run to run."""
    return "\n".join(line for line in text.splitlines() if not (line.startswith("[") and "tokens/s]" in line))


# ---------------------------------------------------------------------------------------------------------------
# The stream splitter
# ---------------------------------------------------------------------------------------------------------------


def test_splitter_separates_reasoning_and_answer(o200k_tokenizer: Any) -> None:
    tokens = ids(o200k_tokenizer, REASONED)
    pieces, _ = split(o200k_tokenizer, tokens)
    assert joined(pieces) == [(0, "reasoning", "User greets; reply.", None), (1, "final", "Hello there!", None)]
    reply = parse_completion(o200k_tokenizer, tokens)
    assert (reply.reasoning, reply.final) == ("User greets; reply.", "Hello there!")


def test_splitter_tool_call(o200k_tokenizer: Any) -> None:
    pieces, _ = split(o200k_tokenizer, ids(o200k_tokenizer, TOOL_CALL))
    assert joined(pieces) == [(0, "reasoning", "Need weather.", None),
                              (1, "tool_call", '{"city": "Paris"}', "get_weather")]


def test_splitter_streams_text_as_it_arrives(o200k_tokenizer: Any) -> None:
    """Header tokens release nothing; every body token releases its own text at once."""
    header = ids(o200k_tokenizer, "<|channel|>final<|message|>")
    body = ids(o200k_tokenizer, "One two three")
    _, per_token = split(o200k_tokenizer, header + body)
    assert per_token[: len(header)] == [[]] * len(header)
    assert [[p.text for p in step] for step in per_token[len(header):]] == [["One"], [" two"], [" three"]]


def test_splitter_holds_back_partial_characters(o200k_tokenizer: Any) -> None:
    """𝄞 is three byte tokens: nothing is shown until the character is whole, and never a replacement char."""
    clef = ids(o200k_tokenizer, "𝄞")
    assert len(clef) == 3
    header = ids(o200k_tokenizer, "<|channel|>final<|message|>")
    tokens = header + ids(o200k_tokenizer, "a") + clef + ids(o200k_tokenizer, "猫b<|return|>")
    pieces, per_token = split(o200k_tokenizer, tokens)
    released = [[p.text for p in step] for step in per_token[len(header):]]
    assert released[:4] == [["a"], [], [], ["𝄞"]]
    assert "".join(p.text for p in pieces) == "a𝄞猫b"
    assert all("\ufffd" not in p.text for p in pieces)


def test_splitter_flush_releases_a_cut_off_character(o200k_tokenizer: Any) -> None:
    """When the budget ends inside a character, flush shows what parse_completion keeps (a replacement char)."""
    tokens = ids(o200k_tokenizer, "<|channel|>final<|message|>ok") + ids(o200k_tokenizer, "𝄞")[:1]
    splitter = StreamSplitter(o200k_tokenizer)
    assert [p.text for t in tokens for p in splitter.feed(t)] == ["ok"]
    assert [p.text for p in splitter.flush()] == ["\ufffd"]
    assert parse_completion(o200k_tokenizer, tokens).final == "ok\ufffd"


def test_splitter_matches_parse_completion_on_a_long_mixed_reply(o200k_tokenizer: Any) -> None:
    text = ("<|channel|>analysis<|message|>Think 𝄞 twice, 猫.<|end|><|start|>assistant<|channel|>commentary"
            "<|message|>Checking.<|end|><|start|>assistant<|channel|>final<|message|>Done: ñ 🙂<|return|>")
    tokens = ids(o200k_tokenizer, text)
    pieces, _ = split(o200k_tokenizer, tokens)
    reply = parse_completion(o200k_tokenizer, tokens)
    assert "".join(p.text for p in pieces if p.kind == "reasoning") == reply.reasoning == "Think 𝄞 twice, 猫."
    assert "".join(p.text for p in pieces if p.kind == "final") == reply.final == "Checking.Done: ñ 🙂"
    assert [p.message for p in pieces if p.kind == "final"][-1] == 2


def test_splitter_without_harmony_streams_everything_as_the_answer() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["hello world", "héllo"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    tokens = tok.encode("héllo 𝄞 world", add_special_tokens=False) + [tok.eos_token_id]
    pieces, _ = split(tok, tokens)
    assert {(p.message, p.kind) for p in pieces} == {(0, "final")}
    assert "".join(p.text for p in pieces) == "héllo 𝄞 world"
    assert all("\ufffd" not in p.text for p in pieces)


# ---------------------------------------------------------------------------------------------------------------
# Layout and history entries
# ---------------------------------------------------------------------------------------------------------------


def test_printer_layout_of_a_whole_reply() -> None:
    console = string_console()
    printer = ReplyPrinter(console)
    reply = Reply(reasoning="Plan it.", final="Done.", finished=True)
    for piece in reply_pieces(reply):
        printer.show(piece)
    printer.close()
    assert output(console) == "thinking\nPlan it.\nassistant\nDone.\n"
    console = string_console()
    printer = ReplyPrinter(console)
    for piece in reply_pieces(Reply(tool_calls=[ToolCall("get_weather", '{"city": "Paris"}')])):
        printer.show(piece)
    printer.close()
    assert output(console) == 'tool call functions.get_weather\n{"city": "Paris"}\n'


def test_reasoning_is_dim_italic_on_a_terminal() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, color_system="standard", width=100)
    printer = ReplyPrinter(console)
    printer.show(StreamPiece(0, "reasoning", "hmm"))
    printer.show(StreamPiece(1, "final", "yes"))
    printer.close()
    text = output(console)
    assert "\x1b[2;3mhmm\x1b[0m" in text  # dim (2) italic (3)
    assert text.endswith("yes\n")


def test_assistant_message_keeps_answer_reasoning_or_call() -> None:
    assert assistant_message(Reply(reasoning="r", final="a")) == Message("assistant", "a", thinking="r")
    assert assistant_message(Reply(final="a")) == Message("assistant", "a")
    call = ToolCall("f", "{}")
    assert assistant_message(Reply(reasoning="r", tool_calls=[call])) == Message("assistant", "", thinking="r",
                                                                                 tool_calls=(call,))


# ---------------------------------------------------------------------------------------------------------------
# The chat loop with a scripted model (known completions) and the real gpt-oss vocabulary
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
def test_chat_shows_reasoning_apart_from_the_answer(o200k_tokenizer: Any, stream: bool) -> None:
    model = ScriptedModel([ids(o200k_tokenizer, REASONED)])
    chat = session(model, o200k_tokenizer, stream=stream)
    assert chat_loop(chat, ["Hi"]) == 0
    assert transcript(output(chat.console)) == (
        f"{HELP}\nyou> Hi\nthinking\nUser greets; reply.\nassistant\nHello there!")
    assert chat.history == [Message("user", "Hi"), Message("assistant", "Hello there!",
                                                           thinking="User greets; reply.")]


def test_history_commands_and_prompts(o200k_tokenizer: Any) -> None:
    """Each prompt is the renderer's prompt of the history; /reasoning and /clear change it; /exit stops."""
    tok = o200k_tokenizer
    answer = ids(tok, "<|channel|>analysis<|message|>R<|end|><|start|>assistant<|channel|>final<|message|>A"
                      "<|return|>")
    model = ScriptedModel([answer, answer, answer])
    chat = session(model, tok)
    lines = ["Hi", "/reasoning high", "Again", "/reasoning extreme", "/clear", "Fresh", "/exit", "never sent"]
    assert chat_loop(chat, lines) == 0
    first, second, third = model.prompts
    high = RenderOptions(current_date=DATE, reasoning_effort="high")
    assert first == render_prompt([Message("user", "Hi")], tok, OPTIONS)
    assert second == render_prompt([Message("user", "Hi"), Message("assistant", "A", thinking="R"),
                                    Message("user", "Again")], tok, high)
    assert third == render_prompt([Message("user", "Fresh")], tok, high)
    assert "Reasoning: medium" in tok.decode(first) and "Reasoning: high" in tok.decode(second)
    assert "Hi" not in tok.decode(third)
    text = output(chat.console)
    assert "(reasoning effort: high)" in text
    assert "usage: /reasoning low|medium|high (now high)" in text
    assert "(conversation cleared)" in text
    assert "never sent" not in text
    assert chat.history == [Message("user", "Fresh"), Message("assistant", "A", thinking="R")]


def test_unknown_command_and_end_of_input(o200k_tokenizer: Any) -> None:
    model = ScriptedModel([])
    chat = session(model, o200k_tokenizer)
    assert chat_loop(chat, ["", "/help me", "   "]) == 0  # the input simply ends (Ctrl-D)
    assert f"unknown command /help; {HELP}" in output(chat.console)
    assert model.prompts == []


def test_tool_call_is_printed_and_kept(o200k_tokenizer: Any) -> None:
    model = ScriptedModel([ids(o200k_tokenizer, TOOL_CALL)])
    chat = session(model, o200k_tokenizer)
    chat_loop(chat, ["Weather in Paris?"])
    assert 'thinking\nNeed weather.\ntool call functions.get_weather\n{"city": "Paris"}\n' in output(chat.console)
    assert chat.history[-1] == Message("assistant", "", thinking="Need weather.",
                                       tool_calls=(ToolCall("get_weather", '{"city": "Paris"}'),))


def test_interrupted_reply_is_not_kept(o200k_tokenizer: Any) -> None:
    model = ScriptedModel([KeyboardInterrupt(), ids(o200k_tokenizer, REASONED)])
    chat = session(model, o200k_tokenizer)
    chat_loop(chat, ["First", "Second"])
    assert "(interrupted; this reply is not kept in the conversation)" in output(chat.console)
    assert model.prompts[1] == render_prompt([Message("user", "Second")], o200k_tokenizer, OPTIONS)
    assert [m.content for m in chat.history] == ["Second", "Hello there!"]


def test_conversation_longer_than_the_context_is_reported(o200k_tokenizer: Any) -> None:
    model = ScriptedModel([])
    chat = session(model, o200k_tokenizer, max_context=50)
    chat_loop(chat, ["Hi"])
    text = output(chat.console)
    length = len(render_prompt([Message("user", "Hi")], o200k_tokenizer, OPTIONS))
    assert f"error: prompt 0 has {length} tokens, but the model's context is 50" in text
    assert "(/clear starts a new conversation)" in text
    assert chat.history == [] and model.prompts == []


def test_cut_off_reply_says_so(o200k_tokenizer: Any) -> None:
    tokens = ids(o200k_tokenizer, "<|channel|>final<|message|>Hel")
    assert len(tokens) == 4
    chat = session(ScriptedModel([tokens]), o200k_tokenizer)
    chat_loop(chat, ["Hi"])
    assert "assistant\nHel\n(cut off after 4 new tokens: raise --max_new_tokens for longer replies)\n" \
        in output(chat.console)


# ---------------------------------------------------------------------------------------------------------------
# The real tiny gpt-oss
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Any:
    from osstune.infer.loading import load_for_inference

    return load_for_inference(model=str(tiny_model_dir), torch_dtype="float32", current_date=DATE)


def test_streamed_tokens_are_the_reply(tiny: Any) -> None:
    seen: list[int] = []
    reply = generate(tiny.model, tiny.tokenizer, [Message("user", "Hi")], tiny.options, max_new_tokens=10,
                     on_token=seen.append)
    assert seen == reply.token_ids and len(seen) == 10


def test_real_model_streamed_and_whole_replies_agree(tiny: Any) -> None:
    """Greedy chat with the real model: streaming and non-streaming print the same transcript."""
    outputs = []
    for stream in (True, False):
        chat = ChatSession(tiny.model, tiny.tokenizer, tiny.options, ChatSettings(stream=stream, max_new_tokens=12),
                           string_console())
        chat_loop(chat, ["Hi", "/reasoning low", "And now?"])
        outputs.append(transcript(output(chat.console)))
        assert [m.role for m in chat.history] == ["user", "assistant", "user", "assistant"]
    assert outputs[0] == outputs[1]
    # The random tiny model writes no harmony message: the raw text is shown, and the budget note.
    first = generate(tiny.model, tiny.tokenizer, [Message("user", "Hi")], tiny.options, max_new_tokens=12)
    raw = tiny.tokenizer.decode(first.token_ids, skip_special_tokens=False)
    assert f"you> Hi\n(no message could be parsed from the output; raw: {raw!r})\n(cut off after 12 new tokens" \
        in outputs[0]
