"""Scale-out benchmark: the seed's full ``osstune sft`` command on a random gpt-oss-20b checkpoint, per engine.

For each engine (``none`` = plain single process or DDP, ``zero2`` / ``zero3`` / ``zero3_offload`` = DeepSpeed
presets, ``fsdp`` = FSDP2 full_shard) this runs the command of ``examples/seed_swift.sh`` as a user would,
``NPROC_PER_NODE=N python -m osstune sft FLAGS``, in its own process, with the seed's flags except:

- ``--model``: the random checkpoint (``--write-model`` writes gpt-oss-20b's layout with random weights first,
  MXFP4 experts, about 13.8 GB; see ``osstune.models.gpt_oss.random_model``);
- ``--dataset``: a JSON array of conversations built from the bundled demo data (see ``build_dataset``);
- ``--deepspeed`` only for the DeepSpeed engines, ``--fsdp full_shard`` for ``fsdp``;
- ``--max_steps N``; ``--logging_steps 1`` (one log line per optimizer step: loss, tokens/s, peak memory);
- ``--report_to none`` (SwanLab is not installed on the benchmark machine);
- ``--save_strategy no``, which also turns evaluation off (it follows the save strategy): a ZeRO-3 save gathers the
  whole 16-bit model (``stage3_gather_16bit_weights_on_model_save``), minutes for the 20b, which would swamp a
  few-step measurement;
- ``--output_dir`` per engine.

Everything else (LoRA r8 alpha 32 all-linear plus experts, bf16, batch 1 x 16 accumulation, max_length 8192,
liger, lr 1e-4 with warmup, 4 data-loader workers...) is the seed's. The per-step lines of each run's
``logging.jsonl`` give the numbers: tokens/s (all tokens of all ranks; the first step, which holds compilation and
engine start-up, is left out when there are more), seconds per step, peak GPU memory (osstune logs
``torch.cuda.max_memory_allocated`` of the largest rank), first and last loss; nvidia-smi and the process tree's
resident memory are sampled every second for the peak device and host footprint. Prints a markdown table and the loss
agreement between engines (LoRA B starts at zero, so every engine's first loss is the base model's); with OUT
set, writes ``$OUT/scale_out.json`` (after every engine) and each engine's log. A failing engine does not stop
the others. A single-process DeepSpeed run that fails in DeepSpeed's MPI discovery (no launcher set ``RANK`` and
friends) is retried once with the variables DeepSpeed's launcher sets, and its row says so (``--launcher-env``).
``--tiny`` runs the same harness on the CPU with osstune's tiny random gpt-oss (engine ``none`` only, float32).
How to run it: bench/README.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import math
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
SEED_SCRIPT = ROOT / "examples" / "seed_swift.sh"
DEMO_DATA = ROOT / "src" / "osstune" / "resources" / "demo" / "catgirl.jsonl"

ENGINES: dict[str, tuple[str, ...]] = {
    "none": (),
    "zero2": ("--deepspeed", "zero2"),
    "zero3": ("--deepspeed", "zero3"),
    "zero3_offload": ("--deepspeed", "zero3_offload"),
    "fsdp": ("--fsdp", "full_shard"),
}
"""Engine name -> the flags that select it (the seed's own ``--deepspeed``/``--fsdp`` are removed first)."""

ENGINE_FLAGS = ("--deepspeed", "--fsdp")
"""Seed flags replaced by the engine's."""

OVERRIDES: dict[str, tuple[str, ...]] = {
    "--report_to": ("none",),
    "--save_strategy": ("no",),
    "--logging_steps": ("1",),
}
"""Seed flags whose values the benchmark changes (see the module docstring for why)."""

TINY_OVERRIDES: dict[str, tuple[str, ...]] = {"--torch_dtype": ("float32",)}
"""``--tiny`` changes: on a machine without CUDA, ``osstune sft --torch_dtype bfloat16`` stops in
``TrainingArguments`` ("Your setup doesn't support bf16/gpu"), so the CPU check trains in float32."""

LAUNCHER_ENV_TRIGGER = re.compile(r"mpi4py|mpi_discovery")
"""Traceback text showing that DeepSpeed, started without a launcher, failed to discover an MPI world."""

LOADED_LINE = re.compile(r"loaded .*?, (\d+(?:\.\d+)?)s(?:, experts kept as MXFP4)?\s*$")
"""osstune's one-line load summary, ending with the load time."""

KILL_GRACE_S = 30.0
"""Seconds between SIGTERM and SIGKILL when an engine runs past its time limit."""

LOG_TAIL_CHARS = 4000
"""Characters of each engine's log kept in the JSON and printed for a failed engine."""

LOG_OUT_BYTES = 2 * 2**20
"""Bytes of each engine's log copied to OUT (its end)."""


# --- the seed command ----------------------------------------------------------------------------------------


def seed_command(script: Path = SEED_SCRIPT) -> tuple[dict[str, str], list[str]]:
    """The environment assignments and the flags of the ``osstune sft`` command in the seed script.

    Args:
        script: the shell script holding one ``VAR=... osstune sft FLAGS`` command (lines joined by ``\\``).

    Returns:
        ``({VAR: value}, [flag tokens after "osstune sft"])``, shell quoting removed (``"$MODEL"`` -> ``$MODEL``).

    Raises:
        ValueError: the script has no ``osstune sft`` command.
    """
    text = script.read_text(encoding="utf-8").replace("\\\n", " ")
    for line in text.splitlines():
        tokens = shlex.split(line, comments=True)
        if "osstune" in tokens and tokens[tokens.index("osstune") + 1:][:1] == ["sft"]:
            at = tokens.index("osstune")
            env = dict(token.split("=", 1) for token in tokens[:at])
            return env, tokens[at + 2:]
    raise ValueError(f"{script}: no `osstune sft` command found")


def flag_groups(argv: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``--flag value...`` tokens as ``[(flag, [values])]``, in order.

    Args:
        argv: tokens starting with a flag.

    Raises:
        ValueError: a value before the first flag.
    """
    groups: list[tuple[str, list[str]]] = []
    for token in argv:
        if token.startswith("--"):
            groups.append((token, []))
        elif not groups:
            raise ValueError(f"value {token!r} before any flag")
        else:
            groups[-1][1].append(token)
    return groups


def run_overrides(*, model: str, dataset: str, output_dir: str, steps: int, tiny: bool) -> dict[str, tuple[str, ...]]:
    """Every seed flag one benchmark run replaces (or adds), with its value.

    Args:
        model: the model folder.
        dataset: the training file.
        output_dir: this run's output folder.
        steps: optimizer steps (``--max_steps``).
        tiny: the CPU check of the harness, which adds ``TINY_OVERRIDES``.
    """
    return {**OVERRIDES, **(TINY_OVERRIDES if tiny else {}), "--model": (model,), "--dataset": (dataset,),
            "--output_dir": (output_dir,), "--max_steps": (str(steps),)}


def engine_argv(seed_flags: Sequence[str], engine: str, overrides: dict[str, tuple[str, ...]]) -> list[str]:
    """The seed's flags for one benchmark run: its engine flags replaced by ``engine``'s, ``overrides`` applied.

    Args:
        seed_flags: the flags of the seed command (see ``seed_command``).
        engine: a key of ``ENGINES``.
        overrides: flags to replace or add (see ``run_overrides``); every other seed flag is kept as it is.
    """
    argv: list[str] = []
    for flag, values in flag_groups(seed_flags):
        if flag in ENGINE_FLAGS or flag in overrides:
            continue
        argv += [flag, *values]
    for flag, values in overrides.items():
        argv += [flag, *values]
    return argv + list(ENGINES[engine])


def seed_value(seed_flags: Sequence[str], flag: str) -> str:
    """The single value of a seed flag.

    Args:
        seed_flags: the flags of the seed command.
        flag: e.g. ``--gradient_accumulation_steps``.

    Raises:
        KeyError: the seed does not set it.
    """
    for name, values in flag_groups(seed_flags):
        if name == flag:
            return values[0]
    raise KeyError(flag)


# --- the training data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """One user question and the assistant's reasoning and answer, with their token counts.

    Args:
        question: the user message.
        thinking: the assistant's reasoning (harmony analysis channel).
        answer: the assistant's final answer.
        tokens: tokens of the three texts together.
    """

    question: str
    thinking: str
    answer: str
    tokens: int


def demo_exchanges(tokenizer: Any, path: Path = DEMO_DATA) -> list[Exchange]:
    """Every (user, assistant) pair of the bundled demo conversations, in file order.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` to count tokens with.
        path: a ``messages``-format JSONL file whose assistant turns carry ``thinking``.
    """
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"] if line.strip() else []
        for user, assistant in zip(messages, messages[1:]):
            if user["role"] == "user" and assistant["role"] == "assistant":
                pairs.append((user["content"], assistant.get("thinking") or "", assistant["content"]))
    counts = [len(e.ids) for e in tokenizer.encode_batch([f"{q}\n{t}\n{a}" for q, t, a in pairs],
                                                         add_special_tokens=False)]
    return [Exchange(q, t, a, n) for (q, t, a), n in zip(pairs, counts)]


def sample_targets(count: int, median: int, low: int, high: int, seed: int) -> list[int]:
    """Target token counts of ``count`` samples: lognormal (sigma 0.6) around ``median``, clipped to [low, high].

    Args:
        count: how many samples.
        median: the median target.
        low: the smallest target.
        high: the largest target.
        seed: seed of the draw.
    """
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(math.log(median), 0.6, count), low, high)]


def build_dataset(path: Path, exchanges: Sequence[Exchange], targets: Sequence[int], seed: int) -> dict[str, Any]:
    """Write a JSON array of one-turn conversations whose lengths follow ``targets``.

    Each sample strings together demo exchanges, taken in a seeded shuffled order (cycling), until its text reaches
    its target token count: the user asks all the questions, the assistant reasons with all the reasonings and
    answers with all the answers. The text is real (Chinese and English), the lengths are those of long
    reasoning traces, which the demo's own 100-token conversations are not.

    Args:
        path: the ``.json`` file to write.
        exchanges: the pieces (see ``demo_exchanges``).
        targets: one target token count per sample (see ``sample_targets``).
        seed: seed of the shuffle.

    Returns:
        The data's description: samples and their text tokens (mean, median, p90, max, total).
    """
    order = list(np.random.default_rng(seed).permutation(len(exchanges)))
    rows, lengths, at = [], [], 0
    for target in targets:
        picked: list[Exchange] = []
        while not picked or sum(e.tokens for e in picked) < target:
            picked.append(exchanges[order[at % len(order)]])
            at += 1
        rows.append({"messages": [
            {"role": "user", "content": "\n\n".join(e.question for e in picked)},
            {"role": "assistant", "thinking": " ".join(e.thinking for e in picked),
             "content": "\n\n".join(e.answer for e in picked)},
        ]})
        lengths.append(sum(e.tokens for e in picked))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    ordered = sorted(lengths)
    return {"path": str(path), "samples": len(rows), "source": str(DEMO_DATA.relative_to(ROOT)),
            "text_tokens": {"mean": round(statistics.fmean(lengths), 1), "median": statistics.median(lengths),
                            "p90": ordered[int(0.9 * (len(ordered) - 1))], "max": ordered[-1], "total": sum(lengths)}}


# --- running one engine ----------------------------------------------------------------------------------------


@dataclass
class Attempt:
    """One process run of one engine.

    Args:
        command: the shell command, environment prefix included.
        returncode: the process's exit status (None: killed at the time limit).
        wall_s: seconds from start to exit.
        log: the combined stdout/stderr file.
        peak_gpu_used_gib: the largest nvidia-smi ``memory.used`` of any visible GPU (all processes on it).
        peak_host_gib: the largest resident memory of the process tree.
    """

    command: str
    returncode: int | None
    wall_s: float
    log: str
    peak_gpu_used_gib: float | None
    peak_host_gib: float | None


def gpu_memory_used_gib() -> dict[int, float]:
    """nvidia-smi's ``memory.used`` per GPU index, in GiB (empty without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return {}
    used = {}
    for line in text.strip().splitlines():
        index, mib = (part.strip() for part in line.split(","))
        used[int(index)] = float(mib) / 1024
    return used


def tree_rss_gib(pid: int) -> float:
    """Resident memory of a process and all its descendants, in GiB (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**30


def run_command(argv: Sequence[str], env: dict[str, str], shown_env: dict[str, str], log: Path,
                timeout_s: float) -> Attempt:
    """Run one command in its own process group, sampling its memory every second, within a time limit.

    Past the limit the group gets SIGTERM (torchrun's agent forwards it to the workers), then SIGKILL after
    ``KILL_GRACE_S`` seconds.

    Args:
        argv: the command.
        env: its whole environment.
        shown_env: the variables named in the printed command.
        log: where its stdout and stderr go.
        timeout_s: the time limit in seconds.
    """
    command = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in shown_env.items()), shlex.join(argv)])
    log.parent.mkdir(parents=True, exist_ok=True)
    gpu_peak: float | None = None
    host_peak = 0.0
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as sink:
        sink.write(f"$ {command}\n")
        sink.flush()
        process = subprocess.Popen(list(argv), env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        deadline = started + timeout_s
        killed = False
        while process.poll() is None:
            used = gpu_memory_used_gib()
            if used:
                gpu_peak = max(gpu_peak or 0.0, max(used.values()))
            host_peak = max(host_peak, tree_rss_gib(process.pid))
            now = time.perf_counter()
            if now > deadline and not killed:
                sink.write(f"\n[scale_out] time limit of {timeout_s:.0f}s reached: SIGTERM\n")
                sink.flush()
                _signal_group(process.pid, signal.SIGTERM)
                killed = True
                deadline = now + KILL_GRACE_S
            elif now > deadline:
                _signal_group(process.pid, signal.SIGKILL)
            time.sleep(1.0)
    returncode = None if killed else process.returncode
    return Attempt(command, returncode, round(time.perf_counter() - started, 1), str(log), gpu_peak,
                   round(host_peak, 2))


def _signal_group(pid: int, signum: int) -> None:
    """Send a signal to the process group that ``run_command`` started (nothing if it is already gone)."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def child_env(nproc: int, tiny: bool, extra: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The environment of an ``osstune sft`` process, and the part of it worth printing.

    Args:
        nproc: ``NPROC_PER_NODE``.
        tiny: CPU run (no ``CUDA_VISIBLE_DEVICES``).
        extra: more variables (the launcher's, on a retry).
    """
    shown = {"NPROC_PER_NODE": str(nproc)}
    if not tiny:
        shown["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(nproc))))
    shown.update(extra)
    env = {**os.environ, **shown, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
    # After a SIGTERM at the time limit, torchrun's agent kills the workers after this long (osstune's default of
    # 300 s leaves them time to save a checkpoint, which a benchmark does not want).
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "20")
    return env, shown


def launcher_env() -> dict[str, str]:
    """What DeepSpeed's and torch's launchers set for a single process: rank 0 of a world of 1 on this host."""
    from osstune.train.launch import free_port

    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}


# --- reading a run ---------------------------------------------------------------------------------------------


@dataclass
class Summary:
    """What one run's ``logging.jsonl`` and log say.

    Args:
        steps: optimizer steps logged.
        tokens_per_s: tokens (all ranks) per second over the measured steps.
        s_per_step: seconds per optimizer step over the measured steps.
        measured_steps: which steps the two numbers above cover (the first step is left out when there are more).
        first_step_s: seconds from the trainer's start to the end of step 1 (engine start-up and compilation).
        tokens_per_step: mean tokens (all ranks) per measured step.
        peak_alloc_gib: the largest ``memory_gib`` logged (``torch.cuda.max_memory_allocated`` of the largest rank).
        losses: ``[step, loss]`` pairs.
        load_s: the model load time osstune printed, if found.
        run_dir: the run folder.
    """

    steps: int
    tokens_per_s: float | None
    s_per_step: float | None
    measured_steps: list[int]
    first_step_s: float | None
    tokens_per_step: float | None
    peak_alloc_gib: float | None
    losses: list[list[float]]
    load_s: float | None
    run_dir: str | None


def read_records(output_dir: Path) -> tuple[Path | None, list[dict[str, Any]]]:
    """The newest run folder under ``output_dir`` and the records of its ``logging.jsonl`` (none when missing).

    Args:
        output_dir: the run's ``--output_dir``.
    """
    runs = sorted(p for p in output_dir.glob("v*-*") if p.is_dir()) if output_dir.is_dir() else []
    if not runs:
        return None, []
    log = runs[-1] / "logging.jsonl"
    if not log.is_file():
        return runs[-1], []
    return runs[-1], [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]


def summarize(records: Sequence[dict[str, Any]], log_text: str, run_dir: Path | None) -> Summary:
    """Throughput, step time, memory and losses from a run's ``logging.jsonl`` records and its log.

    osstune's train records carry ``tokens_per_s`` over the interval since the previous log line and
    ``elapsed_s`` since the trainer started, taken at the same instant, so the tokens of an interval are
    ``tokens_per_s * (elapsed_s - previous elapsed_s)``.

    Args:
        records: the ``logging.jsonl`` records.
        log_text: the process's output (for the load time).
        run_dir: the run folder.
    """
    train = sorted((r for r in records if "loss" in r and "tokens_per_s" in r and "elapsed_s" in r),
                   key=lambda r: r["step"])
    load_s = None
    for line in log_text.splitlines():
        match = LOADED_LINE.search(line)
        if match:
            load_s = float(match.group(1))
    intervals = []
    previous_step, previous_time = 0, 0.0
    for record in train:
        seconds = record["elapsed_s"] - previous_time
        intervals.append((record["step"], record["step"] - previous_step, seconds, record["tokens_per_s"] * seconds))
        previous_step, previous_time = record["step"], record["elapsed_s"]
    measured = intervals[1:] if len(intervals) > 1 else intervals
    steps = sum(n for _, n, _, _ in measured)
    seconds = sum(s for _, _, s, _ in measured)
    tokens = sum(t for _, _, _, t in measured)
    memory = [r["memory_gib"] for r in train if "memory_gib" in r]
    return Summary(
        steps=train[-1]["step"] if train else 0,
        tokens_per_s=round(tokens / seconds, 1) if seconds > 0 else None,
        s_per_step=round(seconds / steps, 3) if steps else None,
        measured_steps=[step for step, _, _, _ in measured],
        first_step_s=round(intervals[0][2], 1) if intervals else None,
        tokens_per_step=round(tokens / steps, 1) if steps else None,
        peak_alloc_gib=max(memory) if memory else None,
        losses=[[r["step"], r["loss"]] for r in train],
        load_s=load_s,
        run_dir=str(run_dir) if run_dir else None,
    )


@dataclass
class EngineResult:
    """One engine's outcome.

    Args:
        engine: a key of ``ENGINES``.
        nproc: processes (GPUs).
        status: ``ok``, ``failed (exit N)``, ``timed out`` or ``no steps logged``.
        attempts: the process runs (two when the single-process DeepSpeed launcher environment was retried).
        summary: the numbers of the last attempt.
        notes: what a reader must know about this row.
        tail: the end of the last attempt's log.
    """

    engine: str
    nproc: int
    status: str
    attempts: list[Attempt]
    summary: Summary
    notes: list[str] = field(default_factory=list)
    tail: str = ""


def run_engine(engine: str, nproc: int, argv: list[str], *, tiny: bool, work: Path, output_dir: Path,
               timeout_s: float, launcher: str) -> EngineResult:
    """Run the seed command for one engine and read its results.

    With ``launcher`` ``auto``, a single-process DeepSpeed run that failed in DeepSpeed's MPI discovery (what
    ``deepspeed.initialize`` tries when no launcher set ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*``) is run
    again once with those variables set as the ``deepspeed`` launcher sets them, and the row says so; ``always``
    sets them from the start, ``never`` does not retry.

    Args:
        engine: a key of ``ENGINES``.
        nproc: ``NPROC_PER_NODE``.
        argv: the ``osstune sft`` flags.
        tiny: CPU run.
        work: the work folder (logs go to ``work/logs``).
        output_dir: the run's ``--output_dir`` (emptied first).
        timeout_s: time limit of one attempt.
        launcher: ``auto``, ``always`` or ``never``.
    """
    single_deepspeed = nproc == 1 and "--deepspeed" in argv
    extra = launcher_env() if single_deepspeed and launcher == "always" else {}
    attempts: list[Attempt] = []
    notes: list[str] = []
    while True:
        shutil.rmtree(output_dir, ignore_errors=True)
        env, shown = child_env(nproc, tiny, extra)
        log = work / "logs" / f"{engine}-n{nproc}-{len(attempts) + 1}.log"
        attempt = run_command([sys.executable, "-m", "osstune", "sft", *argv], env, shown, log, timeout_s)
        attempts.append(attempt)
        log_text = log.read_text(encoding="utf-8", errors="replace")
        run_dir, records = read_records(output_dir)
        summary = summarize(records, log_text, run_dir)
        retry = (launcher == "auto" and single_deepspeed and not extra and attempt.returncode not in (0, None)
                 and not summary.losses and LAUNCHER_ENV_TRIGGER.search(log_text) is not None)
        if not retry:
            break
        notes.append("the plain single-process DeepSpeed run failed in DeepSpeed's MPI discovery (no launcher "
                     "environment); retried with RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR/PORT as DeepSpeed's "
                     f"launcher sets them (first log: {attempt.log})")
        extra = launcher_env()
    if extra and not notes:
        notes.append("run with the launcher environment RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR/PORT")
    if attempt.returncode is None:
        status = "timed out"
    elif attempt.returncode != 0:
        status = f"failed (exit {attempt.returncode})"
    elif not summary.losses:
        status = "no steps logged"
    else:
        status = "ok"
    if summary.measured_steps and len(summary.losses) == 1:
        notes.append("one step only: its time includes start-up and compilation")
    return EngineResult(engine, nproc, status, attempts, summary, notes, log_text[-LOG_TAIL_CHARS:])


# --- the report --------------------------------------------------------------------------------------------------


def loss_agreement(results: Sequence[EngineResult]) -> list[str]:
    """Lines comparing each engine's per-step losses with the first engine that logged any.

    Args:
        results: the engines' results, in run order.
    """
    logged = [r for r in results if r.summary.losses]
    if len(logged) < 2:
        return []
    base = logged[0]
    base_losses = dict((int(s), loss) for s, loss in base.summary.losses)
    lines = []
    for other in logged[1:]:
        pairs = [(int(s), loss, base_losses[int(s)]) for s, loss in other.summary.losses if int(s) in base_losses]
        if not pairs:
            lines.append(f"loss {other.engine} vs {base.engine}: no common step")
            continue
        first = pairs[0][1] - pairs[0][2]
        worst = max(abs(a - b) for _, a, b in pairs)
        lines.append(f"loss {other.engine} vs {base.engine}: step {pairs[0][0]} differs by {first:+.4f}, at most "
                     f"{worst:.4f} over {len(pairs)} common steps")
    return lines


def _cell(value: float | None, digits: int) -> str:
    """A number for the table, ``-`` when missing."""
    return "-" if value is None else f"{value:,.{digits}f}"


def table(results: Sequence[EngineResult]) -> str:
    """The markdown table of the engines' results.

    Args:
        results: the engines' results, in run order.
    """
    lines = ["| engine | nproc | status | steps | tokens/s total | tokens/s per GPU | s/step | tokens/step | "
             "step 1 s | load s | peak alloc GiB | peak GPU used GiB | peak host GiB | loss first -> last |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        s = r.summary
        per_gpu = s.tokens_per_s / r.nproc if s.tokens_per_s is not None else None
        attempt = r.attempts[-1]
        losses = f"{s.losses[0][1]:.4f} -> {s.losses[-1][1]:.4f}" if s.losses else "-"
        lines.append(f"| {r.engine} | {r.nproc} | {r.status} | {s.steps} | {_cell(s.tokens_per_s, 0)} | "
                     f"{_cell(per_gpu, 0)} | {_cell(s.s_per_step, 2)} | {_cell(s.tokens_per_step, 0)} | "
                     f"{_cell(s.first_step_s, 1)} | {_cell(s.load_s, 1)} | {_cell(s.peak_alloc_gib, 1)} | "
                     f"{_cell(attempt.peak_gpu_used_gib, 1)} | {_cell(attempt.peak_host_gib, 1)} | {losses} |")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Package versions and GPUs, read without importing torch or touching a GPU from this process."""
    versions = {}
    for name in ("torch", "transformers", "accelerate", "peft", "deepspeed", "liger-kernel", "triton"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    gpus = []
    if shutil.which("nvidia-smi"):
        try:
            gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=10, check=True).stdout.strip().splitlines()
        except (subprocess.SubprocessError, OSError):
            gpus = []
    return {"python": sys.version.split()[0], "packages": versions, "gpus": gpus}


def save(record: dict[str, Any], out_dir: str | None) -> None:
    """Write the record to ``OUT/scale_out.json`` when OUT is set.

    Args:
        record: everything measured so far.
        out_dir: the OUT folder, or None to write nothing.
    """
    if not out_dir:
        return
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "scale_out.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")


def copy_log(log: Path, out_dir: str | None) -> None:
    """Copy the end of a log (``LOG_OUT_BYTES`` at most) to OUT when OUT is set.

    Args:
        log: the log file.
        out_dir: the OUT folder, or None.
    """
    if not out_dir or not log.is_file():
        return
    data = log.read_bytes()[-LOG_OUT_BYTES:]
    (Path(out_dir) / f"scale_out-{log.stem}.log").write_bytes(data)


# --- the model -------------------------------------------------------------------------------------------------


def install_vocabulary(source: Path) -> str:
    """Put the o200k_base BPE file where osstune's offline tokenizer looks first, for machines without bpe-openai.

    Args:
        source: ``o200k_base.tiktoken`` or its ``.gz`` (as the bpe-openai wheel ships it).

    Returns:
        What was done, for the log.

    Raises:
        SystemExit: the file is not o200k_base (wrong sha256).
    """
    from osstune.chat.tokenizer import O200K_BASE_FILENAME, O200K_BASE_SHA256, default_cache_dir

    target = default_cache_dir() / O200K_BASE_SHA256 / O200K_BASE_FILENAME
    if target.is_file():
        return f"o200k_base vocabulary already at {target}"
    data = source.read_bytes()
    if source.suffix == ".gz":
        data = gzip.decompress(data)
    if hashlib.sha256(data).hexdigest() != O200K_BASE_SHA256:
        raise SystemExit(f"{source}: not the o200k_base vocabulary (sha256 differs from {O200K_BASE_SHA256})")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, target)
    return f"o200k_base vocabulary installed from {source} to {target}"


def folder_gb(path: Path) -> float:
    """Size of the files in a folder, in GB (10^9 bytes)."""
    return round(sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 1e9, 2)


def write_checkpoint_here(path: Path, tiny: bool, seed: int) -> None:
    """Write the random checkpoint in this process (the body of ``write_model``'s child process).

    Args:
        path: the model folder.
        tiny: osstune's tiny gpt-oss (``osstune.models.gpt_oss.tiny``, MXFP4 experts); else gpt-oss-20b, drawn on
            CUDA (on the CPU when there is none).
        seed: seed of the weights.
    """
    import torch

    from osstune.models.gpt_oss.random_model import write_random_checkpoint
    from osstune.models.gpt_oss.tiny import write_tiny_model

    if tiny:
        write_tiny_model(path, mxfp4=True, seed=seed)
    else:
        write_random_checkpoint(path, "20b", seed=seed, device="cuda" if torch.cuda.is_available() else "cpu")


def write_model(path: Path, tiny: bool, seed: int) -> dict[str, Any]:
    """Write the random checkpoint in a child process (so this process never holds GPU memory), unless present.

    Args:
        path: the model folder.
        tiny: osstune's tiny gpt-oss; else gpt-oss-20b.
        seed: seed of the weights.

    Returns:
        ``{"path", "written", "seconds", "gb"}``.

    Raises:
        SystemExit: the child process failed (its traceback is printed above).
    """
    if (path / "config.json").is_file():
        return {"path": str(path), "written": False, "seconds": 0.0, "gb": folder_gb(path)}
    started = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(target=write_checkpoint_here, args=(path, tiny, seed))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"writing the random checkpoint to {path} failed (exit {child.exitcode})")
    return {"path": str(path), "written": True, "seconds": round(time.perf_counter() - started, 1),
            "gb": folder_gb(path)}


# --- main --------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="model folder (default /tmp/gpt-oss-20b-random, or WORK/tiny-random with --tiny)")
    parser.add_argument("--write-model", action="store_true",
                        help="write the random checkpoint into --model first, unless it is already there")
    parser.add_argument("--engines", default=None,
                        help=f"comma-separated, from {', '.join(ENGINES)} (default none,zero3; none with --tiny)")
    parser.add_argument("--nproc", type=int, default=1, help="NPROC_PER_NODE (GPUs) for every engine")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per engine (--max_steps)")
    parser.add_argument("--samples", type=int, default=None,
                        help="conversations in the built dataset (default: enough for --steps, plus 10%%)")
    parser.add_argument("--median-tokens", type=int, default=None,
                        help="median text tokens per sample (default 1024; 96 with --tiny)")
    parser.add_argument("--dataset", type=Path, default=None, help="use this training file instead of building one")
    parser.add_argument("--work", type=Path, default=Path("/tmp/scale_out"), help="data, run folders and logs")
    parser.add_argument("--engine-timeout-s", type=float, default=300.0, help="time limit of each engine's run")
    parser.add_argument("--launcher-env", choices=("auto", "always", "never"), default="auto",
                        help="single-process DeepSpeed: retry with the launcher's RANK/WORLD_SIZE/MASTER_* "
                             "variables when DeepSpeed's MPI discovery fails (auto), set them from the start "
                             "(always), or never")
    parser.add_argument("--vocab-file", type=Path, default=None,
                        help="o200k_base.tiktoken(.gz) for writing the tokenizer where bpe-openai is not installed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the data")
    parser.add_argument("--tiny", action="store_true",
                        help="osstune's tiny random gpt-oss on the CPU, engine none only, to check the harness")
    args = parser.parse_args(argv)
    engines = args.engines if args.engines is not None else ("none" if args.tiny else "none,zero3")
    args.engines = [e.strip() for e in engines.split(",") if e.strip()]
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown or not args.engines:
        parser.error(f"--engines: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(ENGINES)}")
    if args.tiny and args.engines != ["none"]:
        parser.error("--tiny runs on the CPU: DeepSpeed and FSDP need CUDA here, so only --engines none")
    if args.steps < 1 or args.nproc < 1:
        parser.error("--steps and --nproc must be >= 1")
    if args.model is None:
        args.model = args.work / "tiny-random" if args.tiny else Path("/tmp/gpt-oss-20b-random")
    if args.median_tokens is None:
        args.median_tokens = 96 if args.tiny else 1024
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Write the model if asked, build the data, run every engine, print and save the results.

    Args:
        argv: command-line arguments (None: ``sys.argv[1:]``).

    Returns:
        0 when every engine ran its steps, 1 otherwise.
    """
    args = parse_args(argv)
    out_dir = os.environ.get("OUT")
    started = time.perf_counter()
    changed = {**OVERRIDES, **(TINY_OVERRIDES if args.tiny else {})}
    record: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "environment": environment(),
                              "overrides": {k: list(v) for k, v in changed.items()}, "engines": []}
    if args.vocab_file is not None:
        record["vocabulary"] = install_vocabulary(args.vocab_file)
        print(record["vocabulary"], flush=True)
    if args.write_model:
        record["model"] = write_model(args.model, args.tiny, args.seed)
        model = record["model"]
        print(f"model {model['path']}: " + (f"written in {model['seconds']} s, {model['gb']} GB" if model["written"]
                                            else f"already there ({model['gb']} GB), not rewritten"), flush=True)
    seed_env, seed_flags = seed_command()
    record["seed"] = {"env": seed_env, "flags": seed_flags}
    if args.dataset is None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
        per_step = (int(seed_value(seed_flags, "--gradient_accumulation_steps"))
                    * int(seed_value(seed_flags, "--per_device_train_batch_size")) * args.nproc)
        samples = args.samples or math.ceil(args.steps * per_step * 1.1) + 4
        high = int(seed_value(seed_flags, "--max_length")) - 512
        targets = sample_targets(samples, args.median_tokens, 32, high, args.seed)
        record["data"] = build_dataset(args.work / "train.json", demo_exchanges(tokenizer), targets, args.seed)
        dataset = args.work / "train.json"
    else:
        record["data"] = {"path": str(args.dataset)}
        dataset = args.dataset
    print(f"data: {json.dumps(record['data'])}", flush=True)
    save(record, out_dir)

    results: list[EngineResult] = []
    for engine in args.engines:
        output_dir = args.work / "runs" / f"{engine}-n{args.nproc}"
        overrides = run_overrides(model=str(args.model), dataset=str(dataset), output_dir=str(output_dir),
                                  steps=args.steps, tiny=args.tiny)
        argv_engine = engine_argv(seed_flags, engine, overrides)
        print(f"[{engine}] running {args.steps} steps on {args.nproc} process(es)...", flush=True)
        result = run_engine(engine, args.nproc, argv_engine, tiny=args.tiny, work=args.work, output_dir=output_dir,
                            timeout_s=args.engine_timeout_s, launcher=args.launcher_env)
        results.append(result)
        s = result.summary
        print(f"[{engine}] {result.status} in {result.attempts[-1].wall_s} s: tokens/s {_cell(s.tokens_per_s, 0)}, "
              f"s/step {_cell(s.s_per_step, 2)}, peak alloc {_cell(s.peak_alloc_gib, 1)} GiB", flush=True)
        for note in result.notes:
            print(f"[{engine}] note: {note}", flush=True)
        if result.status != "ok":
            print(f"[{engine}] end of its log ({result.attempts[-1].log}):\n{result.tail}", flush=True)
        for attempt in result.attempts:
            copy_log(Path(attempt.log), out_dir)
        record["engines"].append(asdict(result))
        save(record, out_dir)

    record["loss_agreement"] = loss_agreement(results)
    record["total_s"] = round(time.perf_counter() - started, 1)
    save(record, out_dir)
    print()
    print(f"seed command: {' '.join(f'{k}={v}' for k, v in seed_env.items())} osstune sft {shlex.join(seed_flags)}")
    print(f"changed for the benchmark: {', '.join(f'{k} {v[0]}' for k, v in changed.items())}, --max_steps "
          f"{args.steps}, --model, --dataset, --output_dir; engine flags per row")
    print(f"data: {record['data'].get('samples', '?')} samples, text tokens {record['data'].get('text_tokens', '?')}")
    print(table(results))
    for line in record["loss_agreement"]:
        print(line)
    print(f"total {record['total_s']} s")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
