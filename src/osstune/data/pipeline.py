"""From ``--dataset`` flags to tokenized training samples: load, parse, split, render, cut to length, cache.

:func:`prepare_dataset` is the one entry point used by ``osstune data``, ``osstune sft`` and the Python API. Every
record that is skipped or sample that is dropped or cut is counted by reason in the :class:`PrepareReport`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import osstune
from osstune.chat.messages import Conversation
from osstune.chat.options import IGNORE_INDEX, RenderOptions
from osstune.chat.render import render_training_samples
from osstune.config import DataArgs
from osstune.data.cache import SampleCache, dataset_cache_dir, tokenizer_fingerprint
from osstune.data.formats import detect_format, parse_record
from osstune.data.sources import load_records, parse_dataset_spec, source_fingerprint
from osstune.errors import DataError, OsstuneError
from osstune.progress import progress_bar

CHUNK = 64


@dataclass
class Prepared:
    """Tokenized samples of one split, in dataset order.

    Args:
        input_ids: one int32 array per sample.
        labels: one int32 array per sample, ``IGNORE_INDEX`` where not trained (unshifted).
        sources: the file (or dataset name) each sample came from.
        indices: the 0-based record index within its source.
    """

    input_ids: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"source": self.sources[i], "index": self.indices[i],
                "input_ids": self.input_ids[i].tolist(), "labels": self.labels[i].tolist()}

    def to_hf_dataset(self) -> Any:
        """A ``datasets.Dataset`` with ``input_ids`` and ``labels`` columns: TRL's ``SFTTrainer`` trains it as a
        pre-tokenized dataset, with exactly these loss masks."""
        from datasets import Dataset

        return Dataset.from_dict({"input_ids": [x.tolist() for x in self.input_ids],
                                  "labels": [x.tolist() for x in self.labels]})

    def append(self, source: str, index: int, ids: np.ndarray, labels: np.ndarray) -> None:
        """Add one sample."""
        self.input_ids.append(ids)
        self.labels.append(labels)
        self.sources.append(source)
        self.indices.append(index)


@dataclass
class SourceStats:
    """Per-source counts: rows read, format detected, rows skipped as bad, samples produced."""

    source: str
    format: str = ""
    rows: int = 0
    skipped: int = 0
    samples: int = 0


@dataclass
class PrepareReport:
    """What preprocessing did, for the terminal, ``osstune data`` and the run folder.

    Args:
        sources: per-source statistics.
        skipped: bad records skipped under ``--strict false``, by reason.
        dropped: samples removed by length handling, by reason.
        truncated: samples cut to ``--max_length``.
        lengths: token length of every kept sample (train then val).
        trained_tokens: supervised tokens over all kept samples.
        total_tokens: all tokens over all kept samples.
        examples: one located message per skip reason, so the user sees a real case.
        from_cache: whether the samples came from the on-disk cache.
    """

    sources: list[SourceStats] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    lengths: list[int] = field(default_factory=list)
    trained_tokens: int = 0
    total_tokens: int = 0
    examples: dict[str, str] = field(default_factory=dict)
    from_cache: bool = False

    def percentiles(self) -> dict[str, int]:
        """Token length percentiles (p50, p90, p99) plus min and max over kept samples."""
        if not self.lengths:
            return {}
        arr = np.asarray(self.lengths)
        return {"min": int(arr.min()), "p50": int(np.percentile(arr, 50)), "p90": int(np.percentile(arr, 90)),
                "p99": int(np.percentile(arr, 99)), "max": int(arr.max())}

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable form (lengths summarised)."""
        out = asdict(self)
        out.pop("lengths")
        out["num_samples"] = len(self.lengths)
        out["length_percentiles"] = self.percentiles()
        out["trained_share"] = self.trained_tokens / self.total_tokens if self.total_tokens else 0.0
        return out


@dataclass
class PreparedDataset:
    """The result of :func:`prepare_dataset`."""

    train: Prepared
    val: Prepared | None
    report: PrepareReport


@dataclass(frozen=True)
class _Job:
    """One conversation to render, with where it came from (kept separate from the conversation for pickling)."""

    split: str
    stats: int
    source: str
    locator: str
    index: int
    conversation: Conversation


# A rendered sample as int32 arrays (input_ids, labels): compact to send back from a worker process.
_Arrays = tuple[np.ndarray, np.ndarray]


def _render_chunk(jobs: list[_Job], tokenizer: Any, options: RenderOptions) -> list[list[_Arrays] | DataError]:
    """Render a batch of conversations; a bad conversation yields its located DataError instead of samples."""
    out: list[list[_Arrays] | DataError] = []
    for job in jobs:
        try:
            samples = render_training_samples(job.conversation, tokenizer, options)
            out.append([(np.asarray(s.input_ids, dtype=np.int32), np.asarray(s.labels, dtype=np.int32))
                        for s in samples])
        except DataError as exc:
            out.append(exc.located(job.source, job.locator))
    return out


class _Renderer:
    """Renders job chunks in this process or in a pool of forked workers (the tokenizer is inherited, not pickled)."""

    def __init__(self, tokenizer: Any, options: RenderOptions, num_proc: int) -> None:
        self.tokenizer, self.options, self.num_proc = tokenizer, options, max(1, num_proc)

    def __call__(self, chunks: list[list[_Job]]) -> Iterator[list[list[_Arrays] | DataError]]:
        if self.num_proc == 1 or len(chunks) < 2:
            for chunk in chunks:
                yield _render_chunk(chunk, self.tokenizer, self.options)
            return
        ctx = mp.get_context("fork")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        with ctx.Pool(self.num_proc, initializer=_worker_init, initargs=(self.tokenizer, self.options)) as pool:
            yield from pool.imap(_worker_render, chunks)


# Per-process state of a preprocessing worker: set once by the pool initializer, read by each task.
_WORKER: dict[str, Any] = {}


def _worker_init(tokenizer: Any, options: RenderOptions) -> None:
    _WORKER.update(tokenizer=tokenizer, options=options)


def _worker_render(jobs: list[_Job]) -> list[list[_Arrays] | DataError]:
    return _render_chunk(jobs, _WORKER["tokenizer"], _WORKER["options"])


def _truncate(sample: _Arrays, max_length: int | None, strategy: str) -> tuple[_Arrays | None, str | None, bool]:
    """Apply ``--max_length``: returns (sample or None, drop reason, was_truncated)."""
    ids, labels = sample
    n = len(ids)
    if max_length is None or n <= max_length:
        return sample, None, False
    if strategy == "delete":
        return None, f"longer than max_length={max_length}", False
    keep = slice(n - max_length, n) if strategy == "left" else slice(0, max_length)
    if not (labels[keep] != IGNORE_INDEX).any():
        return None, f"no trained tokens left after {strategy} truncation to {max_length}", False
    return (ids[keep], labels[keep]), None, True


def _load_conversations(
    specs: Sequence[str], split: str, args: DataArgs, report: PrepareReport
) -> list[_Job]:
    """Read and parse every record of ``specs``; bad records raise (strict) or are counted and skipped.

    The format is detected per file from its first record; every later record of that file must match it.
    """
    jobs: list[_Job] = []
    for spec_text in specs:
        spec = parse_dataset_spec(spec_text)
        stats = SourceStats(source=spec_text)
        report.sources.append(stats)
        file_formats: dict[str, str] = {}
        for rec in load_records(spec, seed=args.seed, model_name=args.model_name, model_author=args.model_author):
            stats.rows += 1
            try:
                fmt = detect_format(rec.data, rec.source, locator=rec.locator, expected=file_formats.get(rec.source))
                file_formats.setdefault(rec.source, fmt)
                conv = parse_record(rec.data, fmt, source=rec.source, index=rec.index)
            except DataError as exc:
                located = exc.located(rec.source, rec.locator)
                if args.strict:
                    raise located from None
                _count_skip(report, stats, located)
                continue
            jobs.append(_Job(split, len(report.sources) - 1, rec.source, rec.locator, rec.index, conv))
        stats.format = "+".join(sorted(set(file_formats.values()))) or "-"
        if stats.rows == 0:
            raise OsstuneError(f"{spec_text}: the dataset is empty (no records). Check the file or folder.")
    return jobs


def _count_skip(report: PrepareReport, stats: SourceStats, error: DataError) -> None:
    """Record one skipped record under ``--strict false`` (count per reason, keep one example message)."""
    stats.skipped += 1
    report.skipped[error.reason] = report.skipped.get(error.reason, 0) + 1
    report.examples.setdefault(error.reason, error.message)


def _split_jobs(jobs: list[_Job], ratio: float, seed: int) -> list[_Job]:
    """Mark a seeded random ``ratio`` of the train conversations as validation (at least one, dataset order kept)."""
    if ratio <= 0 or not jobs:
        return jobs
    if not 0 < ratio < 1:
        raise OsstuneError(f"--split_dataset_ratio {ratio}: must be between 0 and 1.")
    n_val = max(1, math.ceil(len(jobs) * ratio))
    if n_val >= len(jobs):
        raise OsstuneError(f"--split_dataset_ratio {ratio} leaves no training data from {len(jobs)} conversations.")
    held = set(random.Random(seed).sample(range(len(jobs)), n_val))
    return [(dataclasses.replace(j, split="val") if i in held else j)
            for i, j in enumerate(jobs)]


def cache_key(args: DataArgs, options: RenderOptions, tokenizer: Any) -> str:
    """A hash of everything that determines the prepared samples (data, tokenizer, options, code version)."""
    payload = {
        "version": osstune.__version__,
        "code": _code_fingerprint(),
        "train": [(s, source_fingerprint(parse_dataset_spec(s))) for s in args.dataset],
        "val": [(s, source_fingerprint(parse_dataset_spec(s))) for s in args.val_dataset],
        "split": args.split_dataset_ratio,
        "seed": args.seed,
        "max_length": args.max_length,
        "truncation": args.truncation_strategy,
        "strict": args.strict,
        "model_name": args.model_name,
        "model_author": args.model_author,
        "options": asdict(options),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _code_fingerprint() -> str:
    """Hash of the data and chat sources, so a code change never reuses stale samples."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for sub in ("chat", "data"):
        for p in sorted((root / sub).glob("*.py")):
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def prepare_dataset(
    args: DataArgs,
    options: RenderOptions,
    tokenizer: Any,
    *,
    show_progress: bool = True,
    cache_dir: Path | None = None,
) -> PreparedDataset:
    """Load, parse, split, render and length-filter the datasets named in ``args``.

    Args:
        args: dataset flags (sources, split, seed, length handling, caching, strictness).
        options: rendering options (date, effort, identity, default system, loss policy).
        tokenizer: the model's tokenizer; gpt-oss tokenizers take the harmony renderer, others the chat template.
        show_progress: draw a progress bar with rate and ETA while rendering.
        cache_dir: where prepared datasets are cached (default :func:`~osstune.data.cache.dataset_cache_dir`).

    Returns:
        Train samples, validation samples (or None) and the report. Samples keep dataset order.
    """
    if not args.dataset:
        raise OsstuneError("--dataset is required: give one or more files, folders or dataset names.")
    cache = SampleCache(cache_dir or dataset_cache_dir(), cache_key(args, options, tokenizer))
    if args.load_from_cache_file:
        cached = cache.load()
        if cached is not None:
            train, val, report_json = cached
            return PreparedDataset(train, val, _report_from_json(report_json, train, val))

    report = PrepareReport()
    jobs = _load_conversations(args.dataset, "train", args, report)
    if args.val_dataset:
        jobs += _load_conversations(args.val_dataset, "val", args, report)
    else:
        jobs = _split_jobs(jobs, args.split_dataset_ratio, args.seed)

    train, val = Prepared(), Prepared()
    chunks = [jobs[i:i + CHUNK] for i in range(0, len(jobs), CHUNK)]
    renderer = _Renderer(tokenizer, options, args.dataset_num_proc)
    with progress_bar("Rendering", total=len(jobs), unit="conv", enabled=show_progress) as advance:
        for chunk, results in zip(chunks, renderer(chunks)):
            for job, result in zip(chunk, results):
                if isinstance(result, DataError):
                    if args.strict:
                        raise result
                    _count_skip(report, report.sources[job.stats], result)
                    continue
                for sample in result:
                    kept, reason, cut = _truncate(sample, args.max_length, args.truncation_strategy)
                    if kept is None:
                        report.dropped[reason] = report.dropped.get(reason, 0) + 1  # type: ignore[index]
                        continue
                    report.truncated += cut
                    (val if job.split == "val" else train).append(job.source, job.index, *kept)
                    report.sources[job.stats].samples += 1
            advance(len(chunk))

    if len(train) == 0:
        raise OsstuneError("No training samples are left after preprocessing: " + _why_empty(report))
    val_out = val if len(val) else None
    _fill_token_stats(report, train, val_out)
    cache.save(train, val_out, report.to_json())
    return PreparedDataset(train, val_out, report)


def _why_empty(report: PrepareReport) -> str:
    parts = [f"{n} skipped ({r})" for r, n in report.skipped.items()]
    parts += [f"{n} dropped ({r})" for r, n in report.dropped.items()]
    return "; ".join(parts) + ". Fix the data or the length flags (--max_length, --truncation_strategy)."


def _fill_token_stats(report: PrepareReport, train: Prepared, val: Prepared | None) -> None:
    for split in (train, val):
        if split is None:
            continue
        for ids, labels in zip(split.input_ids, split.labels):
            report.lengths.append(len(ids))
            report.total_tokens += len(ids)
            report.trained_tokens += int((labels != IGNORE_INDEX).sum())


def _report_from_json(data: dict[str, Any], train: Prepared, val: Prepared | None) -> PrepareReport:
    report = PrepareReport(
        sources=[SourceStats(**s) for s in data["sources"]],
        skipped=data["skipped"], dropped=data["dropped"], truncated=data["truncated"],
        examples=data["examples"], from_cache=True,
    )
    _fill_token_stats(report, train, val)
    return report
