"""Our harmony renderer against the real gpt-oss chat template, rendered by transformers' own jinja environment.

The template below is ``chat_template.jinja`` of the openai/gpt-oss-20b model repository (Apache-2.0, as
distributed on the Hugging Face Hub and mirrored in TRL's ``chat_template_utils.py``), kept verbatim as test data.
It is the authority where openai-harmony differs. Two things are compared:

- ``render_prompt(messages)`` equals the template with ``add_generation_prompt=True``;
- the sample that trains the last turn equals the template with ``add_generation_prompt=False``, except in one
  documented case: the template drops the analysis of a tool call as soon as a final answer follows, even when that
  final answer is the very turn being trained. At inference the model wrote that answer after seeing the analysis,
  so our sample keeps it (its context is the template's own generation-prompt rendering).
"""

from __future__ import annotations

import datetime as dt
import json
import random
from typing import Any

import pytest

from osstune.chat.harmony import render_prompt, render_training_samples
from osstune.chat.messages import Conversation, Message, ToolCall
from osstune.chat.options import RenderOptions

DATE = "2025-08-05"

GPT_OSS_CHAT_TEMPLATE = r"""{#-
  In addition to the normal inputs of `messages` and `tools`, this template also accepts the
  following kwargs:
  - "builtin_tools": A list, can contain "browser" and/or "python".
  - "model_identity": A string that optionally describes the model identity.
  - "reasoning_effort": A string that describes the reasoning effort, defaults to "medium".
 #}

{#- Tool Definition Rendering ============================================== #}
{%- macro render_typescript_type(param_spec, required_params, is_nullable=false) -%}
    {%- if param_spec.type == "array" -%}
        {%- if param_spec['items'] -%}
            {%- if param_spec['items']['type'] == "string" -%}
                {{- "string[]" }}
            {%- elif param_spec['items']['type'] == "number" -%}
                {{- "number[]" }}
            {%- elif param_spec['items']['type'] == "integer" -%}
                {{- "number[]" }}
            {%- elif param_spec['items']['type'] == "boolean" -%}
                {{- "boolean[]" }}
            {%- else -%}
                {%- set inner_type = render_typescript_type(param_spec['items'], required_params) -%}
                {%- if inner_type == "object | object" or inner_type|length > 50 -%}
                    {{- "any[]" }}
                {%- else -%}
                    {{- inner_type + "[]" }}
                {%- endif -%}
            {%- endif -%}
            {%- if param_spec.nullable -%}
                {{- " | null" }}
            {%- endif -%}
        {%- else -%}
            {{- "any[]" }}
            {%- if param_spec.nullable -%}
                {{- " | null" }}
            {%- endif -%}
        {%- endif -%}
    {%- elif param_spec.type is defined and param_spec.type is iterable and param_spec.type is not string and param_spec.type is not mapping and param_spec.type[0] is defined -%}
        {#- Handle array of types like ["object", "object"] from Union[dict, list] #}
        {%- if param_spec.type | length > 1 -%}
            {{- param_spec.type | join(" | ") }}
        {%- else -%}
            {{- param_spec.type[0] }}
        {%- endif -%}
    {%- elif param_spec.oneOf -%}
        {#- Handle oneOf schemas - check for complex unions and fallback to any #}
        {%- set has_object_variants = false -%}
        {%- for variant in param_spec.oneOf -%}
            {%- if variant.type == "object" -%}
                {%- set has_object_variants = true -%}
            {%- endif -%}
        {%- endfor -%}
        {%- if has_object_variants and param_spec.oneOf|length > 1 -%}
            {{- "any" }}
        {%- else -%}
            {%- for variant in param_spec.oneOf -%}
                {{- render_typescript_type(variant, required_params) -}}
                {%- if variant.description %}
                    {{- "// " + variant.description }}
                {%- endif -%}
                {%- if variant.default is defined %}
                    {{ "// default: " + variant.default|tojson }}
                {%- endif -%}
                {%- if not loop.last %}
                    {{- " | " }}
                {% endif -%}
            {%- endfor -%}
        {%- endif -%}
    {%- elif param_spec.type == "string" -%}
        {%- if param_spec.enum -%}
            {{- '"' + param_spec.enum|join('" | "') + '"' -}}
        {%- else -%}
            {{- "string" }}
            {%- if param_spec.nullable %}
                {{- " | null" }}
            {%- endif -%}
        {%- endif -%}
    {%- elif param_spec.type == "number" -%}
        {{- "number" }}
    {%- elif param_spec.type == "integer" -%}
        {{- "number" }}
    {%- elif param_spec.type == "boolean" -%}
        {{- "boolean" }}

    {%- elif param_spec.type == "object" -%}
        {%- if param_spec.properties -%}
            {{- "{\n" }}
            {%- for prop_name, prop_spec in param_spec.properties.items() -%}
                {{- prop_name -}}
                {%- if prop_name not in (param_spec.required or []) -%}
                    {{- "?" }}
                {%- endif -%}
                {{- ": " }}
                {{ render_typescript_type(prop_spec, param_spec.required or []) }}
                {%- if not loop.last -%}
                    {{-", " }}
                {%- endif -%}
            {%- endfor -%}
            {{- "}" }}
        {%- else -%}
            {{- "object" }}
        {%- endif -%}
    {%- else -%}
        {{- "any" }}
    {%- endif -%}
{%- endmacro -%}

{%- macro render_tool_namespace(namespace_name, tools) -%}
    {{- "## " + namespace_name + "\n\n" }}
    {{- "namespace " + namespace_name + " {\n\n" }}
    {%- for tool in tools %}
        {%- set tool = tool.function %}
        {{- "// " + tool.description + "\n" }}
        {{- "type "+ tool.name + " = " }}
        {%- if tool.parameters and tool.parameters.properties %}
            {{- "(_: {\n" }}
            {%- for param_name, param_spec in tool.parameters.properties.items() %}
                {%- if param_spec.description %}
                    {{- "// " + param_spec.description + "\n" }}
                {%- endif %}
                {{- param_name }}
                {%- if param_name not in (tool.parameters.required or []) -%}
                    {{- "?" }}
                {%- endif -%}
                {{- ": " }}
                {{- render_typescript_type(param_spec, tool.parameters.required or []) }}
                {%- if param_spec.default is defined -%}
                    {%- if param_spec.enum %}
                        {{- ", // default: " + param_spec.default }}
                    {%- elif param_spec.oneOf %}
                        {{- "// default: " + param_spec.default }}
                    {%- else %}
                        {{- ", // default: " + param_spec.default|tojson }}
                    {%- endif -%}
                {%- endif -%}
                {%- if not loop.last %}
                    {{- ",\n" }}
                {%- else %}
                    {{- ",\n" }}
                {%- endif -%}
            {%- endfor %}
            {{- "}) => any;\n\n" }}
        {%- else -%}
            {{- "() => any;\n\n" }}
        {%- endif -%}
    {%- endfor %}
    {{- "} // namespace " + namespace_name }}
{%- endmacro -%}

{%- macro render_builtin_tools(browser_tool, python_tool) -%}
    {%- if browser_tool %}
        {{- "## browser\n\n" }}
        {{- "// Tool for browsing.\n" }}
        {{- "// The `cursor` appears in brackets before each browsing display: `[{cursor}]`.\n" }}
        {{- "// Cite information from the tool using the following format:\n" }}
        {{- "// `【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.\n" }}
        {{- "// Do not quote more than 10 words directly from the tool output.\n" }}
        {{- "// sources=web (default: web)\n" }}
        {{- "namespace browser {\n\n" }}
        {{- "// Searches for information related to `query` and displays `topn` results.\n" }}
        {{- "type search = (_: {\n" }}
        {{- "query: string,\n" }}
        {{- "topn?: number, // default: 10\n" }}
        {{- "source?: string,\n" }}
        {{- "}) => any;\n\n" }}
        {{- "// Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, showing `num_lines` lines.\n" }}
        {{- "// Valid link ids are displayed with the formatting: `【{id}†.*】`.\n" }}
        {{- "// If `cursor` is not provided, the most recent page is implied.\n" }}
        {{- "// If `id` is a string, it is treated as a fully qualified URL associated with `source`.\n" }}
        {{- "// If `loc` is not provided, the viewport will be positioned at the beginning of the document or centered on the most relevant passage, if available.\n" }}
        {{- "// Use this function without `id` to scroll to a new location of an opened page.\n" }}
        {{- "type open = (_: {\n" }}
        {{- "id?: number | string, // default: -1\n" }}
        {{- "cursor?: number, // default: -1\n" }}
        {{- "loc?: number, // default: -1\n" }}
        {{- "num_lines?: number, // default: -1\n" }}
        {{- "view_source?: boolean, // default: false\n" }}
        {{- "source?: string,\n" }}
        {{- "}) => any;\n\n" }}
        {{- "// Finds exact matches of `pattern` in the current page, or the page given by `cursor`.\n" }}
        {{- "type find = (_: {\n" }}
        {{- "pattern: string,\n" }}
        {{- "cursor?: number, // default: -1\n" }}
        {{- "}) => any;\n\n" }}
        {{- "} // namespace browser\n\n" }}
    {%- endif -%}

    {%- if python_tool %}
        {{- "## python\n\n" }}
        {{- "Use this tool to execute Python code in your chain of thought. The code will not be shown to the user. This tool should be used for internal reasoning, but not for code that is intended to be visible to the user (e.g. when creating plots, tables, or files).\n\n" }}
        {{- "When you send a message containing Python code to python, it will be executed in a stateful Jupyter notebook environment. python will respond with the output of the execution or time out after 120.0 seconds. The drive at '/mnt/data' can be used to save and persist user files. Internet access for this session is UNKNOWN. Depends on the cluster.\n\n" }}
    {%- endif -%}
{%- endmacro -%}

{#- System Message Construction ============================================ #}
{%- macro build_system_message() -%}
    {%- if model_identity is not defined %}
        {%- set model_identity = "You are ChatGPT, a large language model trained by OpenAI." %}
    {%- endif %}
    {{- model_identity + "\n" }}
    {{- "Knowledge cutoff: 2024-06\n" }}
    {{- "Current date: " + strftime_now("%Y-%m-%d") + "\n\n" }}
    {%- if reasoning_effort is not defined %}
        {%- set reasoning_effort = "medium" %}
    {%- endif %}
    {{- "Reasoning: " + reasoning_effort + "\n\n" }}
    {%- if builtin_tools %}
        {{- "# Tools\n\n" }}
        {%- set available_builtin_tools = namespace(browser=false, python=false) %}
        {%- for tool in builtin_tools %}
            {%- if tool == "browser" %}
                {%- set available_builtin_tools.browser = true %}
            {%- elif tool == "python" %}
                {%- set available_builtin_tools.python = true %}
            {%- endif %}
        {%- endfor %}
        {{- render_builtin_tools(available_builtin_tools.browser, available_builtin_tools.python) }}
    {%- endif -%}
    {{- "# Valid channels: analysis, commentary, final. Channel must be included for every message." }}
    {%- if tools -%}
        {{- "\nCalls to these tools must go to the commentary channel: 'functions'." }}
    {%- endif -%}
{%- endmacro -%}

{#- Main Template Logic ================================================= #}
{#- Set defaults #}

{#- Render system message #}
{{- "<|start|>system<|message|>" }}
{{- build_system_message() }}
{{- "<|end|>" }}

{#- Extract developer message #}
{%- if messages[0].role == "developer" or messages[0].role == "system" %}
    {%- set developer_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set developer_message = "" %}
    {%- set loop_messages = messages %}
{%- endif %}

{#- Render developer message #}
{%- if developer_message or tools %}
    {{- "<|start|>developer<|message|>" }}
    {%- if developer_message %}
        {{- "# Instructions\n\n" }}
        {{- developer_message }}
        {{- "\n\n" }}
    {%- endif %}
    {%- if tools -%}
        {{- "# Tools\n\n" }}
        {{- render_tool_namespace("functions", tools) }}
    {%- endif -%}
    {{- "<|end|>" }}
{%- endif %}

{#- Render messages #}
{%- set last_tool_call = namespace(name=none) %}
{%- for message in loop_messages -%}
    {#- At this point only assistant/user/tool messages should remain #}
    {%- if message.role == 'assistant' -%}
        {#- Checks to ensure the messages are being passed in the format we expect #}
        {%- if "content" in message %}
            {%- if "<|channel|>analysis<|message|>" in message.content or "<|channel|>final<|message|>" in message.content %}
                {{- raise_exception("You have passed a message containing <|channel|> tags in the content field. Instead of doing this, you should pass analysis messages (the string between '<|message|>' and '<|end|>') in the 'thinking' field, and final messages (the string between '<|message|>' and '<|end|>') in the 'content' field.") }}
            {%- endif %}
        {%- endif %}
        {%- if "thinking" in message %}
            {%- if "<|channel|>analysis<|message|>" in message.thinking or "<|channel|>final<|message|>" in message.thinking %}
                {{- raise_exception("You have passed a message containing <|channel|> tags in the thinking field. Instead of doing this, you should pass analysis messages (the string between '<|message|>' and '<|end|>') in the 'thinking' field, and final messages (the string between '<|message|>' and '<|end|>') in the 'content' field.") }}
            {%- endif %}
        {%- endif %}
        {%- if "tool_calls" in message %}
            {#- We need very careful handling here - we want to drop the tool call analysis message if the model #}
            {#- has output a later <|final|> message, but otherwise we want to retain it. This is the only case #}
            {#- when we render CoT/analysis messages in inference. #}
            {%- set future_final_message = namespace(found=false) %}
            {%- for future_message in loop_messages[loop.index:] %}
                {%- if future_message.role == 'assistant' and "tool_calls" not in future_message %}
                    {%- set future_final_message.found = true %}
                {%- endif %}
            {%- endfor %}
            {#- We assume max 1 tool call per message, and so we infer the tool call name #}
            {#- in "tool" messages from the most recent assistant tool call name #}
            {%- set tool_call = message.tool_calls[0] %}
            {%- if tool_call.function %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {%- if message.content and message.thinking %}
                {{- raise_exception("Cannot pass both content and thinking in an assistant message with tool calls! Put the analysis message in one or the other, but not both.") }}
            {%- elif message.content and not future_final_message.found %}
                {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.content + "<|end|>" }}
            {%- elif message.thinking and not future_final_message.found %}
                {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" }}
            {%- endif %}
            {{- "<|start|>assistant to=" }}
            {{- "functions." + tool_call.name + "<|channel|>commentary " }}
            {{- (tool_call.content_type if tool_call.content_type is defined else "json") + "<|message|>" }}
            {{- tool_call.arguments|tojson }}
            {{- "<|call|>" }}
            {%- set last_tool_call.name = tool_call.name %}
        {%- elif loop.last and not add_generation_prompt %}
            {#- Only render the CoT if the final turn is an assistant turn and add_generation_prompt is false #}
            {#- This is a situation that should only occur in training, never in inference. #}
            {%- if "thinking" in message %}
                {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" }}
            {%- endif %}
            {#- <|return|> indicates the end of generation, but <|end|> does not #}
            {#- <|return|> should never be an input to the model, but we include it as the final token #}
            {#- when training, so the model learns to emit it. #}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|return|>" }}
        {%- else %}
            {#- CoT is dropped during all previous turns, so we never render it for inference #}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" }}
            {%- set last_tool_call.name = none %}
        {%- endif %}
    {%- elif message.role == 'tool' -%}
        {%- if last_tool_call.name is none %}
            {{- raise_exception("Message has tool role, but there was no previous assistant message with a tool call!") }}
        {%- endif %}
        {{- "<|start|>functions." + last_tool_call.name }}
        {{- " to=assistant<|channel|>commentary<|message|>" + message.content|tojson + "<|end|>" }}
    {%- elif message.role == 'user' -%}
        {{- "<|start|>user<|message|>" + message.content + "<|end|>" }}
    {%- endif -%}
{%- endfor -%}

{#- Generation prompt #}
{%- if add_generation_prompt -%}
<|start|>assistant
{%- endif -%}"""


class _FixedClock(dt.datetime):
    """``datetime`` whose ``now()`` is the test date (the template reads the date through ``strftime_now``)."""

    @classmethod
    def now(cls, tz: Any = None) -> _FixedClock:
        return cls(2025, 8, 5)


@pytest.fixture
def template(monkeypatch: pytest.MonkeyPatch, o200k_tokenizer: Any) -> Any:
    """Render messages with the real gpt-oss template through transformers' ``apply_chat_template``."""
    monkeypatch.setattr("transformers.utils.chat_template_utils.datetime", _FixedClock)

    def render(
        messages: list[dict[str, Any]], tools: list[dict[str, Any]], generation: bool, **kwargs: Any
    ) -> list[int]:
        return o200k_tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            chat_template=GPT_OSS_CHAT_TEMPLATE,
            add_generation_prompt=generation,
            tokenize=True,
            return_dict=False,
            **kwargs,
        )

    return render


def template_messages(messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    """Our messages in the shape the gpt-oss template reads (``thinking``, OpenAI tool calls with object args)."""
    out = []
    for message in messages:
        entry: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.thinking is not None:
            entry["thinking"] = message.thinking
        if message.tool_calls:
            call = message.tool_calls[0]
            entry["tool_calls"] = [
                {"type": "function", "function": {"name": call.name, "arguments": json.loads(call.arguments)}}
            ]
        out.append(entry)
    return out


TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Gets the weather.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
# No literal control-token text here: transformers cannot encode it as one ordinary string (it either makes it a
# special token or, with sanitize_control_tokens, encodes the pieces around it separately). That case is checked
# against openai-harmony, which encodes message text as ordinary text, as we do.
TEXTS = ["Hello", "你好，咪咪！", "line\nbreak", "x", " spaced  out ", "数学 2+2=4", "I'm fine; 3.14"]


def random_conversation(rng: random.Random, call_reasoning: bool) -> Conversation:
    """A multi-turn conversation; tool calls carry reasoning only when ``call_reasoning``."""
    say = lambda: " ".join(rng.sample(TEXTS, rng.randint(1, 2)))  # noqa: E731
    messages: list[Message] = []
    if rng.random() < 0.5:
        messages.append(Message(rng.choice(["system", "developer"]), say()))
    tools = (TOOL,) if rng.random() < 0.5 else ()
    for _ in range(rng.randint(1, 3)):
        messages.append(Message("user", say()))
        for _ in range(rng.choice([0, 1, 2]) if tools else 0):
            arguments = {"city": rng.choice(["Paris", "上海"]), "days": rng.randint(1, 5)}
            call = ToolCall("get_weather", json.dumps(arguments, ensure_ascii=False))
            thinking = say() if call_reasoning and rng.random() < 0.7 else None
            messages.append(Message("assistant", "", thinking=thinking, tool_calls=(call,)))
            messages.append(Message("tool", say()))
        messages.append(Message("assistant", say(), thinking=rng.choice([None, "", say()])))
    return Conversation(messages=tuple(messages), tools=tools)


def test_prompt_equals_template_generation_prompt(template: Any, o200k_tokenizer: Any) -> None:
    rng = random.Random(11)
    compared = 0
    for _ in range(60):
        conv = random_conversation(rng, call_reasoning=True)
        effort = rng.choice(["low", "medium", "high"])
        options = RenderOptions(current_date=DATE, reasoning_effort=effort)
        for cut in range(1, len(conv.messages) + 1):
            messages = conv.messages[:cut]
            if messages[-1].role in ("system", "developer"):
                continue
            expected = template(template_messages(messages), list(conv.tools), True, reasoning_effort=effort)
            assert render_prompt(messages, o200k_tokenizer, options, tools=conv.tools) == expected
            compared += 1
    assert compared > 300


def test_last_turn_sample_equals_template_training_rendering(template: Any, o200k_tokenizer: Any) -> None:
    rng = random.Random(12)
    options = RenderOptions(current_date=DATE, loss_scale="last_round")
    compared = 0
    for _ in range(60):
        conv = random_conversation(rng, call_reasoning=False)
        for end, message in enumerate(conv.messages):
            if message.role != "assistant":
                continue
            messages = conv.messages[: end + 1]
            prefix = Conversation(messages=messages, tools=conv.tools)
            (sample,) = render_training_samples(prefix, o200k_tokenizer, options)
            assert sample.input_ids == template(template_messages(messages), list(conv.tools), False)
            compared += 1
    assert compared > 150


def test_model_identity_matches_template(template: Any, o200k_tokenizer: Any) -> None:
    options = RenderOptions(current_date=DATE, model_identity="You are Mimi, a cat-girl assistant.")
    messages = (Message("user", "Hi"),)
    expected = template(template_messages(messages), [], True, model_identity=options.model_identity)
    assert render_prompt(messages, o200k_tokenizer, options) == expected


def test_difference_trained_answer_keeps_the_analysis_of_the_call_before_it(
    template: Any, o200k_tokenizer: Any
) -> None:
    call = ToolCall("get_weather", '{"city": "Paris"}')
    messages = (
        Message("user", "Weather?"),
        Message("assistant", "", thinking="Look it up.", tool_calls=(call,)),
        Message("tool", "sunny"),
        Message("assistant", "Sunny.", thinking="Tool says sunny."),
    )
    options = RenderOptions(current_date=DATE, loss_scale="last_round")
    (sample,) = render_training_samples(Conversation(messages=messages, tools=(TOOL,)), o200k_tokenizer, options)
    template_training = template(template_messages(messages), [TOOL], False)
    assert o200k_tokenizer.decode(sample.input_ids).count("Look it up.") == 1
    assert "Look it up." not in o200k_tokenizer.decode(template_training)
    # What the model saw when it wrote the answer: the template's own generation prompt for the history.
    prompt = template(template_messages(messages[:3]), [TOOL], True)
    assert "Look it up." in o200k_tokenizer.decode(prompt)
    assert sample.input_ids[: len(prompt)] == prompt
    assert sample.input_ids[len(prompt) :] == template_training[-(len(sample.input_ids) - len(prompt)) :]


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A JSON-schema node exercising every branch of the template's TypeScript rendering."""
    kinds = ["string", "number", "integer", "boolean", "enum", "array", "type_list", "nullable", "oneOf", "none"]
    if depth < 2:
        kinds += ["object", "object", "array_of_objects"]
    kind = rng.choice(kinds)
    node: dict[str, Any]
    if kind in ("string", "number", "integer", "boolean"):
        node = {"type": kind}
    elif kind == "enum":
        node = {"type": "string", "enum": rng.sample(["a", "b", "c", "长"], rng.randint(1, 3))}
    elif kind == "array":
        node = {"type": "array"}
        if rng.random() < 0.8:
            node["items"] = {"type": rng.choice(["string", "number", "integer", "boolean", "null"])}
    elif kind == "array_of_objects":
        node = {"type": "array", "items": random_schema(rng, depth + 1)}
    elif kind == "type_list":
        node = {"type": rng.sample(["string", "number", "null", "object"], rng.randint(1, 3))}
    elif kind == "nullable":
        node = {"type": rng.choice(["string", "array"]), "nullable": True}
    elif kind == "oneOf":
        node = {"oneOf": [random_schema(rng, 2) for _ in range(rng.randint(1, 3))]}
        for variant in node["oneOf"]:
            if rng.random() < 0.3:
                variant["description"] = "variant"
            if rng.random() < 0.3:
                variant["default"] = rng.choice([1, "x", None, True])
    elif kind == "object":
        properties = {f"p{i}": random_schema(rng, depth + 1) for i in range(rng.randint(0, 3))}
        node = {"type": "object", "properties": properties}
        if properties and rng.random() < 0.6:
            node["required"] = rng.sample(sorted(properties), rng.randint(1, len(properties)))
    else:
        node = {}
    if rng.random() < 0.3:
        node["description"] = rng.choice(["Some value", "值"])
    return node


def random_tool(rng: random.Random, index: int) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for i in range(rng.randint(0, 4)):
        spec = random_schema(rng)
        if rng.random() < 0.3:
            if spec.get("enum") or spec.get("oneOf"):
                spec["default"] = rng.choice(["a", "x"])  # the template concatenates these defaults as strings
            else:
                spec["default"] = rng.choice([3, "s", None, [1, 2], {"k": "v"}, 2.5, False])
        properties[f"arg_{i}"] = spec
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if properties and rng.random() < 0.7:
        parameters["required"] = rng.sample(sorted(properties), rng.randint(1, len(properties)))
    function: dict[str, Any] = {"name": f"tool_{index}", "description": rng.choice(["Does a thing.", "", "工具"])}
    if rng.random() < 0.9:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def test_tool_namespace_equals_template_rendering(template: Any, o200k_tokenizer: Any) -> None:
    rng = random.Random(13)
    options = RenderOptions(current_date=DATE)
    messages = (Message("developer", "Use tools."), Message("user", "Go"))
    rendered = []
    for _ in range(150):
        tools = [random_tool(rng, i) for i in range(rng.randint(1, 3))]
        expected = template(template_messages(messages), tools, True)
        assert render_prompt(messages, o200k_tokenizer, options, tools=tools) == expected, json.dumps(tools)
        rendered.append(o200k_tokenizer.decode(expected))
    # The template's whitespace quirks were exercised: nested object indentation, oneOf joins and oneOf defaults.
    assert any(": \n                " in text for text in rendered)
    assert any(" | \n" in text for text in rendered)
    assert any("                    // default: " in text for text in rendered)
    assert any("() => any;" in text for text in rendered)
    assert any("any[]" in text for text in rendered)
