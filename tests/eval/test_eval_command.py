"""`osstune eval` on the tiny gpt-oss with a real adapter: base vs fine-tuned, the written report files, the printed
table against results.json, scores against a direct teacher-forced computation, and the errors."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sacrebleu
from rich.console import Console

from osstune.chat.messages import Conversation, Message, ToolCall
from osstune.chat.options import IGNORE_INDEX, RenderOptions
from osstune.config import DataArgs, TemplateArgs
from osstune.data.pipeline import prepare_dataset
from osstune.errors import DataError, OsstuneError
from osstune.eval import command
from osstune.eval.command import EvalArgs, default_output_dir, evaluate, generation_records, run
from osstune.eval.report import METRICS, format_metric
from osstune.eval.scoring import teacher_forced_scores
from osstune.infer.generate import Reply
from osstune.infer.loading import load_for_inference
from osstune.models.local import load_tokenizer
from osstune.train.args import LoadArgs, LoraArgs, SftDataArgs, TrackArgs, TrainArgs
from osstune.train.sft import SftConfig, train

DATE = "2026-01-01"
RECORDS = 16
EVALUATED = 8


def question(i: int) -> str:
    return f"What is {i} plus {i}?"


def answer(i: int) -> str:
    return f"{2 * i}, nya~"


@pytest.fixture(scope="module")
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A dataset cache of this module's own (prepare_dataset caches rendered samples on disk)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OSSTUNE_DATASET_CACHE", str(tmp_path_factory.mktemp("dataset-cache")))
        yield


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("eval-data") / "sums.jsonl"
    rows = [{"messages": [{"role": "user", "content": question(i)},
                          {"role": "assistant", "thinking": f"Add {i} and {i}.", "content": answer(i)}]}
            for i in range(RECORDS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def checkpoint(isolated_cache: None, tiny_model_dir: Path, data_file: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA checkpoint trained on ``data_file`` long enough to lower its loss clearly (a few seconds on CPU)."""
    cfg = SftConfig(
        load=LoadArgs(model=str(tiny_model_dir), torch_dtype="float32"),
        data=SftDataArgs(dataset=[str(data_file)], split_dataset_ratio=0.0, seed=7),
        template=TemplateArgs(current_date=DATE),
        lora=LoraArgs(lora_rank=4, lora_alpha=8, lora_dropout=0.0),
        train=TrainArgs(output_dir=str(tmp_path_factory.mktemp("runs")), max_steps=4, save_steps=4,
                        learning_rate=1e-2, per_device_train_batch_size=4, logging_steps=5,
                        gradient_checkpointing=False, eval_generation_samples=0),
        track=TrackArgs(report_to=["none"]),
    )
    result = train(cfg)
    assert result.exit_code == 0 and result.last_checkpoint is not None
    return result.last_checkpoint


@pytest.fixture(scope="module")
def compare_run(checkpoint: Path, data_file: Path) -> dict[str, Any]:
    """``osstune eval --adapters CKPT --compare base`` with the default output folder; its stdout and files."""
    args = EvalArgs(adapters=str(checkpoint), compare="base", val_dataset=[str(data_file)], max_samples=EVALUATED,
                    max_new_tokens=4, max_batch_size=4)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run({EvalArgs: args}) == 0
    folder = checkpoint.parent / "eval"
    return {"stdout": out.getvalue(), "dir": folder, "results": json.loads((folder / "results.json").read_text()),
            "generations": [json.loads(x) for x in (folder / "generations.jsonl").read_text().splitlines()]}


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The rows of the printed table: first cell -> the other cells."""
    rows = {}
    for line in stdout.splitlines():
        if line[:1] in ("│", "┃"):  # body and header rows
            cells = [c.strip() for c in re.split("[│┃]", line.strip().strip("│┃"))]
            rows[cells[0]] = cells[1:]
    return rows


def test_compare_writes_the_report_files_in_the_run_folder(compare_run: dict[str, Any]) -> None:
    folder = compare_run["dir"]
    assert sorted(p.name for p in folder.iterdir()) == ["eval_metrics.png", "eval_report.html", "generations.jsonl",
                                                        "results.json"]
    assert (folder / "eval_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (folder / "eval_report.html").read_text()
    assert "<h1>osstune eval: base vs fine-tuned</h1>" in page and "data:image/png;base64," in page
    results = compare_run["results"]
    loss = METRICS[0]
    assert f'<td class="num">{format_metric(loss, results["models"]["fine-tuned"]["metrics"]["loss"])}</td>' in page
    assert list(results["models"]) == ["base", "fine-tuned"]
    tuned = results["models"]["fine-tuned"]
    assert tuned["adapters"] == str(compare_run["dir"].parent / "checkpoint-4")
    assert results["models"]["base"]["adapters"] is None
    assert results["models"]["base"]["model"] == tuned["model"]
    settings = results["settings"]
    assert settings["render"]["current_date"] == DATE and settings["render"]["loss_scale"] == "default"
    assert (settings["records"], settings["generation_records"], settings["bleu_tokenize"]) == (EVALUATED,
                                                                                               EVALUATED, "13a")
    assert "tok:13a" in settings["bleu_signature"]
    lines = compare_run["generations"]
    assert [g["index"] for g in lines] == list(range(EVALUATED))
    assert lines[3]["messages"] == [{"role": "user", "content": question(3)}]
    assert lines[3]["reference"] == answer(3)
    assert set(lines[3]["responses"]) == {"base", "fine-tuned"}
    assert all(g["responses"]["base"]["completion_tokens"] <= 4 for g in lines)


def test_printed_table_shows_the_json_numbers(compare_run: dict[str, Any]) -> None:
    rows = table_rows(compare_run["stdout"])
    results = compare_run["results"]
    base, tuned = results["models"]["base"]["metrics"], results["models"]["fine-tuned"]["metrics"]
    deltas = results["deltas"]
    assert (deltas["of"], deltas["minus"]) == ("fine-tuned", "base")
    assert rows["metric"] == ["base", "fine-tuned", "delta"]
    for metric in METRICS:
        expected = [format_metric(metric, base[metric.key]), format_metric(metric, tuned[metric.key]),
                    format_metric(metric, deltas["metrics"][metric.key], delta=True)]
        assert rows[metric.label] == expected, metric.key
    assert float(rows["loss"][2]) == pytest.approx(tuned["loss"] - base["loss"], abs=1e-4)


def test_fine_tuned_model_has_lower_loss_on_its_training_data(compare_run: dict[str, Any]) -> None:
    base = compare_run["results"]["models"]["base"]["metrics"]
    tuned = compare_run["results"]["models"]["fine-tuned"]["metrics"]
    assert tuned["loss"] < base["loss"] - 0.5
    assert tuned["perplexity"] < base["perplexity"]
    assert tuned["token_accuracy"] > base["token_accuracy"]
    assert tuned["scored_tokens"] == base["scored_tokens"] > 0
    assert tuned["scored_samples"] == base["scored_samples"] == EVALUATED


def test_scores_equal_teacher_forced_scores_computed_directly(compare_run: dict[str, Any], checkpoint: Path,
                                                              tiny_model_dir: Path, data_file: Path) -> None:
    # --compare base (all evaluated records) and --compare MODEL_DIR (the first batch) against a direct computation.
    folder_run = evaluate(EvalArgs(adapters=str(checkpoint), compare=str(tiny_model_dir), val_dataset=[str(data_file)],
                                   max_samples=4, max_new_tokens=4, max_batch_size=4), Console(file=io.StringIO()))
    assert [(r.label, r.adapters) for r in folder_run.results] == [("base", None), ("fine-tuned", str(checkpoint))]
    assert folder_run.results[0].model == str(tiny_model_dir.resolve())
    runs = {4: {r.label: r.metrics for r in folder_run.results},
            EVALUATED: {label: r["metrics"] for label, r in compare_run["results"]["models"].items()}}
    for label, kwargs in (("fine-tuned", {"adapters": str(checkpoint)}), ("base", {"model": str(tiny_model_dir)})):
        loaded = load_for_inference(torch_dtype="float32", device="cpu", **kwargs)
        prepared = prepare_dataset(DataArgs(dataset=[str(data_file)]),
                                   RenderOptions(current_date=DATE, loss_scale="default"), loaded.tokenizer,
                                   show_progress=False).train
        assert prepared.indices[:EVALUATED] == list(range(EVALUATED))
        for n, by_label in runs.items():
            scores = teacher_forced_scores(loaded.model, prepared.input_ids[:n], prepared.labels[:n], batch_size=4)
            metrics = by_label[label]
            assert metrics["loss"] == pytest.approx(scores.loss, rel=1e-6), (label, n)
            assert metrics["perplexity"] == pytest.approx(math.exp(scores.loss), rel=1e-6), (label, n)
            assert metrics["token_accuracy"] == scores.accuracy, (label, n)
            assert (metrics["scored_tokens"], metrics["scored_samples"]) == (scores.tokens, n), (label, n)
    # Greedy replies of the base loaded from its folder equal those of the adapter switched off.
    for result in folder_run.results:
        assert result.generations == [g["responses"][result.label] for g in compare_run["generations"][:4]]


def test_generation_metrics_match_the_generations_file(compare_run: dict[str, Any]) -> None:
    lines = compare_run["generations"]
    references = [g["reference"] for g in lines]
    for label, result in compare_run["results"]["models"].items():
        replies = [g["responses"][label] for g in lines]
        responses = [r["response"] for r in replies]
        metrics = result["metrics"]
        matches = sum(r.strip() == ref for r, ref in zip(responses, references))
        assert [r["exact_match"] for r in replies] == [r.strip() == ref for r, ref in zip(responses, references)]
        assert metrics["exact_match_count"] == matches and metrics["exact_match"] == matches / EVALUATED
        assert metrics["bleu"] == sacrebleu.corpus_bleu(responses, [references], tokenize="13a").score
        assert metrics["chrf"] == sacrebleu.corpus_chrf(responses, [references]).score
        assert metrics["completion_tokens_mean"] == sum(r["completion_tokens"] for r in replies) / EVALUATED
        assert metrics["finished_share"] == sum(r["finished"] for r in replies) / EVALUATED


def _scripted_generate(tokenizer_calls: list[int]) -> Any:
    """A stand-in for ``generate_batch``: the right answer for even numbers, a wrong one for odd numbers."""

    def generate_batch(model: Any, tokenizer: Any, conversations: Sequence[Sequence[Message]],
                       options: RenderOptions, **kwargs: Any) -> list[Reply]:
        replies = []
        for messages in conversations:
            i = int(re.search(r"What is (\d+)", messages[-1].content).group(1))
            final = answer(i) if i % 2 == 0 else f"{2 * i + 1}, woof"
            replies.append(Reply(final=final, finished=i != 3, token_ids=list(range(10 + i))))
        tokenizer_calls.append(len(conversations))
        return replies

    return generate_batch


def test_generation_metrics_on_known_replies_and_the_run_loss_scale(
        checkpoint: Path, tiny_model_dir: Path, data_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(command, "generate_batch", _scripted_generate(calls))
    args = EvalArgs(adapters=str(checkpoint), val_dataset=[str(data_file)], max_samples=4, max_batch_size=3,
                    loss_scale="all", output_dir=str(tmp_path / "out"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run({EvalArgs: args}) == 0
    assert calls == [3, 1]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["models"]) == ["model"] and "deltas" not in results
    metrics = results["models"]["model"]["metrics"]
    hyps = [answer(0), "3, woof", answer(2), "7, woof"]
    refs = [answer(i) for i in range(4)]
    assert (metrics["exact_match_count"], metrics["exact_match"]) == (2, 0.5)
    assert metrics["bleu"] == sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score
    assert metrics["chrf"] == sacrebleu.corpus_chrf(hyps, [refs]).score
    assert 0 < metrics["bleu"] < 100
    assert metrics["completion_tokens_mean"] == (10 + 11 + 12 + 13) / 4
    assert metrics["finished_share"] == 0.75
    tokenizer = load_tokenizer(tiny_model_dir)
    lengths = sorted(len(tokenizer.encode(h, add_special_tokens=False)) for h in hyps)
    assert metrics["response_tokens_mean"] == sum(lengths) / 4
    assert metrics["response_tokens_median"] == (lengths[1] + lengths[2]) / 2
    ref_lengths = [len(tokenizer.encode(r, add_special_tokens=False)) for r in refs]
    assert metrics["reference_tokens_mean"] == sum(ref_lengths) / 4
    # --loss_scale all scores every token after the first, unlike the run's default.
    prepared = prepare_dataset(DataArgs(dataset=[str(data_file)]), RenderOptions(current_date=DATE, loss_scale="all"),
                               tokenizer, show_progress=False).train
    assert metrics["scored_tokens"] == sum(len(ids) - 1 for ids in prepared.input_ids[:4])
    assert all((labels != IGNORE_INDEX).all() for labels in prepared.labels[:4])
    assert results["settings"]["render"]["loss_scale"] == "all"
    rows = table_rows(out.getvalue())
    assert rows["metric"] == ["model"] and rows["exact matches"] == ["2"]


def test_generation_records_split_at_the_last_assistant_turn() -> None:
    call = ToolCall(name="add", arguments='{"a": 1}')
    convs = [
        Conversation(messages=(Message("system", "Be brief."), Message("user", "hi"), Message("assistant", "hello"),
                               Message("user", "1+1?"), Message("assistant", "2", thinking="easy"),
                               Message("user", "thanks")), source="a.jsonl", index=0),
        Conversation(messages=(Message("user", "add"), Message("assistant", "", tool_calls=(call,))),
                     source="a.jsonl", index=1),
        Conversation(messages=(Message("user", "add"), Message("assistant", "", tool_calls=(call,)),
                               Message("tool", "2", name="add"), Message("assistant", "It is 2.")),
                     tools=({"type": "function", "function": {"name": "add"}},), source="a.jsonl", index=2),
    ]
    records, tool_calls = generation_records(convs)
    assert tool_calls == 1
    assert [(r.index, r.reference, len(r.prompt)) for r in records] == [(0, "2", 4), (2, "It is 2.", 3)]
    assert records[0].prompt[-1] == Message("user", "1+1?")
    assert records[1].tools == ({"type": "function", "function": {"name": "add"}},)
    assert records[1].prompt[1].to_dict() == {"role": "assistant", "content": "",
                                                  "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]}
    assert records[1].prompt[2].to_dict() == {"role": "tool", "content": "2", "name": "add"}
    assert convs[0].messages[4].to_dict() == {"role": "assistant", "content": "2", "thinking": "easy"}


def test_default_output_dir(tmp_path: Path) -> None:
    ckpt = tmp_path / "v0-20260101-000000" / "checkpoint-5"
    assert default_output_dir(EvalArgs(adapters=str(ckpt))) == tmp_path / "v0-20260101-000000" / "eval"
    assert default_output_dir(EvalArgs(model="some/model")) == Path("eval")
    assert default_output_dir(EvalArgs(adapters=str(ckpt), output_dir="x")) == Path("x")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"adapters": "ckpt"}, "needs --val_dataset"),
    ({"model": "m", "compare": "base", "val_dataset": ["v.jsonl"]}, "--compare base compares an adapter"),
    ({"model": "m", "val_dataset": ["v.jsonl"], "max_batch_size": 0}, "--max_batch_size 0: must be at least 1"),
    ({"model": "m", "val_dataset": ["v.jsonl"], "max_new_tokens": 0}, "--max_new_tokens 0: must be at least 1"),
    ({"model": "m", "val_dataset": ["v.jsonl"], "temperature": -1.0}, "--temperature -1.0: must be 0"),
])
def test_flag_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(OsstuneError, match=re.escape(message)):
        run({EvalArgs: EvalArgs(**kwargs)})


def test_data_errors_come_before_loading_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loading(**kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(command, "load_for_inference", no_loading)
    path = tmp_path / "val.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "no answer"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"val\.jsonl, line 2, field messages: the conversation has no assistant"):
        run({EvalArgs: EvalArgs(model="any", val_dataset=[str(path)], output_dir=str(tmp_path))})
    path.write_text(json.dumps(rows[0]) + "\n")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(OsstuneError, match="flores200 needs the sentencepiece package"):
        run({EvalArgs: EvalArgs(model="any", val_dataset=[str(path)], bleu_tokenize="flores200")})
    with pytest.raises(OsstuneError, match="--adapters .*missing: no such checkpoint folder"):
        run({EvalArgs: EvalArgs(adapters=str(tmp_path / "missing"), val_dataset=[str(path)])})


def test_flags_parse_as_the_command_line_gives_them() -> None:
    import argparse

    from osstune.config import add_group, parse_flags

    parser = argparse.ArgumentParser(prog="osstune eval")
    add_group(parser, EvalArgs)
    parser.add_argument("--config", default=None)
    args = parse_flags("eval", ["--adapters", "out/v0/checkpoint-5", "--val_dataset", "a.jsonl", "b.json",
                                "--compare", "base", "--loss_scale", "all", "--max_samples", "3",
                                "--temperature", "0.5", "--bleu_tokenize", "zh", "--system", "none"],
                       [EvalArgs], parser)[EvalArgs]
    assert args == EvalArgs(adapters="out/v0/checkpoint-5", val_dataset=["a.jsonl", "b.json"], compare="base",
                            loss_scale="all", max_samples=3, temperature=0.5, bleu_tokenize="zh")
    assert (args.max_new_tokens, args.max_batch_size, args.torch_dtype, args.current_date) == (2048, 8, "auto", None)
    with pytest.raises(SystemExit):
        parse_flags("eval", ["--bleu_tokenize", "spm"], [EvalArgs], parser)
