"""``osstune eval``: loss, perplexity and token accuracy on the trained tokens, generation metrics against
reference answers, and a side-by-side comparison of a base and a fine-tuned model.

Both halves use what training used. Scoring renders ``--val_dataset`` with the training pipeline
(:func:`~osstune.data.pipeline.prepare_dataset`) and the run's rendering options and ``--loss_scale``, and scores
the supervised tokens with :func:`~osstune.eval.scoring.teacher_forced_scores`. Generation prompts each record with
its conversation up to its last assistant turn, rendered by the training renderer, and compares the reply's final
answer with that turn's content (records whose last assistant turn is a tool call have no text reference and are
left out of the generation metrics).

In a comparison both models see the same records, rendered with the same options: those of the evaluated
(fine-tuned) model's run. ``--compare base`` evaluates the adapter's own base by switching the adapter off, so the
weights are loaded once; ``--compare DIR`` loads DIR after the first model has been released.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

import osstune
from osstune.chat.messages import Conversation, Message
from osstune.chat.options import LOSS_SCALES, REASONING_EFFORTS, RenderOptions
from osstune.chat.render import render_prompt
from osstune.config import DataArgs, flag
from osstune.data.formats import detect_format, parse_record
from osstune.data.pipeline import prepare_dataset
from osstune.data.sources import load_records, parse_dataset_spec
from osstune.errors import DataError, OsstuneError
from osstune.eval.metrics import (
    BLEU_TOKENIZERS,
    corpus_bleu,
    corpus_chrf,
    exact_match_count,
    length_stats,
    resolve_bleu_tokenize,
)
from osstune.eval.report import EvalReport, ModelResult, metrics_table, write_outputs
from osstune.eval.scoring import Scores, teacher_forced_scores
from osstune.infer.generate import Reply, generate_batch
from osstune.infer.loading import load_for_inference, resolve_base
from osstune.progress import progress_bar

DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")


@dataclass
class EvalArgs:
    """Flags of ``osstune eval``."""

    model: str | None = flag(None, "Base or merged model folder; with --adapters, overrides the base recorded in "
                                   "the run's args.json.")
    adapters: str | None = flag(None, "LoRA checkpoint written by osstune sft (its base model comes from args.json).")
    compare: str | None = flag(None, "Also evaluate this model and show both side by side with deltas: a model "
                                     "folder, or 'base' for the adapter's own base model without the adapter.")
    val_dataset: list[str] = flag([], "Evaluation data (same syntax as --dataset); the last assistant turn of each "
                                      "record is the reference answer.")
    max_samples: int | None = flag(None, "Evaluate only the first N records.")
    max_new_tokens: int = flag(2048, "Generation budget per record (reasoning included).")
    max_batch_size: int = flag(8, "Records per generation batch and per scoring forward pass.")
    temperature: float = flag(0.0, "Sampling temperature; 0 is greedy decoding (deterministic).")
    torch_dtype: str = flag("auto", "Dtype of the weights; auto takes the one training used.", choices=DTYPES)
    loss_scale: str | None = flag(None, "Which tokens are scored; default: the run's --loss_scale, else default.",
                                  choices=LOSS_SCALES)
    bleu_tokenize: str = flag("auto", "sacrebleu tokenizer for BLEU; auto picks zh for Chinese, char for Japanese "
                                      "and Korean, 13a otherwise.", choices=BLEU_TOKENIZERS)
    current_date: str | None = flag(None, "Date in the harmony system message; default: the run's (args.json).")
    reasoning_effort: str | None = flag(None, "Reasoning effort; default: the run's.", choices=REASONING_EFFORTS)
    model_identity: str | None = flag(None, "First line of the harmony system message; default: the run's.")
    system: str | None = flag(None, "Developer instructions for records without a system message; default: the "
                                    "run's.")
    output_dir: str | None = flag(None, "Where results.json, generations.jsonl, eval_metrics.png and "
                                        "eval_report.html go; default: the run folder's eval/ for --adapters, else "
                                        "./eval/.")


@dataclass(frozen=True)
class GenerationRecord:
    """One record of the generation metrics.

    Args:
        source: the file (or dataset name) it came from.
        index: its 0-based index within the source.
        prompt: the conversation up to (without) its last assistant turn.
        tools: function definitions offered to the model.
        reference: the last assistant turn's content.
    """

    source: str
    index: int
    prompt: tuple[Message, ...]
    tools: tuple[dict[str, Any], ...]
    reference: str


def eval_data_args(val_dataset: Sequence[str], run_args: dict[str, Any]) -> DataArgs:
    """The data flags that read ``--val_dataset`` as training read its data (seed, length limit, self-cognition names).

    Args:
        val_dataset: the evaluation sources.
        run_args: the training run's ``args.json`` (empty without one).
    """
    defaults = DataArgs()
    return DataArgs(
        dataset=list(val_dataset),
        seed=run_args.get("seed", defaults.seed),
        max_length=run_args.get("max_length"),
        truncation_strategy=run_args.get("truncation_strategy", defaults.truncation_strategy),
        model_name=list(run_args.get("model_name") or []),
        model_author=list(run_args.get("model_author") or []),
    )


def read_conversations(args: DataArgs, max_samples: int | None = None) -> list[Conversation]:
    """Parse every record of ``args.dataset`` in dataset order (``#N`` sampling as the training pipeline does it).

    Args:
        args: data flags (sources, seed, self-cognition names).
        max_samples: keep only the first N records.

    Raises:
        DataError: a malformed record (one without an assistant turn included), located by file and line.
    """
    out: list[Conversation] = []
    for text in args.dataset:
        formats: dict[str, str] = {}
        spec = parse_dataset_spec(text)
        for rec in load_records(spec, seed=args.seed, model_name=args.model_name, model_author=args.model_author):
            try:
                fmt = detect_format(rec.data, rec.source, locator=rec.locator, expected=formats.get(rec.source))
                formats.setdefault(rec.source, fmt)
                conv = parse_record(rec.data, fmt, source=rec.source, index=rec.index)
            except DataError as exc:
                raise exc.located(rec.source, rec.locator) from None
            out.append(conv)
            if max_samples is not None and len(out) >= max_samples:
                return out
    return out


def generation_records(conversations: Sequence[Conversation]) -> tuple[list[GenerationRecord], int]:
    """Split each conversation at its last assistant turn into prompt and reference.

    Args:
        conversations: parsed records, each with at least one assistant turn.

    Returns:
        The records with a text reference, and how many were left out because their last assistant turn is a
        tool call.
    """
    records, tool_calls = [], 0
    for conv in conversations:
        last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
        turn = conv.messages[last]
        if turn.tool_calls:
            tool_calls += 1
            continue
        records.append(GenerationRecord(conv.source, conv.index, conv.messages[:last], conv.tools, turn.content))
    return records, tool_calls


def score_samples(model: Any, input_ids: Sequence[Any], labels: Sequence[Any], batch_size: int,
                  description: str) -> Scores:
    """:func:`teacher_forced_scores` over all samples, one forward pass per ``batch_size`` samples, with progress.

    Args:
        model: the model.
        input_ids: one id sequence per sample.
        labels: unshifted labels per sample.
        batch_size: samples per forward pass.
        description: the progress bar's label.
    """
    with progress_bar(description, total=len(input_ids), unit="sample") as advance:
        return teacher_forced_scores(model, list(input_ids), list(labels), batch_size=batch_size, on_batch=advance)


@dataclass(frozen=True)
class EvalPlan:
    """What every evaluated model is evaluated on, and how.

    Args:
        data: the data flags (``dataset`` is ``--val_dataset``).
        keys: ``(source, index)`` of the evaluated records (all, or the first ``--max_samples``).
        records: the generation records.
        options: rendering options, ``loss_scale`` included.
        bleu_tokenize: the sacrebleu tokenizer BLEU uses.
        max_new_tokens: generation budget per record.
        temperature: sampling temperature (0: greedy).
        batch_size: records per generation batch and samples per scoring pass.
    """

    data: DataArgs
    keys: frozenset[tuple[str, int]]
    records: tuple[GenerationRecord, ...]
    options: RenderOptions
    bleu_tokenize: str
    max_new_tokens: int
    temperature: float
    batch_size: int


def evaluate_model(
    model: Any, tokenizer: Any, plan: EvalPlan, label: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score and generate with one model.

    Args:
        model: the model (with or without an active adapter).
        tokenizer: its tokenizer.
        plan: the data and settings.
        label: its name in progress bars.

    Returns:
        The metrics (keys of :data:`osstune.eval.report.METRICS`) and one generation dict per record.

    Raises:
        OsstuneError: no scorable samples, or a prompt that does not fit the model's context.
    """
    rendered = prepare_dataset(plan.data, plan.options, tokenizer)
    prepared = rendered.train
    chosen = [i for i in range(len(prepared)) if (prepared.sources[i], prepared.indices[i]) in plan.keys]
    if not chosen:
        dropped = "; ".join(f"{n} {reason}" for reason, n in rendered.report.dropped.items()) or "none dropped"
        raise OsstuneError(f"None of the evaluated records is left to score after rendering ({dropped}). Evaluate "
                           "more records (--max_samples) or shorter ones.")
    scores = score_samples(model, [prepared.input_ids[i] for i in chosen], [prepared.labels[i] for i in chosen],
                           plan.batch_size, f"Scoring ({label})")
    metrics: dict[str, Any] = {"loss": scores.loss, "perplexity": scores.perplexity,
                               "token_accuracy": scores.accuracy, "scored_tokens": scores.tokens,
                               "scored_samples": len(chosen)}
    replies = generate_replies(model, tokenizer, plan, label)
    generations = []
    for record, reply in zip(plan.records, replies):
        generations.append({"response": reply.final, "reasoning": reply.reasoning, "finished": reply.finished,
                            "completion_tokens": len(reply.token_ids),
                            "exact_match": reply.final.strip() == record.reference.strip()})
    metrics.update(generation_metrics(tokenizer, plan, replies))
    return metrics, generations


def generate_replies(model: Any, tokenizer: Any, plan: EvalPlan, label: str) -> list[Reply]:
    """Answer every generation record, ``plan.batch_size`` at a time, with a progress bar.

    Args:
        model: the model.
        tokenizer: its tokenizer.
        plan: the records and generation settings.
        label: its name in the progress bar.

    Raises:
        OsstuneError: a prompt that leaves no room to generate within the model's context, naming its record.
    """
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None:
        for record in plan.records:
            length = len(render_prompt(record.prompt, tokenizer, plan.options, record.tools))
            if length >= context:
                raise OsstuneError(f"{record.source}, record {record.index}: the prompt has {length:,} tokens, but "
                                   f"the model's context is {context:,}. Shorten or remove the record.")
    replies: list[Reply] = []
    records = plan.records
    with progress_bar(f"Generating ({label})", total=len(records), unit="sample") as advance:
        for start in range(0, len(records), plan.batch_size):
            batch = records[start:start + plan.batch_size]
            replies += generate_batch(model, tokenizer, [r.prompt for r in batch], plan.options,
                                      max_new_tokens=plan.max_new_tokens, temperature=plan.temperature,
                                      tools=[r.tools for r in batch], max_context=context)
            advance(len(batch))
    return replies


def generation_metrics(tokenizer: Any, plan: EvalPlan, replies: Sequence[Reply]) -> dict[str, Any]:
    """Exact match, BLEU, chrF and length statistics of the replies (None for each without records).

    Args:
        tokenizer: the model's tokenizer (lengths are counted in its tokens).
        plan: the records and the BLEU tokenizer.
        replies: one reply per record.
    """
    keys = ("exact_match", "exact_match_count", "bleu", "chrf", "response_tokens_mean", "response_tokens_median",
            "reference_tokens_mean", "reference_tokens_median", "completion_tokens_mean", "finished_share")
    if not replies:
        return dict.fromkeys(keys)
    responses = [r.final for r in replies]
    references = [r.reference for r in plan.records]
    matches = exact_match_count(responses, references)

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    lengths = length_stats([count(r) for r in responses], [count(r) for r in references],
                           [len(r.token_ids) for r in replies], [r.finished for r in replies])
    return {
        "exact_match": matches / len(replies), "exact_match_count": matches,
        "bleu": corpus_bleu(responses, references, plan.bleu_tokenize).score,
        "chrf": corpus_chrf(responses, references).score,
        "response_tokens_mean": lengths.response_mean, "response_tokens_median": lengths.response_median,
        "reference_tokens_mean": lengths.reference_mean, "reference_tokens_median": lengths.reference_median,
        "completion_tokens_mean": lengths.completion_mean, "finished_share": lengths.finished_share,
    }


def _check_flags(cmd: EvalArgs) -> None:
    if not cmd.val_dataset:
        raise OsstuneError("osstune eval needs --val_dataset FILE...: records whose last assistant turn is the "
                           "expected answer.")
    for name in ("max_new_tokens", "max_batch_size", "max_samples"):
        value = getattr(cmd, name)
        if value is not None and value < 1:
            raise OsstuneError(f"--{name} {value}: must be at least 1.")
    if cmd.temperature < 0:
        raise OsstuneError(f"--temperature {cmd.temperature}: must be 0 (greedy) or positive.")
    if cmd.compare == "base" and not cmd.adapters:
        raise OsstuneError("--compare base compares an adapter with its own base model: give --adapters CKPT, or "
                           "give --compare BASE_MODEL_DIR.")


def _free_memory() -> None:
    """Collect released objects, then return cached CUDA blocks."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate(cmd: EvalArgs, console: Console) -> EvalReport:
    """Run the evaluation that ``cmd`` describes (no files are written).

    Args:
        cmd: the flags.
        console: where loading messages go.

    Raises:
        OsstuneError: bad flags, data, models or adapters.
    """
    _check_flags(cmd)
    # The data is read and checked before any weights are loaded, so that a bad record fails fast.
    _, run_args = resolve_base(Path(cmd.adapters) if cmd.adapters else None, cmd.model)
    data = eval_data_args(cmd.val_dataset, run_args)
    conversations = read_conversations(data, cmd.max_samples)
    records, tool_calls = generation_records(conversations)
    bleu_tokenize = resolve_bleu_tokenize(cmd.bleu_tokenize, [r.reference for r in records])
    overrides = {k: getattr(cmd, k) for k in ("current_date", "reasoning_effort", "model_identity", "system")}
    loaded = load_for_inference(model=cmd.model, adapters=cmd.adapters, torch_dtype=cmd.torch_dtype,
                                console=console, **overrides)
    options = dataclasses.replace(loaded.options, loss_scale=cmd.loss_scale or run_args.get("loss_scale") or "default")
    plan = EvalPlan(data=data, keys=frozenset((c.source, c.index) for c in conversations), records=tuple(records),
                    options=options, bleu_tokenize=bleu_tokenize, max_new_tokens=cmd.max_new_tokens,
                    temperature=cmd.temperature, batch_size=cmd.max_batch_size)
    tuned_label = "fine-tuned" if cmd.compare else "model"
    model_dir, adapter_dir = str(loaded.base_dir), (str(loaded.adapter_dir) if loaded.adapter_dir else None)
    metrics, generations = evaluate_model(loaded.model, loaded.tokenizer, plan, tuned_label)
    results = [ModelResult(tuned_label, model_dir, adapter_dir, metrics, generations)]
    if cmd.compare == "base":
        with loaded.model.disable_adapter():
            metrics, generations = evaluate_model(loaded.model, loaded.tokenizer, plan, "base")
        results.insert(0, ModelResult("base", model_dir, None, metrics, generations))
    elif cmd.compare:
        loaded.model = None  # the only reference: release the first model before loading the second
        _free_memory()
        dtype = run_args.get("torch_dtype", "auto") if cmd.torch_dtype == "auto" else cmd.torch_dtype
        other = load_for_inference(model=cmd.compare, torch_dtype=dtype, console=console)
        metrics, generations = evaluate_model(other.model, other.tokenizer, plan, "base")
        results.insert(0, ModelResult("base", str(other.base_dir), None, metrics, generations))
    settings = {
        "osstune_version": osstune.__version__, "val_dataset": list(cmd.val_dataset), "records": len(conversations),
        "generation_records": len(records), "left_out_tool_call_references": tool_calls, "max_samples": cmd.max_samples,
        "max_length": data.max_length, "truncation_strategy": data.truncation_strategy,
        "render": dataclasses.asdict(options), "max_new_tokens": cmd.max_new_tokens,
        "temperature": cmd.temperature, "max_batch_size": cmd.max_batch_size, "torch_dtype": cmd.torch_dtype,
        "bleu_tokenize": plan.bleu_tokenize, **_signatures(plan, generations),
    }
    return EvalReport(results=results, records=[_record_dict(r) for r in records], settings=settings)


def _signatures(plan: EvalPlan, generations: Sequence[dict[str, Any]]) -> dict[str, str | None]:
    """sacrebleu's reproducibility signatures of the BLEU and chrF scores (None without generation records)."""
    if not plan.records:
        return {"bleu_signature": None, "chrf_signature": None}
    responses = [g["response"] for g in generations]
    references = [r.reference for r in plan.records]
    return {"bleu_signature": corpus_bleu(responses, references, plan.bleu_tokenize).signature,
            "chrf_signature": corpus_chrf(responses, references).signature}


def _record_dict(record: GenerationRecord) -> dict[str, Any]:
    return {"source": record.source, "index": record.index,
            "messages": [m.to_dict() for m in record.prompt], "reference": record.reference}


def default_output_dir(cmd: EvalArgs) -> Path:
    """``--output_dir``, else the run folder's ``eval/`` (the checkpoint's parent) for ``--adapters``, else
    ``./eval``.

    Args:
        cmd: the flags.
    """
    if cmd.output_dir:
        return Path(cmd.output_dir)
    if cmd.adapters:
        return Path(cmd.adapters).resolve().parent / "eval"
    return Path("eval")


def run(args: dict[type, Any]) -> int:
    """Run ``osstune eval`` with parsed flag groups: evaluate, print the table, write the files; returns 0."""
    cmd: EvalArgs = args[EvalArgs]
    console = Console()
    report = evaluate(cmd, console)
    console.print(metrics_table(report))
    paths = write_outputs(report, default_output_dir(cmd))
    for path in paths.values():
        console.print(f"wrote {path}")
    return 0
