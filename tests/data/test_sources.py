from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from osstune.data.self_cognition import self_cognition_resource_bytes
from osstune.data.sources import (
    DatasetSpec,
    RawRecord,
    iter_records,
    load_records,
    parse_dataset_spec,
    sample_records,
    source_fingerprint,
)
from osstune.errors import DataError, OsstuneError

ROWS = [
    {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(5)
]
MT = "HuggingFaceH4/Multilingual-Thinking"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[Any]) -> Path:
    return write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def csv_cell(value: Any) -> str:
    return '"' + json.dumps(value).replace('"', '""') + '"'


def read(spec: str, **kwargs: Any) -> list[RawRecord]:
    return list(iter_records(parse_dataset_spec(spec), **kwargs))


def data_error(spec: str) -> DataError:
    with pytest.raises(DataError) as info:
        read(spec)
    return info.value


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: None) -> Path:
    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


@pytest.fixture
def online_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: None) -> Path:
    cache = tmp_path / "hf_datasets_cache"
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


# --- parse_dataset_spec --------------------------------------------------------------------------------------


def test_parse_local_file_folder_and_sample(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "train.jsonl", ROWS)
    assert parse_dataset_spec(str(path)) == DatasetSpec(str(path), "file", str(path))
    assert parse_dataset_spec(f"{path}#3") == DatasetSpec(f"{path}#3", "file", str(path), sample=3)
    assert parse_dataset_spec(f" {tmp_path} ") == DatasetSpec(str(tmp_path), "folder", str(tmp_path))


def test_parse_a_file_whose_name_has_a_hash(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "run#2.jsonl", ROWS)
    assert parse_dataset_spec(str(path)) == DatasetSpec(str(path), "file", str(path))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (MT, DatasetSpec(MT, "hub", MT)),
        ("org/name:zh#500", DatasetSpec("org/name:zh#500", "hub", "org/name", subset="zh", sample=500)),
        ("self-cognition", DatasetSpec("self-cognition", "self-cognition", "self-cognition")),
        ("self-cognition#100", DatasetSpec("self-cognition#100", "self-cognition", "self-cognition", sample=100)),
    ],
)
def test_parse_hub_and_builtin(
    spec: str, expected: DatasetSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_dataset_spec(spec) == expected


@pytest.mark.parametrize("suffix", ["#0", "#abc", "#-3", "#"])
def test_parse_bad_sample_count(suffix: str) -> None:
    with pytest.raises(OsstuneError, match="must be a positive number of records to sample"):
        parse_dataset_spec(f"self-cognition{suffix}")


def test_parse_missing_file_names_path_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        parse_dataset_spec("data/train.jsonl#10")
    err = info.value
    assert (err.source, err.reason) == ("data/train.jsonl", "not_found")
    assert err.problem == "no such file or folder"
    assert f"check the path; relative paths are resolved from the current directory ({tmp_path})" in err.fix


@pytest.mark.parametrize("spec", ["./data/train", "train", "/nonexistent/dir/"])
def test_parse_missing_path_that_is_not_a_hub_name(spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="no such file or folder") as info:
        parse_dataset_spec(spec)
    assert info.value.source == spec


def test_parse_unsupported_extension(tmp_path: Path) -> None:
    path = write(tmp_path / "train.txt", "hello")
    with pytest.raises(DataError) as info:
        parse_dataset_spec(str(path))
    assert (info.value.source, info.value.reason) == (str(path), "unsupported_extension")
    assert "'.txt'" in info.value.problem and ".jsonl" in info.value.fix


# --- local files ---------------------------------------------------------------------------------------------


def test_jsonl_records_carry_their_line(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", '{"a": 1}\n\n   \n{"a": 2}\n{"a": "ü"}')
    assert read(str(path)) == [
        RawRecord(str(path), "line 1", 0, {"a": 1}),
        RawRecord(str(path), "line 4", 1, {"a": 2}),
        RawRecord(str(path), "line 5", 2, {"a": "ü"}),
    ]


def test_jsonl_with_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n')
    assert read(str(path)) == [RawRecord(str(path), "line 1", 0, {"a": 1})]


def test_json_array_records_carry_their_index(tmp_path: Path) -> None:
    path = write(tmp_path / "t.json", json.dumps(ROWS[:3], indent=2))
    assert read(str(path)) == [RawRecord(str(path), f"record {i}", i, ROWS[i]) for i in range(3)]


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "t.json", ROWS[:2])
    assert read(str(path)) == [RawRecord(str(path), f"line {i + 1}", i, ROWS[i]) for i in range(2)]
    path.write_bytes(b"\xef\xbb\xbf\n  " + path.read_bytes())
    assert read(str(path)) == [RawRecord(str(path), f"line {i + 2}", i, ROWS[i]) for i in range(2)]


def test_csv_lines_json_columns_and_empty_cells(tmp_path: Path) -> None:
    path = write(
        tmp_path / "t.csv",
        "instruction,input,output,history\n"
        'Say hi,,Hi!,"[[""q0"", ""a0""]]"\n'
        '"Two\nlines",x,"a, b",\n'
        "\n"
        "Last,,done,\n",
    )
    assert read(str(path)) == [
        RawRecord(str(path), "line 2", 0, {"instruction": "Say hi", "output": "Hi!", "history": [["q0", "a0"]]}),
        RawRecord(str(path), "line 3", 1, {"instruction": "Two\nlines", "input": "x", "output": "a, b"}),
        RawRecord(str(path), "line 6", 2, {"instruction": "Last", "output": "done"}),
    ]


def test_csv_messages_and_tools_columns_are_decoded(tmp_path: Path) -> None:
    messages = ROWS[0]["messages"]
    tools = [{"type": "function", "function": {"name": "f"}}]
    path = write(tmp_path / "m.csv", f"messages,tools,note\n{csv_cell(messages)},{csv_cell(tools)},7\n")
    assert read(str(path)) == [RawRecord(str(path), "line 2", 0, {"messages": messages, "tools": tools, "note": "7"})]


def test_csv_long_cells_and_spaced_header(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "x" * 300_000}, {"role": "assistant", "content": "y"}]
    path = write(tmp_path / "long.csv", f"messages, note \n{csv_cell(messages)},z\n")
    assert read(str(path)) == [RawRecord(str(path), "line 2", 0, {"messages": messages, "note": "z"})]


def test_csv_bad_json_column_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.csv", 'instruction,output,history\nq,a,"[[""q0"", ]"\n')
    err = data_error(str(path))
    assert (err.source, err.record, err.field, err.reason) == (str(path), "line 2", "history", "malformed_json")
    assert "column 'history' must hold JSON text" in err.problem
    assert str(err).startswith(f"{path}, line 2, field history: ")
    assert '[["question", "answer"]]' in err.fix


def test_csv_row_with_too_many_fields(tmp_path: Path) -> None:
    path = write(tmp_path / "wide.csv", "instruction,output\nq,a\nq,a,extra\n")
    err = data_error(str(path))
    assert (err.record, err.reason) == ("line 3", "malformed_csv")
    assert "quote fields that contain commas" == err.fix


def test_parquet_records_carry_their_index(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert read(str(path)) == [RawRecord(str(path), f"record {i}", i, row) for i, row in enumerate(ROWS)]


def test_folder_mixing_jsonl_and_json_in_name_order(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    second = write(folder / "b.json", json.dumps([{"n": 2}, {"n": 3}]))
    first = jsonl(folder / "a.jsonl", [{"n": 1}])
    write(folder / "README.md", "not data")
    (folder / "nested").mkdir()
    jsonl(folder / "nested" / "c.jsonl", [{"n": 99}])
    assert read(str(folder)) == [
        RawRecord(str(first), "line 1", 0, {"n": 1}),
        RawRecord(str(second), "record 0", 0, {"n": 2}),
        RawRecord(str(second), "record 1", 1, {"n": 3}),
    ]


# --- local file errors ---------------------------------------------------------------------------------------


def test_malformed_jsonl_names_line_column_and_fix(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", '{"a": 1}\n{"a": 2,, "b": 3}\n')
    err = data_error(str(path))
    assert (err.source, err.record, err.reason) == (str(path), "line 2", "malformed_json")
    assert err.problem == "malformed JSON at column 9: Expecting property name enclosed in double quotes"
    assert "each line must be one complete JSON object" in err.fix


def test_malformed_json_names_line_column_and_fix(tmp_path: Path) -> None:
    path = write(tmp_path / "t.json", '[\n  {"a": 1},\n  {"a": 2\n]\n')
    err = data_error(str(path))
    assert (err.source, err.record, err.reason) == (str(path), "line 4", "malformed_json")
    assert err.problem == "malformed JSON at line 4, column 1: Expecting ',' delimiter"
    assert "one JSON array of objects" in err.fix


def test_pretty_printed_single_object_in_json_file(tmp_path: Path) -> None:
    path = write(tmp_path / "t.json", json.dumps(ROWS[0], indent=2))
    err = data_error(str(path))
    assert (err.record, err.reason) == ("line 1", "malformed_json")
    assert "a .json file may instead hold one JSON array of objects" in err.fix


@pytest.mark.parametrize(("text", "kind"), [('"hello"', "string"), ("42", "number"), ("null", "null")])
def test_json_file_that_is_not_an_array(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path / "t.json", text)
    err = data_error(str(path))
    assert (err.source, err.record, err.reason) == (str(path), None, "not_an_array")
    assert err.problem == f"the file holds a JSON {kind}, not an array of objects"


def test_non_object_record_in_json_array(tmp_path: Path) -> None:
    path = write(tmp_path / "t.json", '[{"a": 1}, ["not", "an", "object"]]')
    err = data_error(str(path))
    assert (err.record, err.reason) == ("record 1", "not_an_object")
    assert err.problem == "the record is a JSON array, not an object"


def test_non_object_record_in_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", '{"a": 1}\n"text"\n')
    err = data_error(str(path))
    assert (err.record, err.reason) == ("line 2", "not_an_object")
    assert str(err) == (
        f"{path}, line 2: the record is a JSON string, not an object\n"
        '  fix: each record must be a JSON object such as {"messages": [...]}'
    )


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    err = data_error(str(path))
    assert (err.record, err.reason) == ("line 2", "bad_encoding")


@pytest.mark.parametrize(
    ("name", "text"),
    [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.json", " \n"), ("e.csv", "instruction,output\n"), ("e.csv", "")],
)
def test_empty_file_is_an_error(tmp_path: Path, name: str, text: str) -> None:
    path = write(tmp_path / name, text)
    err = data_error(str(path))
    assert (err.source, err.reason) == (str(path), "empty_dataset")
    assert err.problem == "the file holds no records"


def test_empty_parquet_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"messages": pa.array([], pa.string())}), path)
    assert data_error(str(path)).reason == "empty_dataset"


def test_corrupt_parquet_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.parquet", "definitely not parquet")
    err = data_error(str(path))
    assert (err.source, err.reason) == (str(path), "malformed_parquet")


def test_folder_without_data_files_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "notes.txt", "x")
    (tmp_path / "sub").mkdir()
    jsonl(tmp_path / "sub" / "t.jsonl", ROWS)
    err = data_error(str(tmp_path))
    assert (err.source, err.reason) == (str(tmp_path), "empty_folder")
    assert "sub-folders are not searched" in err.problem
    assert err.fix == (
        "pass the data file itself, or a folder that directly holds only the files to use; "
        "its sub-folders hold sub/t.jsonl"
    )


# --- sampling ------------------------------------------------------------------------------------------------


def test_sample_fewer_than_the_dataset() -> None:
    records = list(range(10))
    picked = sample_records(records, 4, seed=7)
    assert len(picked) == 4 and len(set(picked)) == 4 and set(picked) <= set(records)
    assert picked == sample_records(records, 4, seed=7)
    assert picked != sample_records(records, 4, seed=8)


def test_sample_more_than_the_dataset_repeats_then_samples_the_rest() -> None:
    records = list(range(10))
    picked = sample_records(records, 23, seed=1)
    assert picked[:20] == records + records
    assert len(picked) == 23 and len(set(picked[20:])) == 3
    assert picked == sample_records(records, 23, seed=1)
    assert sample_records(records, 20, seed=1) == records + records


def test_sample_errors() -> None:
    with pytest.raises(OsstuneError, match="no records"):
        sample_records([], 3, seed=0)
    with pytest.raises(OsstuneError, match="must be positive"):
        sample_records([1], 0, seed=0)


def test_load_records_applies_the_sample_suffix(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "t.jsonl", ROWS)
    spec = parse_dataset_spec(f"{path}#12")
    picked = load_records(spec, seed=3)
    assert len(picked) == 12
    assert [r.locator for r in picked[:10]] == [f"line {i}" for i in (1, 2, 3, 4, 5)] * 2
    assert picked == load_records(spec, seed=3)
    assert [r.index for r in load_records(parse_dataset_spec(f"{path}#3"), seed=3)] == [
        r.index for r in sample_records(read(str(path)), 3, seed=3)
    ]
    assert load_records(parse_dataset_spec(str(path)), seed=3) == read(str(path))


def test_self_cognition_source_samples_through_the_same_suffix() -> None:
    spec = parse_dataset_spec("self-cognition#100")
    picked = load_records(spec, seed=42, model_name=["小黄", "Little Yellow"], model_author=["gxb"])
    assert len(picked) == 100 and len({r.index for r in picked}) == 100
    assert {r.source for r in picked} == {"self-cognition"}
    assert all(r.locator == f"record {r.index}" for r in picked)
    assert picked != load_records(spec, seed=43, model_name=["小黄", "Little Yellow"], model_author=["gxb"])


def test_self_cognition_source_needs_name_and_author() -> None:
    with pytest.raises(OsstuneError, match="--model_name NAME and --model_author AUTHOR"):
        read("self-cognition")


# --- fingerprints --------------------------------------------------------------------------------------------


def test_fingerprint_of_a_file_is_its_sha256(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "t.jsonl", ROWS)
    spec = parse_dataset_spec(str(path))
    assert source_fingerprint(spec) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_fingerprint_of_a_folder_follows_its_files(tmp_path: Path) -> None:
    jsonl(tmp_path / "a.jsonl", ROWS)
    second = jsonl(tmp_path / "b.jsonl", ROWS[:1])
    spec = parse_dataset_spec(str(tmp_path))
    before = source_fingerprint(spec)
    assert before == source_fingerprint(spec)
    jsonl(second, ROWS[:2])
    assert source_fingerprint(spec) != before


def test_fingerprint_of_self_cognition_is_the_packaged_data_hash() -> None:
    expected = hashlib.sha256(self_cognition_resource_bytes()).hexdigest()
    assert source_fingerprint(parse_dataset_spec("self-cognition#5")) == expected


# --- hub datasets (never touching the network) ---------------------------------------------------------------


def test_hub_dataset_offline_and_not_cached(offline_hub: Path) -> None:
    spec = parse_dataset_spec(f"{MT}#100")
    with pytest.raises(OsstuneError) as info:
        list(iter_records(spec))
    text = str(info.value)
    assert not isinstance(info.value, DataError)
    assert text.startswith(
        f"dataset '{MT}#100' is neither a local file or folder nor in the local Hugging Face datasets cache "
        f"({offline_hub}), and offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE).\n"
    )
    assert f"hf download --repo-type dataset {MT} --local-dir DIR" in text
    assert f"huggingface-cli download --repo-type dataset {MT} --local-dir DIR" in text
    assert "--dataset DIR/data/train-00000-of-00001.parquet" in text
    with pytest.raises(OsstuneError, match="nor in the local Hugging Face datasets cache"):
        source_fingerprint(spec)


def hub_rows() -> Any:
    import datasets

    train, test = datasets.Dataset.from_list(ROWS[:3]), datasets.Dataset.from_list(ROWS[3:])
    return datasets.DatasetDict({"train": train, "test": test})


def test_hub_dataset_offline_but_cached_is_loaded(offline_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    (offline_hub / "HuggingFaceH4___multilingual-thinking" / "default" / "0.0.0" / "abc123").mkdir(parents=True)
    calls: list[tuple[Any, ...]] = []

    def fake_load(path: str, name: str | None, cache_dir: str) -> Any:
        calls.append((path, name, cache_dir))
        return hub_rows()

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    records = read("HuggingFaceH4/Multilingual-Thinking")
    assert calls == [("HuggingFaceH4/Multilingual-Thinking", None, str(offline_hub))]
    assert records == [
        RawRecord("HuggingFaceH4/Multilingual-Thinking", f"record {i}", i, ROWS[i]) for i in range(3)
    ]


def test_hub_dataset_subset_and_fingerprint(online_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda path, name, cache_dir: hub_rows())
    spec = parse_dataset_spec("org/name:sub#2")
    assert [r.source for r in load_records(spec, seed=0)] == ["org/name:sub", "org/name:sub"]
    fingerprint = source_fingerprint(spec)
    assert len(fingerprint) == 64 and fingerprint == source_fingerprint(spec)
    assert fingerprint != source_fingerprint(parse_dataset_spec("org/name"))


def test_hub_dataset_unreachable(online_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def unreachable(path: str, name: str | None, cache_dir: str) -> Any:
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(OsstuneError) as info:
        read("org/name")
    text = str(info.value)
    assert f"datasets cache ({online_hub}), and the Hugging Face Hub cannot be reached." in text
    assert "hf download --repo-type dataset org/name --local-dir DIR" in text


def test_hub_dataset_that_does_not_exist(online_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def missing(path: str, name: str | None, cache_dir: str) -> Any:
        raise DatasetNotFoundError("Dataset 'org/typo' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(OsstuneError) as info:
        read("org/typo")
    text = str(info.value)
    assert "'org/typo' is not a local file or folder, and the Hugging Face Hub has no dataset 'org/typo'" in text
    assert "check the path" in text and "check the dataset name" in text
