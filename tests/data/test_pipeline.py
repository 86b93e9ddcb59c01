"""prepare_dataset: order, length handling, strictness, caching, splitting and parallel rendering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from osstune.chat.messages import Conversation, Message
from osstune.chat.options import IGNORE_INDEX, RenderOptions
from osstune.chat.render import render_training_samples
from osstune.config import DataArgs
from osstune.data.pipeline import prepare_dataset
from osstune.errors import DataError, OsstuneError

OPTIONS = RenderOptions(current_date="2026-01-01")


def conv(i: int, think: bool = True) -> dict[str, Any]:
    a = {"role": "assistant", "content": f"Answer number {i}."}
    if think:
        a["thinking"] = f"The user asks question {i}; reply briefly."
    return {"messages": [{"role": "user", "content": f"Question number {i}?"}, a]}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def prepare(tokenizer: Any, **kw: Any):
    kw.setdefault("load_from_cache_file", True)
    return prepare_dataset(DataArgs(**kw), OPTIONS, tokenizer, show_progress=False)


def test_samples_in_dataset_order_and_equal_to_renderer(tmp_path: Path, o200k_tokenizer: Any) -> None:
    rows = [conv(i) for i in range(5)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    out = prepare(o200k_tokenizer, dataset=[str(path)])
    assert out.val is None
    assert out.train.indices == [0, 1, 2, 3, 4]
    assert out.train.sources == [str(path)] * 5
    for i in range(5):
        expected = render_training_samples(
            Conversation((Message("user", f"Question number {i}?"),
                          Message("assistant", f"Answer number {i}.", thinking=f"The user asks question {i}; reply briefly.")),),
            o200k_tokenizer, OPTIONS)
        assert len(expected) == 1
        assert out.train.input_ids[i].tolist() == expected[0].input_ids
        assert out.train.labels[i].tolist() == expected[0].labels
    rep = out.report
    assert rep.sources[0].rows == 5 and rep.sources[0].samples == 5 and rep.sources[0].format == "messages"
    assert rep.total_tokens == sum(len(x) for x in out.train.input_ids)
    assert rep.trained_tokens == sum(int((x != IGNORE_INDEX).sum()) for x in out.train.labels)
    assert 0 < rep.trained_tokens < rep.total_tokens


def test_length_handling(tmp_path: Path, o200k_tokenizer: Any) -> None:
    long = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [conv(0), long, conv(1)])
    full = prepare(o200k_tokenizer, dataset=[str(path)])
    lengths = [len(x) for x in full.train.input_ids]
    limit = max(lengths[0], lengths[2])
    assert lengths[1] > limit

    deleted = prepare(o200k_tokenizer, dataset=[str(path)], max_length=limit)
    assert deleted.train.indices == [0, 2]
    assert deleted.report.dropped == {f"longer than max_length={limit}": 1}

    left = prepare(o200k_tokenizer, dataset=[str(path)], max_length=limit, truncation_strategy="left")
    assert left.train.indices == [0, 1, 2]
    assert left.report.truncated == 1
    assert left.train.input_ids[1].tolist() == full.train.input_ids[1][-limit:].tolist()
    assert left.train.labels[1].tolist() == full.train.labels[1][-limit:].tolist()

    # right truncation keeps the long prompt and cuts every trained token: the sample is dropped, and counted
    right = prepare(o200k_tokenizer, dataset=[str(path)], max_length=limit, truncation_strategy="right")
    assert right.train.indices == [0, 2]
    assert right.report.dropped == {f"no trained tokens left after right truncation to {limit}": 1}


def test_strict_stops_at_first_bad_record(tmp_path: Path, o200k_tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [conv(0), {"messages": [{"role": "user", "content": "hi"},
                                                                    {"role": "robot", "content": "x"}]}])
    with pytest.raises(DataError) as exc:
        prepare(o200k_tokenizer, dataset=[str(path)])
    msg = str(exc.value)
    assert str(path) in msg and "line 2" in msg and "messages[1].role" in msg and "fix:" in msg


def test_non_strict_counts_every_skip_by_reason(tmp_path: Path, o200k_tokenizer: Any) -> None:
    rows = [conv(0),
            {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<|channel|>final"}]},
            "{not json",
            conv(5)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match="line 5"):  # malformed JSON is a file error, not a record to skip
        prepare(o200k_tokenizer, dataset=[str(path)], strict=False)
    path = write_jsonl(tmp_path / "d.jsonl", rows[:4] + rows[5:])
    out = prepare(o200k_tokenizer, dataset=[str(path)], strict=False)
    assert out.train.indices == [0, 4]
    assert out.report.sources[0].rows == 5
    assert out.report.sources[0].skipped == 3
    assert sum(out.report.skipped.values()) == 3
    assert len(out.report.skipped) == 3
    for reason, example in out.report.examples.items():
        assert str(path) in example and "line" in example


def test_cache_roundtrip_and_bypass(tmp_path: Path, o200k_tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [conv(i) for i in range(4)])
    first = prepare(o200k_tokenizer, dataset=[str(path)])
    second = prepare(o200k_tokenizer, dataset=[str(path)])
    assert not first.report.from_cache and second.report.from_cache
    for a, b in zip(first.train.input_ids + first.train.labels, second.train.input_ids + second.train.labels):
        np.testing.assert_array_equal(a, b)
    assert second.report.total_tokens == first.report.total_tokens
    assert second.train.sources == first.train.sources and second.train.indices == first.train.indices
    assert not prepare(o200k_tokenizer, dataset=[str(path)], load_from_cache_file=False).report.from_cache
    # any rendering option or the data itself changes the key
    assert not prepare_dataset(DataArgs(dataset=[str(path)]), RenderOptions(current_date="2026-01-02"),
                               o200k_tokenizer, show_progress=False).report.from_cache
    write_jsonl(path, [conv(i) for i in range(3)])
    changed = prepare(o200k_tokenizer, dataset=[str(path)])
    assert not changed.report.from_cache and len(changed.train) == 3


def test_split_ratio_is_seeded_and_disjoint(tmp_path: Path, o200k_tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [conv(i) for i in range(20)])
    a = prepare(o200k_tokenizer, dataset=[str(path)], split_dataset_ratio=0.1, seed=1)
    b = prepare(o200k_tokenizer, dataset=[str(path)], split_dataset_ratio=0.1, seed=1, load_from_cache_file=False)
    c = prepare(o200k_tokenizer, dataset=[str(path)], split_dataset_ratio=0.1, seed=2)
    assert a.val is not None and len(a.val) == 2 and len(a.train) == 18
    assert a.val.indices == b.val.indices != c.val.indices
    assert set(a.val.indices).isdisjoint(a.train.indices)
    assert a.train.indices == sorted(a.train.indices)


def test_val_dataset(tmp_path: Path, o200k_tokenizer: Any) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [conv(i) for i in range(3)])
    val = write_jsonl(tmp_path / "v.jsonl", [conv(i) for i in range(10, 12)])
    out = prepare(o200k_tokenizer, dataset=[str(train)], val_dataset=[str(val)])
    assert len(out.train) == 3 and out.val is not None and out.val.sources == [str(val)] * 2


def test_parallel_equals_serial(tmp_path: Path, o200k_tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [conv(i, think=i % 2 == 0) for i in range(300)])
    serial = prepare(o200k_tokenizer, dataset=[str(path)], load_from_cache_file=False)
    parallel = prepare(o200k_tokenizer, dataset=[str(path)], dataset_num_proc=2, load_from_cache_file=False)
    assert serial.train.indices == parallel.train.indices
    for a, b in zip(serial.train.input_ids + serial.train.labels, parallel.train.input_ids + parallel.train.labels):
        np.testing.assert_array_equal(a, b)


def test_mixed_formats_in_one_file(tmp_path: Path, o200k_tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [conv(0), {"instruction": "say hi", "output": "hi"}])
    with pytest.raises(DataError, match=r"line 2.*alpaca format but the file's first record is in messages"):
        prepare(o200k_tokenizer, dataset=[str(path)])


def test_self_cognition_sampling(o200k_tokenizer: Any) -> None:
    out = prepare(o200k_tokenizer, dataset=["self-cognition#30"], model_name=["小咪", "Mimi"],
                  model_author=["喵工坊", "Cat Works"])
    assert len(out.train) == 30
    text = "".join(o200k_tokenizer.decode(x.tolist()) for x in out.train.input_ids)
    assert "{{" not in text and ("Mimi" in text or "小咪" in text)


def test_empty_and_no_samples(tmp_path: Path, o200k_tokenizer: Any) -> None:
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises((DataError, OsstuneError), match="empty"):
        prepare(o200k_tokenizer, dataset=[str(empty)])
    path = write_jsonl(tmp_path / "d.jsonl", [conv(0)])
    with pytest.raises(OsstuneError, match="No training samples.*dropped"):
        prepare(o200k_tokenizer, dataset=[str(path)], max_length=5)
