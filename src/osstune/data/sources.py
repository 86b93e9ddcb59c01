"""Where raw dataset records come from: the values that ``--dataset`` and ``--val_dataset`` accept.

A spec is one of

- a local ``.json`` (a JSON array of objects, or one object per line), ``.jsonl``, ``.csv`` or ``.parquet`` file;
- a folder holding such files (read in name order, not recursively);
- a Hugging Face dataset name ``ORG/NAME`` with an optional ``:SUBSET`` (its ``train`` split, or its only split);
- the built-in ``self-cognition`` dataset;

each optionally followed by ``#N`` to sample N records with the run seed (as in ms-swift: N larger than the dataset
repeats the whole dataset and samples the remainder). Records keep their location so that every error can name the
file and the line or record it came from.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from osstune.data.self_cognition import SELF_COGNITION, self_cognition_records, self_cognition_resource_bytes
from osstune.errors import DataError, OsstuneError

SourceKind = Literal["file", "folder", "hub", "self-cognition"]
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".json", ".jsonl", ".csv", ".parquet")
CSV_JSON_COLUMNS: tuple[str, ...] = ("messages", "conversations", "history", "tools")

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?$")
_PATH_FIX = "check the path; relative paths are resolved from the current directory ({cwd})"
_FORMATS_HINT = (
    "a .json, .jsonl, .csv or .parquet file, a folder of such files, a Hugging Face dataset name or self-cognition"
)
_TRUE_VALUES = ("1", "ON", "YES", "TRUE")
_PARQUET_BATCH_ROWS = 1024
_READ_CHUNK_BYTES = 1 << 20
_CSV_FIELD_LIMIT = 2**31 - 1
_LISTED_FILES = 5

T = TypeVar("T")


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed ``--dataset`` value.

    Args:
        text: the spec exactly as the user wrote it (for messages).
        kind: ``file``, ``folder``, ``hub`` or ``self-cognition``.
        location: the file or folder path, the hub dataset name, or ``self-cognition``.
        subset: the hub dataset's subset (configuration) name, from ``NAME:SUBSET``; ``None`` otherwise.
        sample: N from a ``#N`` suffix: how many records to sample; ``None`` to use every record once.
    """

    text: str
    kind: SourceKind
    location: str
    subset: str | None = None
    sample: int | None = None


@dataclass(frozen=True)
class RawRecord:
    """One record as read from its source, before any format parsing.

    Args:
        source: the file path (or dataset name) the record came from.
        locator: where in the source: ``line N`` (1-based) for JSONL and CSV, ``record N`` (0-based) otherwise.
        index: 0-based position of the record within its source.
        data: the record itself.
    """

    source: str
    locator: str
    index: int
    data: dict[str, Any]


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """Classify a ``--dataset`` value, checking that a local path exists and has a supported extension.

    Args:
        spec: the value as given on the command line, e.g. ``train.jsonl``, ``data/``, ``org/name:subset#500``
            or ``self-cognition#100``.

    Returns:
        The parsed spec. Hub names are not looked up here; that happens when records are read.

    Raises:
        OsstuneError: for an empty spec or a ``#N`` suffix that is not a positive integer.
        DataError: for a local path that does not exist, or a file with an unsupported extension.
    """
    text = spec.strip()
    if not text:
        raise OsstuneError(f"empty dataset spec; pass {_FORMATS_HINT}")
    base, sample = text, None
    if "#" in text and not Path(text).expanduser().exists():
        base, count = text.rsplit("#", 1)
        if not count.isdigit() or int(count) == 0:
            raise OsstuneError(
                f"dataset spec {text!r}: the part after '#' must be a positive number of records to sample, "
                f"e.g. {base}#500"
            )
        sample = int(count)
    if base == SELF_COGNITION:
        return DatasetSpec(text=text, kind="self-cognition", location=base, sample=sample)
    path = Path(base).expanduser()
    if path.is_dir():
        return DatasetSpec(text=text, kind="folder", location=str(path), sample=sample)
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise DataError(
                problem=f"unsupported file extension {path.suffix or '(none)'!r}",
                fix=f"convert it to {', '.join(SUPPORTED_EXTENSIONS)} or pass a folder of such files",
                source=str(path),
                reason="unsupported_extension",
            )
        return DatasetSpec(text=text, kind="file", location=str(path), sample=sample)
    if _HUB_NAME.match(base) and path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        name, _, subset = base.partition(":")
        return DatasetSpec(text=text, kind="hub", location=name, subset=subset or None, sample=sample)
    raise DataError(
        problem="no such file or folder",
        fix=_PATH_FIX.format(cwd=Path.cwd()) + f"; a dataset is {_FORMATS_HINT}",
        source=base,
        reason="not_found",
    )


def iter_records(
    spec: DatasetSpec, *, model_name: Sequence[str] = (), model_author: Sequence[str] = ()
) -> Iterator[RawRecord]:
    """Yield every record of a source once, in source order (``#N`` is not applied).

    JSONL, CSV and parquet files are read as a stream; a JSON array is parsed whole.

    Args:
        spec: the parsed spec.
        model_name: ``--model_name`` values, used only by ``self-cognition``.
        model_author: ``--model_author`` values, used only by ``self-cognition``.

    Raises:
        DataError: for a malformed file, a record that is not an object, an empty file or an empty folder.
        OsstuneError: for a hub dataset that cannot be loaded, or self-cognition without name and author.
    """
    if spec.kind == "file":
        yield from _iter_file(Path(spec.location))
    elif spec.kind == "folder":
        for path in _folder_files(Path(spec.location)):
            yield from _iter_file(path)
    elif spec.kind == "hub":
        dataset = _load_hub_dataset(spec)
        source = _hub_source(spec)
        for index, row in enumerate(dataset):
            yield RawRecord(source=source, locator=f"record {index}", index=index, data=dict(row))
    else:
        for index, row in enumerate(self_cognition_records(model_name, model_author)):
            yield RawRecord(source=SELF_COGNITION, locator=f"record {index}", index=index, data=row)


def load_records(
    spec: DatasetSpec, *, seed: int, model_name: Sequence[str] = (), model_author: Sequence[str] = ()
) -> list[RawRecord]:
    """Read all records of a source and apply its ``#N`` sampling.

    Args:
        spec: the parsed spec.
        seed: the run seed; the same seed always selects the same records.
        model_name: ``--model_name`` values, used only by ``self-cognition``.
        model_author: ``--model_author`` values, used only by ``self-cognition``.

    Returns:
        The records; with ``#N``, exactly N of them.

    Raises:
        DataError, OsstuneError: as ``iter_records``.
    """
    records = list(iter_records(spec, model_name=model_name, model_author=model_author))
    if spec.sample is None:
        return records
    return sample_records(records, spec.sample, seed)


def sample_records(records: Sequence[T], n: int, seed: int) -> list[T]:
    """Pick ``n`` records the way ms-swift's ``#N`` does, deterministically for a seed.

    ``n`` at most the number of records samples without replacement; a larger ``n`` repeats the whole dataset
    ``n // len(records)`` times, in order, then samples the remaining ``n % len(records)`` without replacement.

    Args:
        records: the records to draw from (not empty).
        n: how many to return (positive).
        seed: random seed.

    Raises:
        OsstuneError: when ``records`` is empty or ``n`` is not positive.
    """
    if not records:
        raise OsstuneError("cannot sample from a dataset with no records")
    if n <= 0:
        raise OsstuneError(f"the number of records to sample must be positive, got {n}")
    repeats, remainder = divmod(n, len(records))
    return list(records) * repeats + random.Random(seed).sample(list(records), remainder)


def source_fingerprint(spec: DatasetSpec) -> str:
    """A content hash of a source, for the preprocessing cache key.

    Covers the data only: the caller adds what else shapes the result (the spec text with its ``#N``, the seed,
    and for ``self-cognition`` the model name and author).

    Args:
        spec: the parsed spec.

    Returns:
        A sha256 hex digest: of the file bytes for a file; of each file's name and digest for a folder; of the
        name, subset and the ``datasets`` fingerprint of the cached data for a hub dataset; of the packaged data
        for ``self-cognition``.

    Raises:
        DataError, OsstuneError: as ``iter_records``.
    """
    if spec.kind == "file":
        return _file_sha256(Path(spec.location))
    if spec.kind == "folder":
        digest = hashlib.sha256()
        for path in _folder_files(Path(spec.location)):
            digest.update(f"{path.name}\0{_file_sha256(path)}\n".encode())
        return digest.hexdigest()
    if spec.kind == "hub":
        dataset = _load_hub_dataset(spec)
        key = f"{spec.location}\0{spec.subset or ''}\0{dataset._fingerprint}"
        return hashlib.sha256(key.encode()).hexdigest()
    return hashlib.sha256(self_cognition_resource_bytes()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_READ_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_files(folder: Path) -> list[Path]:
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS),
        key=lambda p: p.name,
    )
    if not files:
        nested = sorted(
            str(p.relative_to(folder)) for p in folder.glob("*/*") if p.suffix.lower() in SUPPORTED_EXTENSIONS
        )
        listed = ", ".join(nested[:_LISTED_FILES]) + (", ..." if len(nested) > _LISTED_FILES else "")
        raise DataError(
            problem=f"the folder holds no {', '.join(SUPPORTED_EXTENSIONS)} files (sub-folders are not searched)",
            fix="pass the data file itself, or a folder that directly holds only the files to use"
            + (f"; its sub-folders hold {listed}" if nested else ""),
            source=str(folder),
            reason="empty_folder",
        )
    return files


def _iter_file(path: Path) -> Iterator[RawRecord]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _iter_jsonl(path)
    elif suffix == ".json":
        records = _iter_json(path)
    elif suffix == ".csv":
        records = _iter_csv(path)
    else:
        records = _iter_parquet(path)
    empty = True
    for record in records:
        empty = False
        yield record
    if empty:
        raise DataError(
            problem="the file holds no records",
            fix="add records to it, or leave it out of --dataset",
            source=str(path),
            reason="empty_dataset",
        )


def _object_record(path: Path, locator: str, index: int, value: Any) -> RawRecord:
    if not isinstance(value, dict):
        raise DataError(
            problem=f"the record is a JSON {_json_type(value)}, not an object",
            fix='each record must be a JSON object such as {"messages": [...]}',
            source=str(path),
            record=locator,
            reason="not_an_object",
        )
    return RawRecord(source=str(path), locator=locator, index=index, data=value)


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else type(value).__name__


def _decode_line(path: Path, raw: bytes, line: int) -> str:
    try:
        return raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            problem=f"the text is not valid UTF-8 (byte {err.start + 1} of the line)",
            fix="save the file as UTF-8",
            source=str(path),
            record=f"line {line}",
            reason="bad_encoding",
        ) from None


def _iter_jsonl(path: Path) -> Iterator[RawRecord]:
    with path.open("rb") as handle:
        index = 0
        for line, raw in enumerate(handle, start=1):
            text = _decode_line(path, raw, line)
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(
                    problem=f"malformed JSON at column {err.colno}: {err.msg}",
                    fix="each line must be one complete JSON object; check the quotes, commas and brackets near "
                    "that column (a .json file may instead hold one JSON array of objects)",
                    source=str(path),
                    record=f"line {line}",
                    reason="malformed_json",
                ) from None
            yield _object_record(path, f"line {line}", index, value)
            index += 1


def _first_byte(path: Path) -> bytes:
    """The file's first byte that is not whitespace (after any UTF-8 byte order mark); empty for a blank file."""
    with path.open("rb") as handle:
        chunk = handle.read(_READ_CHUNK_BYTES).removeprefix(codecs.BOM_UTF8)
        while chunk:
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1]
            chunk = handle.read(_READ_CHUNK_BYTES)
    return b""


def _iter_json(path: Path) -> Iterator[RawRecord]:
    if _first_byte(path) == b"{":
        yield from _iter_jsonl(path)
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            problem="the text is not valid UTF-8",
            fix="save the file as UTF-8",
            source=str(path),
            record=f"line {line}",
            reason="bad_encoding",
        ) from None
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            problem=f"malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}",
            fix="a .json file must hold one JSON array of objects; check the quotes, commas and brackets near that "
            "position",
            source=str(path),
            record=f"line {err.lineno}",
            reason="malformed_json",
        ) from None
    if not isinstance(value, list):
        raise DataError(
            problem=f"the file holds a JSON {_json_type(value)}, not an array of objects",
            fix='write the records as [{"messages": [...]}, ...], or one object per line in a .jsonl file',
            source=str(path),
            reason="not_an_array",
        )
    for index, item in enumerate(value):
        yield _object_record(path, f"record {index}", index, item)


def _iter_csv(path: Path) -> Iterator[RawRecord]:
    # A messages cell of a long conversation easily exceeds the csv module's default 128 KiB field limit.
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    with path.open("r", encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                return
            header = [column.strip() for column in header]
            index = 0
            line = reader.line_num + 1
            for row in reader:
                start, line = line, reader.line_num + 1
                if not any(cell.strip() for cell in row):
                    continue
                yield RawRecord(str(path), f"line {start}", index, _csv_record(path, start, header, row))
                index += 1
        except UnicodeDecodeError:
            raise DataError(
                problem="the text is not valid UTF-8",
                fix="save the file as UTF-8",
                source=str(path),
                record=f"line {reader.line_num + 1}",
                reason="bad_encoding",
            ) from None
        except csv.Error as err:
            raise DataError(
                problem=f"malformed CSV: {err}",
                fix="check the quoting near that line; a field holding commas, quotes or newlines must be quoted",
                source=str(path),
                record=f"line {reader.line_num}",
                reason="malformed_csv",
            ) from None


def _csv_record(path: Path, line: int, header: list[str], row: list[str]) -> dict[str, Any]:
    if len(row) > len(header):
        raise DataError(
            problem=f"the row has {len(row)} fields but the header has {len(header)} columns",
            fix="quote fields that contain commas",
            source=str(path),
            record=f"line {line}",
            reason="malformed_csv",
        )
    record: dict[str, Any] = {}
    for column, cell in zip(header, row):
        if cell == "":
            continue
        if column in CSV_JSON_COLUMNS:
            try:
                record[column] = json.loads(cell)
            except json.JSONDecodeError as err:
                raise DataError(
                    problem=f"column {column!r} must hold JSON text; malformed at character {err.pos + 1}: {err.msg}",
                    fix=f"write the {column} cell as JSON, e.g. "
                    + ('[["question", "answer"]]' if column == "history" else '[{"role": "user", "content": "..."}]'),
                    source=str(path),
                    record=f"line {line}",
                    field=column,
                    reason="malformed_json",
                ) from None
        else:
            record[column] = cell
    return record


def _iter_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow
    import pyarrow.parquet

    try:
        parquet = pyarrow.parquet.ParquetFile(path)
    except pyarrow.ArrowException as err:
        raise DataError(
            problem=f"not a readable parquet file ({err})",
            fix="check that the file is complete and really is parquet",
            source=str(path),
            reason="malformed_parquet",
        ) from None
    index = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            yield RawRecord(source=str(path), locator=f"record {index}", index=index, data=row)
            index += 1


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").upper() in _TRUE_VALUES


def _hub_offline() -> bool:
    return any(_env_true(name) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _datasets_cache_dir() -> Path:
    explicit = os.environ.get("HF_DATASETS_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "datasets"


def _hub_source(spec: DatasetSpec) -> str:
    return f"{spec.location}:{spec.subset}" if spec.subset else spec.location


def _not_cached_error(spec: DatasetSpec, cache_dir: Path, why: str) -> OsstuneError:
    name = spec.location
    return OsstuneError(
        f"dataset {spec.text!r} is neither a local file or folder nor in the local Hugging Face datasets cache "
        f"({cache_dir}), and {why}.\n"
        f"  fix: on a machine with internet access run\n"
        f"         hf download --repo-type dataset {name} --local-dir DIR\n"
        f"       (older huggingface_hub: huggingface-cli download --repo-type dataset {name} --local-dir DIR),\n"
        f"       copy DIR here, then pass its training data file, e.g. "
        f"--dataset DIR/data/train-00000-of-00001.parquet,\n"
        f"       or --dataset DIR when that folder holds only training files"
    )


def _is_cached(spec: DatasetSpec, cache_dir: Path) -> bool:
    from datasets.naming import camelcase_to_snakecase

    namespace, _, name = spec.location.partition("/")
    root = cache_dir / f"{namespace}___{camelcase_to_snakecase(name)}"
    return any(p.is_dir() for p in root.glob("*/*/*"))


def _load_hub_dataset(spec: DatasetSpec) -> Any:
    cache_dir = _datasets_cache_dir()
    if _hub_offline() and not _is_cached(spec, cache_dir):
        raise _not_cached_error(spec, cache_dir, "offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)")
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        loaded = datasets.load_dataset(spec.location, spec.subset, cache_dir=str(cache_dir))
    except ConnectionError:
        raise _not_cached_error(spec, cache_dir, "the Hugging Face Hub cannot be reached") from None
    except DatasetNotFoundError as err:
        raise OsstuneError(
            f"dataset {spec.text!r} is not a local file or folder, and the Hugging Face Hub has no dataset "
            f"{spec.location!r} ({err}).\n  fix: {_PATH_FIX.format(cwd=Path.cwd())}, or check the dataset name "
            f"(ModelScope dataset ids are not looked up: download the files and pass them instead)"
        ) from None
    except ValueError as err:
        raise OsstuneError(f"cannot load dataset {spec.text!r}: {err}") from None
    splits = list(loaded)
    if "train" in loaded:
        return loaded["train"]
    if len(splits) == 1:
        return loaded[splits[0]]
    raise OsstuneError(
        f"dataset {spec.text!r} has no 'train' split and several others ({', '.join(splits)}); "
        f"download it and pass the data file of the split you want"
    )
