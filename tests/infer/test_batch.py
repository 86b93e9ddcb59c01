"""Batch inference: reading records as prompt + reference, the result lines, resuming, determinism and errors."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from osstune.chat.messages import Message, ToolCall
from osstune.chat.render import render_prompt
from osstune.data.formats import detect_format, parse_record
from osstune.errors import DataError, OsstuneError
from osstune.infer import batch
from osstune.infer.batch import (
    RESULT_FIELDS,
    InferRequest,
    default_result_path,
    infer_dataset,
    read_finished,
    read_requests,
)
from osstune.infer.generate import generate_batch

DATE = "2026-01-01"
QUESTIONS = ["Hi", "What is 2 plus 2?", "Name a colour.", "Say something nice.", "Count to three."]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def without_latency(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "latency_s"} for r in rows]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Any:
    from osstune.infer.loading import load_for_inference

    return load_for_inference(model=str(tiny_model_dir), torch_dtype="float32", current_date=DATE)


@pytest.fixture
def val_file(tmp_path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"answer {i}"}]}
            for i, q in enumerate(QUESTIONS)]
    rows[1]["messages"].insert(0, {"role": "system", "content": "Be brief."})
    rows[3]["messages"].pop()  # no reference
    return write_jsonl(tmp_path / "val.jsonl", rows)


def run(tiny: Any, requests: list[InferRequest], path: Path, **kw: Any) -> Any:
    kw.setdefault("max_batch_size", 2)
    kw.setdefault("max_new_tokens", 6)
    return infer_dataset(tiny.model, tiny.tokenizer, tiny.options, requests, path, show_progress=False, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Reading records
# ---------------------------------------------------------------------------------------------------------------


def test_read_requests_splits_prompt_and_reference(tmp_path: Path) -> None:
    call = {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                      {"role": "assistant", "content": "<think>\nR1\n</think>\n\nA1"},
                      {"role": "user", "content": "Q2"},
                      {"role": "assistant", "content": "A2", "thinking": "R2"}]},
        {"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None,
                                                                "tool_calls": [call]},
                      {"role": "tool", "content": "sunny"}], "tools": tools},
        {"messages": [{"role": "user", "content": "Only a question"}]},
    ])
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "1 2", "output": "3", "history": [["hi", "hello"]]},
                                  {"instruction": "No answer yet"}]))
    sharegpt = write_jsonl(tmp_path / "share.jsonl", [
        {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"},
                           {"from": "human", "value": "z"}]},
    ])
    got = read_requests([str(messages), str(alpaca), str(sharegpt)])
    weather = ToolCall("get_weather", "{\"city\": \"Paris\"}")
    assert got == [
        InferRequest(0, (Message("system", "Be brief."), Message("user", "Q1"), Message("assistant", "A1", "R1"),
                         Message("user", "Q2")), reference="A2", source=str(messages), locator="line 1"),
        InferRequest(1, (Message("user", "Weather?"), Message("assistant", "", tool_calls=(weather,)),
                         Message("tool", "sunny")), tools=tuple(tools), source=str(messages), locator="line 2"),
        InferRequest(2, (Message("user", "Only a question"),), source=str(messages), locator="line 3"),
        InferRequest(3, (Message("user", "hi"), Message("assistant", "hello"), Message("user", "Add\n1 2")),
                     reference="3", source=str(alpaca), locator="record 0"),
        InferRequest(4, (Message("user", "No answer yet"),), source=str(alpaca), locator="record 1"),
        InferRequest(5, (Message("user", "x"),), reference="y", source=str(sharegpt), locator="line 1"),
        InferRequest(6, (Message("user", "x"), Message("assistant", "y"), Message("user", "z")),
                     source=str(sharegpt), locator="line 2"),
    ]
    assert got[0].where == f"{messages}, line 1"


def test_read_requests_sampling_is_repeatable(val_file: Path) -> None:
    first = read_requests([f"{val_file}#3"])
    assert [r.index for r in first] == [0, 1, 2]
    assert first == read_requests([f"{val_file}#3"])
    assert len({r.locator for r in first}) == 3


def test_bad_record_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "ok"}]},
                                               {"messages": [{"role": "robot", "content": "?"}]}])
    with pytest.raises(DataError) as err:
        read_requests([str(path)])
    assert str(err.value).startswith(f"{path}, line 2, field messages[0].role: unknown role 'robot'")


def test_message_dicts_read_back_as_the_same_messages() -> None:
    messages = (Message("system", "S"), Message("user", "Q"),
                Message("assistant", "", thinking="T", tool_calls=(ToolCall("f", "{\"a\": 1}"),)),
                Message("tool", "out", name="f"), Message("assistant", "A", thinking="R"))
    record = {"messages": [m.to_dict() for m in messages]}
    assert messages[2].to_dict() == {"role": "assistant", "content": "", "thinking": "T", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}
    assert parse_record(json.loads(json.dumps(record)), detect_format(record)).messages == messages


def test_default_result_path() -> None:
    now = dt.datetime(2026, 1, 2, 3, 4, 5)
    assert default_result_path(Path("run/checkpoint-4"), Path("base"), now) == \
        Path("run/checkpoint-4/infer_result/20260102-030405.jsonl")
    assert default_result_path(None, Path("merged"), now) == Path("merged/infer_result/20260102-030405.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# Generating
# ---------------------------------------------------------------------------------------------------------------


def test_result_lines_hold_the_exact_fields(tiny: Any, val_file: Path, tmp_path: Path) -> None:
    requests = read_requests([str(val_file)])
    out = tmp_path / "nested" / "out.jsonl"
    summary = run(tiny, requests, out)
    assert (summary.total, summary.resumed, summary.written) == (5, 0, 5)
    rows = lines(out)
    assert [list(r) for r in rows] == [list(RESULT_FIELDS)] * 5
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["reference"] for r in rows] == ["answer 0", "answer 1", "answer 2", None, "answer 4"]
    assert rows[1]["messages"] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": QUESTIONS[1]}]
    replies = generate_batch(tiny.model, tiny.tokenizer, [r.messages for r in requests], tiny.options,
                             max_new_tokens=6)
    for row, request, reply in zip(rows, requests, replies):
        assert row["prompt_tokens"] == len(render_prompt(request.messages, tiny.tokenizer, tiny.options))
        assert row["completion_tokens"] == len(reply.token_ids) == 6
        assert (row["response"], row["reasoning"], row["tool_calls"]) == (reply.final, reply.reasoning, [])
        assert isinstance(row["latency_s"], float) and row["latency_s"] >= 0
    assert rows[0]["latency_s"] == rows[1]["latency_s"]  # one batch, one latency


def test_greedy_results_are_identical_run_to_run(tiny: Any, val_file: Path, tmp_path: Path) -> None:
    requests = read_requests([str(val_file)])
    run(tiny, requests, tmp_path / "a.jsonl", max_batch_size=3)
    run(tiny, requests, tmp_path / "b.jsonl", max_batch_size=3)
    assert without_latency(lines(tmp_path / "a.jsonl")) == without_latency(lines(tmp_path / "b.jsonl"))


def test_interrupted_run_resumes_without_duplicates(tiny: Any, val_file: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    requests = read_requests([str(val_file)])
    full = tmp_path / "full.jsonl"
    run(tiny, requests, full)
    calls = []

    def killed_after_first_batch(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(args[2]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate_batch(*args, **kwargs)

    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(batch, "generate_batch", killed_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, requests, out)
    monkeypatch.undo()
    assert [r["index"] for r in lines(out)] == [0, 1]
    with out.open("a", encoding="utf-8") as f:
        f.write('{"index": 2, "messages": [{"ro')  # the process died while writing
    summary = run(tiny, requests, out)
    assert (summary.resumed, summary.written) == (2, 3)
    rows = lines(out)
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    assert without_latency(rows) == without_latency(lines(full))
    again = run(tiny, requests, out)
    assert (again.resumed, again.written) == (5, 0)
    assert len(lines(out)) == 5


def test_result_file_of_other_data_is_refused(tiny: Any, val_file: Path, tmp_path: Path) -> None:
    requests = read_requests([str(val_file)])
    out = tmp_path / "out.jsonl"
    run(tiny, requests[:2], out)
    other = [InferRequest(0, (Message("user", "something else"),)), *requests[1:]]
    with pytest.raises(OsstuneError, match=r"line 1 \(index 0\) does not match this --val_dataset"):
        read_finished(out, other)
    with pytest.raises(OsstuneError, match=r"line 2 \(index 1\) does not match"):
        read_finished(out, requests[:1])
    first = out.read_text(encoding="utf-8").splitlines()[0]
    out.write_text(f"{first}\nnot json\n{first}\n", encoding="utf-8")
    with pytest.raises(OsstuneError, match=r"line 2 is not a result line"):
        read_finished(out, requests)


def test_prompt_longer_than_the_context_names_the_record(tiny: Any, val_file: Path, tmp_path: Path) -> None:
    requests = read_requests([str(val_file)])
    lengths = [len(render_prompt(r.messages, tiny.tokenizer, tiny.options)) for r in requests]
    limit = sorted(lengths)[-1]  # the longest prompt does not fit (it must leave room to generate)
    longest = lengths.index(limit)
    out = tmp_path / "out.jsonl"
    with pytest.raises(OsstuneError) as err:
        run(tiny, requests, out, max_context=limit)
    assert str(err.value) == (f"{val_file}, line {longest + 1} (index {longest}): the prompt has {limit:,} tokens, "
                              f"but the model's context (max_position_embeddings) is {limit:,}. Shorten this record "
                              "or leave it out of --val_dataset.")
    assert not out.exists()


def test_unrenderable_record_is_named(tiny: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "val.jsonl", [
        {"messages": [{"role": "user", "content": "a"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"},
                      {"role": "user", "content": "b"}]},
    ])
    with pytest.raises(DataError) as err:
        run(tiny, read_requests([str(path)]), tmp_path / "out.jsonl")
    assert str(err.value).startswith(f"{path}, line 2, field messages[1].role: a system message appears at "
                                     "position 1")


def test_result_path_that_is_a_folder_is_refused(tiny: Any, val_file: Path, tmp_path: Path) -> None:
    with pytest.raises(OsstuneError, match="is a folder; give a file name"):
        run(tiny, read_requests([str(val_file)]), tmp_path)


def test_sampling_settings_reach_generation(tiny: Any, val_file: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append({k: kwargs[k] for k in ("max_new_tokens", "temperature", "top_p", "max_context")})
        return generate_batch(*args, **kwargs)

    monkeypatch.setattr(batch, "generate_batch", recording)
    run(tiny, read_requests([str(val_file)]), tmp_path / "out.jsonl", max_batch_size=4, max_new_tokens=3,
        temperature=0.7, top_p=0.9, max_context=4096)
    assert seen == [{"max_new_tokens": 3, "temperature": 0.7, "top_p": 0.9, "max_context": 4096}] * 2
    assert [r["completion_tokens"] <= 3 for r in lines(tmp_path / "out.jsonl")] == [True] * 5
