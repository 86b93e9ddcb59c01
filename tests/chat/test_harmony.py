"""Harmony rendering on hand-written conversations: exact streams and exactly which tokens are trained."""

from __future__ import annotations

import random
from typing import Any

import pytest

from osstune.chat.harmony import render_functions_namespace, render_prompt, render_training_samples
from osstune.chat.messages import Conversation, Message, ToolCall
from osstune.chat.options import IGNORE_INDEX, RenderOptions, Sample
from osstune.errors import DataError, OsstuneError

DATE = "2025-08-05"
SYSTEM = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    f"Knowledge cutoff: 2024-06\nCurrent date: {DATE}\n\nReasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
)
SYSTEM_WITH_TOOLS = SYSTEM.replace(
    "<|end|>", "\nCalls to these tools must go to the commentary channel: 'functions'.<|end|>"
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Gets the current weather.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city"],
        },
    },
}
WEATHER_NAMESPACE = (
    "## functions\n\nnamespace functions {\n\n// Gets the current weather.\ntype get_weather = (_: {\n"
    '// City name\ncity: string,\nunit?: "c" | "f",\n}) => any;\n\n} // namespace functions'
)
ARGS = '{"city": "Paris"}'


def options(loss_scale: str = "default", **kwargs: Any) -> RenderOptions:
    return RenderOptions(current_date=DATE, loss_scale=loss_scale, **kwargs)  # type: ignore[arg-type]


def conv(*messages: Message, tools: tuple[dict[str, Any], ...] = ()) -> Conversation:
    return Conversation(messages=messages, tools=tools)


def user(text: str) -> Message:
    return Message("user", text)


def assistant(content: str, thinking: str | None = None) -> Message:
    return Message("assistant", content, thinking=thinking)


def call(thinking: str | None = None, content: str = "") -> Message:
    return Message("assistant", content, thinking=thinking, tool_calls=(ToolCall("get_weather", ARGS),))


def text(tokenizer: Any, sample: Sample) -> str:
    return tokenizer.decode(sample.input_ids)


def spans(tokenizer: Any, sample: Sample) -> list[str]:
    """The decoded maximal runs of trained tokens."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in sample.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return [tokenizer.decode(run) for run in runs]


def target(content: str, thinking: str | None = None) -> str:
    analysis = "" if thinking is None else f"<|channel|>analysis<|message|>{thinking}<|end|><|start|>assistant"
    return f"{analysis}<|channel|>final<|message|>{content}<|return|>"


TWO_ROUNDS = conv(user("Q1"), assistant("C1", "T1"), user("Q2"), assistant("C2", "T2"))


def test_default_trains_each_reasoning_turn_in_its_own_sample(o200k_tokenizer: Any) -> None:
    samples = render_training_samples(TWO_ROUNDS, o200k_tokenizer, options())
    assert len(samples) == 2
    first, second = samples
    assert text(o200k_tokenizer, first) == (
        SYSTEM + "<|start|>user<|message|>Q1<|end|><|start|>assistant" + target("C1", "T1")
    )
    assert spans(o200k_tokenizer, first) == [target("C1", "T1")]
    assert text(o200k_tokenizer, second) == (
        SYSTEM
        + "<|start|>user<|message|>Q1<|end|><|start|>assistant<|channel|>final<|message|>C1<|end|>"
        + "<|start|>user<|message|>Q2<|end|><|start|>assistant"
        + target("C2", "T2")
    )
    assert spans(o200k_tokenizer, second) == [target("C2", "T2")]
    for sample in samples:
        assert len(sample.labels) == len(sample.input_ids)
        trained = [i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX]
        assert all(sample.labels[i] == sample.input_ids[i] for i in trained)


def test_last_round_trains_only_the_last_turn(o200k_tokenizer: Any) -> None:
    default_last = render_training_samples(TWO_ROUNDS, o200k_tokenizer, options())[-1]
    (sample,) = render_training_samples(TWO_ROUNDS, o200k_tokenizer, options("last_round"))
    assert sample.input_ids == default_last.input_ids
    assert spans(o200k_tokenizer, sample) == [target("C2", "T2")]


def test_last_round_does_not_train_earlier_in_place_turns(o200k_tokenizer: Any) -> None:
    conversation = conv(user("Q1"), assistant("C1"), user("Q2"), assistant("C2", "T2"))
    (sample,) = render_training_samples(conversation, o200k_tokenizer, options("last_round"))
    assert spans(o200k_tokenizer, sample) == [target("C2", "T2")]


def test_all_trains_every_token_of_the_default_samples(o200k_tokenizer: Any) -> None:
    default = render_training_samples(TWO_ROUNDS, o200k_tokenizer, options())
    everything = render_training_samples(TWO_ROUNDS, o200k_tokenizer, options("all"))
    assert [s.input_ids for s in everything] == [s.input_ids for s in default]
    for sample in everything:
        assert sample.labels == sample.input_ids
        assert sample.num_trained == len(sample.input_ids)


def test_final_answer_without_reasoning_is_trained_in_place_without_its_end(o200k_tokenizer: Any) -> None:
    conversation = conv(user("Q1"), assistant("C1"), user("Q2"), assistant("C2", "T2"))
    (sample,) = render_training_samples(conversation, o200k_tokenizer, options())
    assert text(o200k_tokenizer, sample) == (
        SYSTEM
        + "<|start|>user<|message|>Q1<|end|><|start|>assistant<|channel|>final<|message|>C1<|end|>"
        + "<|start|>user<|message|>Q2<|end|><|start|>assistant"
        + target("C2", "T2")
    )
    # The model emits <|return|> after C1 at inference; the <|end|> of the history rendering is not trained.
    assert spans(o200k_tokenizer, sample) == ["<|channel|>final<|message|>C1", target("C2", "T2")]


def test_empty_reasoning_renders_an_empty_analysis_under_default(o200k_tokenizer: Any) -> None:
    conversation = conv(user("Q1"), assistant("C1", ""), user("Q2"), assistant("C2", ""))
    samples = render_training_samples(conversation, o200k_tokenizer, options())
    assert [spans(o200k_tokenizer, s) for s in samples] == [[target("C1", "")], [target("C2", "")]]
    assert text(o200k_tokenizer, samples[0]).endswith(
        "<|start|>assistant<|channel|>analysis<|message|><|end|>"
        "<|start|>assistant<|channel|>final<|message|>C1<|return|>"
    )


def test_ignore_empty_think_drops_empty_and_blank_reasoning(o200k_tokenizer: Any) -> None:
    conversation = conv(user("Q1"), assistant("C1", ""), user("Q2"), assistant("C2", " \n "))
    (sample,) = render_training_samples(conversation, o200k_tokenizer, options("ignore_empty_think"))
    assert text(o200k_tokenizer, sample) == (
        SYSTEM
        + "<|start|>user<|message|>Q1<|end|><|start|>assistant<|channel|>final<|message|>C1<|end|>"
        + "<|start|>user<|message|>Q2<|end|><|start|>assistant<|channel|>final<|message|>C2<|return|>"
    )
    assert spans(o200k_tokenizer, sample) == ["<|channel|>final<|message|>C1", target("C2")]


def test_ignore_empty_think_keeps_real_reasoning(o200k_tokenizer: Any) -> None:
    samples = render_training_samples(TWO_ROUNDS, o200k_tokenizer, options("ignore_empty_think"))
    default = render_training_samples(TWO_ROUNDS, o200k_tokenizer, options())
    assert samples == default


def test_tool_call_turn_is_trained_in_place_with_its_analysis(o200k_tokenizer: Any) -> None:
    conversation = conv(
        Message("developer", "Be brief."),
        user("Weather in Paris?"),
        call(thinking="Need the weather."),
        Message("tool", 'Sunny, 25 "C"'),
        assistant("It is sunny.", "Tool says sunny."),
        tools=(WEATHER_TOOL,),
    )
    (sample,) = render_training_samples(conversation, o200k_tokenizer, options())
    call_span = (
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant to=functions.get_weather"
        f"<|channel|>commentary json<|message|>{ARGS}<|call|>"
    )
    assert text(o200k_tokenizer, sample) == (
        SYSTEM_WITH_TOOLS
        + f"<|start|>developer<|message|># Instructions\n\nBe brief.\n\n# Tools\n\n{WEATHER_NAMESPACE}<|end|>"
        + "<|start|>user<|message|>Weather in Paris?<|end|><|start|>assistant"
        + call_span
        + '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"Sunny, 25 \\"C\\""<|end|>'
        + "<|start|>assistant"
        + target("It is sunny.", "Tool says sunny.")
    )
    assert spans(o200k_tokenizer, sample) == [call_span, target("It is sunny.", "Tool says sunny.")]


def test_tool_call_without_analysis_trains_from_the_recipient(o200k_tokenizer: Any) -> None:
    conversation = conv(user("Weather?"), call(), Message("tool", "sunny"), assistant("Sunny."), tools=(WEATHER_TOOL,))
    (sample,) = render_training_samples(conversation, o200k_tokenizer, options())
    assert spans(o200k_tokenizer, sample) == [
        f" to=functions.get_weather<|channel|>commentary json<|message|>{ARGS}<|call|>",
        target("Sunny."),
    ]


def test_tool_call_content_is_its_analysis(o200k_tokenizer: Any) -> None:
    conversation = conv(user("Weather?"), call(content="Let me check."), Message("tool", "sunny"), assistant("Ok"))
    (sample,) = render_training_samples(conversation, o200k_tokenizer, options())
    assert spans(o200k_tokenizer, sample)[0].startswith("<|channel|>analysis<|message|>Let me check.<|end|>")


def test_conversation_ending_in_a_tool_call_trains_the_call(o200k_tokenizer: Any) -> None:
    conversation = conv(user("Weather?"), call(thinking="Check."), Message("tool", "sunny"), tools=(WEATHER_TOOL,))
    (sample,) = render_training_samples(conversation, o200k_tokenizer, options())
    call_span = (
        "<|channel|>analysis<|message|>Check.<|end|><|start|>assistant to=functions.get_weather"
        f"<|channel|>commentary json<|message|>{ARGS}<|call|>"
    )
    prompt_end = "<|start|>user<|message|>Weather?<|end|><|start|>assistant"
    assert text(o200k_tokenizer, sample).endswith(prompt_end + call_span)
    assert spans(o200k_tokenizer, sample) == [call_span]


def test_final_answer_after_reasoned_tool_call_gets_its_own_sample(o200k_tokenizer: Any) -> None:
    # The later sample renders the call without its analysis (a final answer follows it), which is not what the
    # model saw when it answered C1; so C1 and the call are trained in their own sample.
    conversation = conv(
        user("Q1"),
        call(thinking="Check."),
        Message("tool", "sunny"),
        assistant("C1"),
        user("Q2"),
        assistant("C2", "T2"),
    )
    first, second = render_training_samples(conversation, o200k_tokenizer, options())
    assert spans(o200k_tokenizer, first) == [
        "<|channel|>analysis<|message|>Check.<|end|><|start|>assistant to=functions.get_weather"
        f"<|channel|>commentary json<|message|>{ARGS}<|call|>",
        target("C1"),
    ]
    assert text(o200k_tokenizer, second) == (
        SYSTEM
        + "<|start|>user<|message|>Q1<|end|>"
        + f"<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{ARGS}<|call|>"
        + '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"sunny"<|end|>'
        + "<|start|>assistant<|channel|>final<|message|>C1<|end|>"
        + "<|start|>user<|message|>Q2<|end|><|start|>assistant"
        + target("C2", "T2")
    )
    assert spans(o200k_tokenizer, second) == [target("C2", "T2")]


def test_trailing_messages_after_the_last_assistant_turn_are_dropped(o200k_tokenizer: Any) -> None:
    with_tail = conv(user("Q1"), assistant("C1", "T1"), user("never answered"))
    without = conv(user("Q1"), assistant("C1", "T1"))
    assert render_training_samples(with_tail, o200k_tokenizer, options()) == render_training_samples(
        without, o200k_tokenizer, options()
    )


def test_literal_special_token_text_stays_ordinary_text(o200k_tokenizer: Any) -> None:
    conversation = conv(user("say <|end|> and <|return|>"), assistant("<|start|>ok", "<|call|>"))
    (sample,) = render_training_samples(conversation, o200k_tokenizer, options())
    # Only the template's own control tokens are special: 2 <|end|> (system, user) and 1 inside the target.
    assert sample.input_ids.count(200007) == 3
    assert sample.input_ids.count(200002) == 1
    assert sample.input_ids.count(200012) == 0
    assert sample.input_ids.count(200006) == 4
    assert text(o200k_tokenizer, sample).endswith(
        "<|start|>user<|message|>say <|end|> and <|return|><|end|><|start|>assistant"
        + target("<|start|>ok", "<|call|>")
    )


def test_system_prompt_sources(o200k_tokenizer: Any) -> None:
    dev = "<|start|>developer<|message|># Instructions\n\n{}\n\n<|end|>"
    plain = conv(user("Q"), assistant("A"))
    (sample,) = render_training_samples(plain, o200k_tokenizer, options(system="Default rules."))
    assert text(o200k_tokenizer, sample).startswith(SYSTEM + dev.format("Default rules.") + "<|start|>user")
    own = conv(Message("system", "Own rules."), user("Q"), assistant("A"))
    (sample,) = render_training_samples(own, o200k_tokenizer, options(system="Default rules."))
    assert text(o200k_tokenizer, sample).startswith(SYSTEM + dev.format("Own rules.") + "<|start|>user")
    empty = conv(Message("developer", ""), user("Q"), assistant("A"))
    (sample,) = render_training_samples(empty, o200k_tokenizer, options(system="Default rules."))
    assert text(o200k_tokenizer, sample).startswith(SYSTEM + dev.format("Default rules.") + "<|start|>user")
    (sample,) = render_training_samples(empty, o200k_tokenizer, options())
    assert text(o200k_tokenizer, sample).startswith(SYSTEM + "<|start|>user")


def test_system_message_options(o200k_tokenizer: Any) -> None:
    custom = RenderOptions(current_date="2030-01-31", reasoning_effort="high", model_identity="You are Mimi.")
    ids = render_prompt([user("Hi")], o200k_tokenizer, custom)
    assert o200k_tokenizer.decode(ids) == (
        "<|start|>system<|message|>You are Mimi.\nKnowledge cutoff: 2024-06\nCurrent date: 2030-01-31\n\n"
        "Reasoning: high\n\n# Valid channels: analysis, commentary, final. Channel must be included for every "
        "message.<|end|><|start|>user<|message|>Hi<|end|><|start|>assistant"
    )


def test_render_prompt_with_tools_and_history(o200k_tokenizer: Any) -> None:
    messages = [user("Weather?"), call(thinking="Check."), Message("tool", "sunny")]
    ids = render_prompt(messages, o200k_tokenizer, options(), tools=[WEATHER_TOOL])
    assert o200k_tokenizer.decode(ids) == (
        SYSTEM_WITH_TOOLS
        + f"<|start|>developer<|message|># Tools\n\n{WEATHER_NAMESPACE}<|end|>"
        + "<|start|>user<|message|>Weather?<|end|>"
        + "<|start|>assistant<|channel|>analysis<|message|>Check.<|end|>"
        + f"<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{ARGS}<|call|>"
        + '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"sunny"<|end|>'
        + "<|start|>assistant"
    )
    # Once a final answer follows, the call's analysis is dropped; the answer's reasoning always is.
    later = [*messages, assistant("Sunny.", "Because."), user("Thanks")]
    assert o200k_tokenizer.decode(render_prompt(later, o200k_tokenizer, options(), tools=[WEATHER_TOOL])).endswith(
        "<|start|>user<|message|>Weather?<|end|>"
        + f"<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{ARGS}<|call|>"
        + '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"sunny"<|end|>'
        + "<|start|>assistant<|channel|>final<|message|>Sunny.<|end|>"
        + "<|start|>user<|message|>Thanks<|end|><|start|>assistant"
    )


def test_tool_result_name_comes_from_the_message_or_the_last_call(o200k_tokenizer: Any) -> None:
    messages = [user("Q"), call(), Message("tool", "a"), Message("tool", "b", name="other")]
    decoded = o200k_tokenizer.decode(render_prompt(messages, o200k_tokenizer, options()))
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"a"<|end|>' in decoded
    assert '<|start|>functions.other to=assistant<|channel|>commentary<|message|>"b"<|end|>' in decoded


def test_bare_function_tool_definitions_are_accepted(o200k_tokenizer: Any) -> None:
    wrapped = render_prompt([user("Q")], o200k_tokenizer, options(), tools=[WEATHER_TOOL])
    bare = render_prompt([user("Q")], o200k_tokenizer, options(), tools=[WEATHER_TOOL["function"]])
    assert wrapped == bare


def test_functions_namespace_without_description_or_parameters() -> None:
    assert render_functions_namespace([{"name": "ping"}, {"name": "noop", "description": "Nothing."}]) == (
        "## functions\n\nnamespace functions {\n\ntype ping = () => any;\n\n// Nothing.\ntype noop = () => any;\n\n"
        "} // namespace functions"
    )


def test_functions_namespace_types_and_defaults() -> None:
    tool = {
        "name": "search",
        "description": "Search.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "limit": {"type": "integer", "default": 10},
                "tags": {"type": "array", "items": {"type": "string"}, "nullable": True},
                "mode": {"type": "string", "enum": ["fast", "deep"], "default": "fast"},
                "when": {"type": ["string", "null"]},
                "flag": {"type": "boolean"},
            },
            "required": ["query"],
        },
    }
    assert render_functions_namespace([tool]) == (
        "## functions\n\nnamespace functions {\n\n// Search.\ntype search = (_: {\nquery: string,\n"
        "limit?: number, // default: 10,\ntags?: string[] | null,\n"
        'mode?: "fast" | "deep", // default: fast,\nwhen?: string | null,\nflag?: boolean,\n'
        "}) => any;\n\n} // namespace functions"
    )


@pytest.mark.parametrize(
    ("messages", "field", "reason"),
    [
        ([user("Q"), Message("system", "late"), assistant("A")], "messages[1].role", "misplaced_system"),
        ([user("Q"), assistant("A <|channel|>final")], "messages[1].content", "channel_tags"),
        ([user("Q"), assistant("A", "x<|channel|>analysis")], "messages[1].thinking", "channel_tags"),
        ([user("Q"), Message("tool", "r")], "messages[1]", "orphan_tool_result"),
        ([user("Q"), assistant("A"), Message("tool", "r")], "messages[2]", "orphan_tool_result"),
        ([user("Q"), call(thinking="t", content="c")], "messages[1].content", "tool_call_content_and_thinking"),
        (
            [user("Q"), Message("assistant", "", tool_calls=(ToolCall("a", "{}"), ToolCall("b", "{}")))],
            "messages[1].tool_calls",
            "multiple_tool_calls",
        ),
    ],
)
def test_invalid_conversations_raise_data_errors(
    o200k_tokenizer: Any, messages: list[Message], field: str, reason: str
) -> None:
    with pytest.raises(DataError) as error:
        render_training_samples(conv(*messages), o200k_tokenizer, options())
    assert (error.value.field, error.value.reason) == (field, reason)
    assert error.value.fix


def test_no_assistant_turn_is_a_data_error(o200k_tokenizer: Any) -> None:
    with pytest.raises(DataError) as error:
        render_training_samples(conv(Message("system", "S"), user("Q")), o200k_tokenizer, options())
    assert error.value.reason == "no_assistant"


def test_tool_without_name_is_a_data_error(o200k_tokenizer: Any) -> None:
    with pytest.raises(DataError) as error:
        render_prompt([user("Q")], o200k_tokenizer, options(), tools=[{"type": "function", "function": {}}])
    assert (error.value.field, error.value.reason) == ("tools[0]", "invalid_tools")


def test_unknown_reasoning_effort_is_refused(o200k_tokenizer: Any) -> None:
    with pytest.raises(OsstuneError, match="reasoning effort 'extreme'"):
        render_prompt([user("Q")], o200k_tokenizer, RenderOptions(reasoning_effort="extreme"))


def test_non_harmony_tokenizer_is_refused(o200k_tokenizer: Any) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))
    with pytest.raises(OsstuneError, match="no harmony special tokens"):
        render_prompt([user("Q")], plain, options())


def random_conversation(rng: random.Random) -> Conversation:
    """A random multi-turn conversation with tool calls, reasoning of every kind and trailing messages."""
    words = ["alpha", "beta", "猫", "<|end|>", "x\ny", "  ", "42"]

    def say() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(0, 4)))

    def reasoning() -> str | None:
        return rng.choice([None, "", " ", say() or "r"])

    messages: list[Message] = []
    if rng.random() < 0.5:
        messages.append(Message(rng.choice(["system", "developer"]), say()))
    for _ in range(rng.randint(1, 4)):
        messages.append(user(say()))
        for _ in range(rng.choice([0, 0, 1, 2])):
            messages.append(call(thinking=reasoning()))
            messages.append(Message("tool", say()))
        if rng.random() < 0.85:
            messages.append(assistant(say(), reasoning()))
    return conv(*messages, tools=(WEATHER_TOOL,) if rng.random() < 0.5 else ())


@pytest.mark.parametrize("loss_scale", ["default", "ignore_empty_think"])
def test_every_assistant_turn_is_trained_once_on_its_inference_context(o200k_tokenizer: Any, loss_scale: str) -> None:
    """The core principle, checked on random conversations: each trained span starts right after the generation
    prompt of its turn, its context is exactly ``render_prompt`` of the messages before the turn, and every
    assistant turn is trained exactly once."""
    rng = random.Random(1234)
    opts = options(loss_scale)
    checked = 0
    for _ in range(60):
        conversation = random_conversation(rng)
        messages = conversation.messages
        turns = [i for i, m in enumerate(messages) if m.role == "assistant"]
        if not turns:
            continue
        samples = render_training_samples(conversation, o200k_tokenizer, opts)
        starts = []
        for sample in samples:
            labels = sample.labels
            starts.extend(
                (sample, p) for p in range(len(labels)) if labels[p] != IGNORE_INDEX and labels[p - 1] == IGNORE_INDEX
            )
        assert len(starts) == len(turns)
        for (sample, position), turn in zip(starts, turns):
            prompt = render_prompt(messages[:turn], o200k_tokenizer, opts, tools=conversation.tools)
            assert sample.input_ids[:position] == prompt
            checked += 1
    assert checked > 100


def small_harmony_tokenizer() -> Any:
    """A byte-level BPE trained on a few lines, with the harmony token strings at ids unlike o200k's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|message|>", "<|start|>", "<|end|>", "<|channel|>", "<|return|>", "<|call|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[*specials, "<|constrain|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["user assistant system developer analysis final commentary json functions", "Hello 你好 weather"]
    backend.train_from_iterator(corpus * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|return|>", pad_token="<|endoftext|>")


def test_renders_the_same_text_with_a_small_harmony_vocabulary(o200k_tokenizer: Any) -> None:
    small = small_harmony_tokenizer()
    assert small.convert_tokens_to_ids("<|start|>") == 2
    conversation = conv(
        Message("system", "Rules."),
        user("Hello <|end|> 你好"),
        call(thinking="Check."),
        Message("tool", "sunny"),
        assistant("C1", "T1"),
        tools=(WEATHER_TOOL,),
    )
    ours = render_training_samples(conversation, small, options())
    reference = render_training_samples(conversation, o200k_tokenizer, options())
    assert [text(small, s) for s in ours] == [text(o200k_tokenizer, s) for s in reference]
    assert [spans(small, s) for s in ours] == [spans(o200k_tokenizer, s) for s in reference]
    (sample,) = ours
    # system, developer, user, call analysis, tool result, trained analysis; the typed "<|end|>" stays text.
    assert sample.input_ids.count(small.convert_tokens_to_ids("<|end|>")) == 6
