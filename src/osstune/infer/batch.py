"""Batch inference over a dataset: ``osstune infer --val_dataset FILE --result_path out.jsonl``.

Records are read with the data modules (any supported format and source). A record that ends with an assistant turn
keeps it as the ``reference`` (the expected answer) and the turns before it are the prompt; a record that ends with a
user (or tool) turn is all prompt. Every prompt is rendered and checked against the model's context before anything
is generated, so a bad record stops the run at once, named.

Results are one JSON line per record, appended and flushed after every batch::

    {"index", "messages", "reference", "response", "reasoning", "tool_calls", "prompt_tokens",
     "completion_tokens", "latency_s"}

``index`` is the record's 0-based position in the ``--val_dataset`` sources taken in order. A rerun with the same
``--result_path`` skips the indices already in the file (a half-written last line is dropped and redone), so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from osstune.chat.messages import Conversation, Message
from osstune.chat.options import RenderOptions
from osstune.chat.render import render_prompt
from osstune.data.formats import detect_format, parse_record
from osstune.data.sources import load_records, parse_dataset_spec
from osstune.errors import DataError, OsstuneError
from osstune.infer.generate import Reply, generate_batch
from osstune.progress import progress_bar

RESULT_FIELDS: tuple[str, ...] = ("index", "messages", "reference", "response", "reasoning", "tool_calls",
                                  "prompt_tokens", "completion_tokens", "latency_s")
"""The keys of every result line, in order."""
SAMPLE_SEED = 42
"""Seed of ``#N`` sampling in ``--val_dataset`` (fixed, so that a rerun resumes over the same records)."""
RESULT_FOLDER = "infer_result"
ASSISTANT_FROM = ("gpt", "assistant", "function_call")
"""sharegpt ``from`` values that are assistant turns."""
ANSWER_SLOT = "(answer)"
"""Text of the placeholder answer appended to a record without one, so it parses; it is dropped again."""


@dataclass(frozen=True)
class InferRequest:
    """One record to answer.

    Args:
        index: 0-based position in the ``--val_dataset`` sources taken in order; the key of its result line.
        messages: the prompt: the record's turns without its closing assistant turn.
        tools: function definitions offered to the model.
        reference: the text of the record's closing assistant turn (the expected answer); None when the record
            ends with a user or tool turn.
        source: the file (or dataset) the record came from.
        locator: where in the source: ``line N`` or ``record N``.
    """

    index: int
    messages: tuple[Message, ...]
    tools: tuple[dict[str, Any], ...] = ()
    reference: str | None = None
    source: str = ""
    locator: str = ""

    @property
    def where(self) -> str:
        """The record's location for messages, e.g. ``val.jsonl, line 3``."""
        return ", ".join(part for part in (self.source, self.locator) if part)


@dataclass(frozen=True)
class BatchSummary:
    """What a batch-inference run did.

    Args:
        result_path: the result file.
        total: records in the dataset.
        resumed: records already answered in the file before this run.
        written: records answered by this run.
        seconds: wall time of the generation.
    """

    result_path: Path
    total: int
    resumed: int
    written: int
    seconds: float


def read_requests(specs: Sequence[str], seed: int = SAMPLE_SEED) -> list[InferRequest]:
    """Read every record of ``specs`` as a prompt plus its reference answer.

    Args:
        specs: ``--val_dataset`` values (files, folders, hub names, each with an optional ``#N``).
        seed: seed of ``#N`` sampling.

    Raises:
        DataError: a record that cannot be parsed, named by file and line.
        OsstuneError: a source that cannot be read.
    """
    requests: list[InferRequest] = []
    for text in specs:
        formats: dict[str, str] = {}
        for record in load_records(parse_dataset_spec(text), seed=seed):
            try:
                fmt = detect_format(record.data, record.source, locator=record.locator,
                                    expected=formats.get(record.source))
                formats.setdefault(record.source, fmt)
                conv, has_answer = _parse_prompt(record.data, fmt, record.source, record.index)
            except DataError as exc:
                raise exc.located(record.source, record.locator) from None
            messages = conv.messages[:-1] if has_answer else conv.messages
            reference = conv.messages[-1].content if has_answer else None
            requests.append(InferRequest(index=len(requests), messages=messages, tools=conv.tools,
                                         reference=reference, source=record.source, locator=record.locator))
    return requests


def _parse_prompt(data: Mapping[str, Any], fmt: str, source: str, index: int) -> tuple[Conversation, bool]:
    """Parse a record; one without a closing answer gets a placeholder answer that is cut off again.

    Returns:
        The conversation and whether its last message is the record's own answer.
    """
    slot = _with_answer_slot(data, fmt)
    conv = parse_record(slot if slot is not None else data, fmt, source=source, index=index)
    if slot is None:
        return conv, True
    return Conversation(conv.messages[:-1], conv.tools, conv.source, conv.index), False


def _with_answer_slot(data: Mapping[str, Any], fmt: str) -> dict[str, Any] | None:
    """A copy of a record that does not end with an answer, with a placeholder answer appended; else None."""
    if fmt == "alpaca":
        return {**data, "output": ANSWER_SLOT} if data.get("output") in (None, "") else None
    key, role_key, assistant, slot = (
        ("messages", "role", ("assistant",), {"role": "assistant", "content": ANSWER_SLOT}) if fmt == "messages"
        else ("conversations", "from", ASSISTANT_FROM, {"from": "gpt", "value": ANSWER_SLOT}))
    turns = data.get(key)
    if not isinstance(turns, list) or not turns or not isinstance(turns[-1], Mapping):
        return None  # malformed: parse_record reports it
    if turns[-1].get(role_key) in assistant:
        return None
    return {**data, key: [*turns, slot]}


def default_result_path(adapter_dir: Path | None, model_dir: Path, now: _dt.datetime | None = None) -> Path:
    """Where results go without ``--result_path``, as ms-swift does it.

    Args:
        adapter_dir: the LoRA checkpoint, if any: results go to ``CHECKPOINT/infer_result/``.
        model_dir: the (base or merged) model folder: results go to ``MODEL/infer_result/`` when there is no
            adapter.
        now: the time for the file name (default: now).

    Returns:
        ``FOLDER/infer_result/{YYYYMMDD-HHMMSS}.jsonl``.
    """
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return (adapter_dir if adapter_dir is not None else model_dir) / RESULT_FOLDER / f"{stamp}.jsonl"


def read_finished(path: Path, requests: Sequence[InferRequest]) -> set[int]:
    """The indices already answered in a result file; drops a half-written last line from the file.

    Args:
        path: the result file (may be missing).
        requests: the records of this run; each line must belong to one of them, with the same prompt.

    Raises:
        OsstuneError: a damaged line other than the last, or a line written for another dataset.
    """
    if not path.is_file():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    done: set[int] = set()
    for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            index = row["index"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise OsstuneError(f"--result_path {path}: line {number} is not a result line. Delete or repair it, "
                               "or pass another --result_path.") from None
        if not isinstance(index, int) or not 0 <= index < len(requests) or \
                row.get("messages") != [m.to_dict() for m in requests[index].messages]:
            raise OsstuneError(f"--result_path {path}: line {number} (index {index}) does not match this "
                               "--val_dataset; the file holds results of other data. Pass another --result_path.")
        done.add(index)
    return done


def prompt_lengths(requests: Sequence[InferRequest], tokenizer: Any, options: RenderOptions,
                   max_context: int | None) -> list[int]:
    """Render every prompt and count its tokens; a record that cannot be rendered or does not fit is an error.

    Args:
        requests: the records.
        tokenizer: the model's tokenizer.
        options: rendering options.
        max_context: the model's context length (``max_position_embeddings``); None skips the check.

    Raises:
        DataError: a record the renderer refuses, named by file and line.
        OsstuneError: a prompt that leaves no room to generate within the context.
    """
    lengths = []
    for request in requests:
        try:
            length = len(render_prompt(request.messages, tokenizer, options, request.tools))
        except DataError as exc:
            raise exc.located(request.source, request.locator) from None
        if max_context is not None and length >= max_context:
            raise OsstuneError(f"{request.where} (index {request.index}): the prompt has {length:,} tokens, but the "
                               f"model's context (max_position_embeddings) is {max_context:,}. Shorten this record "
                               "or leave it out of --val_dataset.")
        lengths.append(length)
    return lengths


def result_line(request: InferRequest, reply: Reply, prompt_tokens: int, latency: float) -> dict[str, Any]:
    """The result record of one answered request (keys as ``RESULT_FIELDS``).

    Args:
        request: the record.
        reply: the model's parsed reply.
        prompt_tokens: tokens in the rendered prompt.
        latency: seconds the batch that answered it took.
    """
    return {
        "index": request.index,
        "messages": [m.to_dict() for m in request.messages],
        "reference": request.reference,
        "response": reply.final,
        "reasoning": reply.reasoning,
        "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in reply.tool_calls],
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(reply.token_ids),
        "latency_s": round(latency, 3),
    }


def infer_dataset(
    model: Any,
    tokenizer: Any,
    options: RenderOptions,
    requests: Sequence[InferRequest],
    result_path: Path,
    *,
    max_batch_size: int = 8,
    max_new_tokens: int = 2048,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_context: int | None = None,
    console: Console | None = None,
    show_progress: bool = True,
) -> BatchSummary:
    """Answer every request not yet in ``result_path``, in batches, appending one JSON line per record.

    Args:
        model: the model, in eval mode.
        tokenizer: its tokenizer.
        options: rendering options.
        requests: the records (see :func:`read_requests`).
        result_path: the JSONL result file; existing results are kept and their records skipped.
        max_batch_size: records generated together (left-padded).
        max_new_tokens: generation budget per record.
        temperature: sampling temperature; 0 (greedy) gives the same results on every run.
        top_p: nucleus sampling threshold (with temperature > 0).
        max_context: the model's context length; longer prompts are an error.
        console: where messages go.
        show_progress: draw a progress bar with rate and ETA.

    Raises:
        DataError, OsstuneError: a record that cannot be rendered or is too long, or a result file of other data.
    """
    console = console or Console()
    if result_path.is_dir():
        raise OsstuneError(f"--result_path {result_path} is a folder; give a file name such as "
                           f"{result_path / 'result.jsonl'}.")
    done = read_finished(result_path, requests)
    todo = [r for r in requests if r.index not in done]
    lengths = prompt_lengths(todo, tokenizer, options, max_context)
    if done:
        console.print(f"resuming {result_path}: {len(done)} of {len(requests)} records already answered",
                      markup=False, highlight=False, soft_wrap=True)
    try:
        result_path.parent.mkdir(parents=True, exist_ok=True)
        out = result_path.open("a", encoding="utf-8")
    except OSError as exc:
        raise OsstuneError(f"cannot write {result_path} ({exc.strerror}); pass a --result_path in a writable "
                           "folder.") from None
    start = time.perf_counter()
    with out, progress_bar("infer", total=len(todo), unit="samples", enabled=show_progress) as advance:
        for first in range(0, len(todo), max_batch_size):
            batch = todo[first:first + max_batch_size]
            began = time.perf_counter()
            replies = generate_batch(model, tokenizer, [r.messages for r in batch], options,
                                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     tools=[r.tools for r in batch], max_context=max_context)
            latency = time.perf_counter() - began
            out.write("".join(json.dumps(result_line(r, reply, lengths[first + i], latency), ensure_ascii=False)
                              + "\n" for i, (r, reply) in enumerate(zip(batch, replies))))
            out.flush()
            os.fsync(out.fileno())
            advance(len(batch))
    seconds = time.perf_counter() - start
    console.print(f"results: {result_path} ({len(todo)} new, {len(done)} from before, {seconds:.1f} s)",
                  markup=False, highlight=False, soft_wrap=True)
    return BatchSummary(result_path, len(requests), len(done), len(todo), seconds)
