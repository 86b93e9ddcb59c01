"""``osstune infer`` end to end: train a checkpoint, then chat with it and answer a dataset; model selection, the
flags of the seed commands, and every error the command reports."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from osstune.chat.messages import Message
from osstune.chat.options import RenderOptions
from osstune.chat.render import render_prompt
from osstune.config import TemplateArgs, add_group, parse_flags
from osstune.errors import DataError, OsstuneError
from osstune.infer.command import InferArgs, context_length, run
from osstune.infer.generate import generate_batch
from osstune.infer.loading import load_for_inference

DATE = "2026-01-01"
TRAINED_OPTIONS = RenderOptions(current_date=DATE, reasoning_effort="low", system="Be brief.")
QUESTIONS = ["What is 3 plus 3?", "Hi", "What is 5 plus 5?"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A real LoRA checkpoint of the tiny gpt-oss: two training steps, with rendering options to be recorded."""
    from osstune.train.args import LoadArgs, LoraArgs, SftDataArgs, TrackArgs, TrainArgs
    from osstune.train.sft import SftConfig, train

    root = tmp_path_factory.mktemp("infer-run")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "thinking": f"Add {i} and {i}.", "content": f"{2 * i}"}]}) + "\n" for i in range(8)))
    result = train(SftConfig(
        load=LoadArgs(model=str(tiny_model_dir), torch_dtype="float32"),
        data=SftDataArgs(dataset=[str(data)], split_dataset_ratio=0.0, seed=7),
        template=TemplateArgs(current_date=DATE, reasoning_effort="low", system="Be brief."),
        lora=LoraArgs(lora_rank=4, lora_alpha=8, lora_dropout=0.0),
        train=TrainArgs(output_dir=str(root / "output"), max_steps=2, save_steps=2, learning_rate=5e-3,
                        per_device_train_batch_size=4, logging_steps=1, eval_generation_samples=0,
                        gradient_checkpointing=False),
        track=TrackArgs(report_to=["none"]),
    ))
    assert result.exit_code == 0 and result.last_checkpoint is not None
    return result.last_checkpoint


@pytest.fixture
def val_file(tmp_path: Path) -> Path:
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": "ref"}]}) + "\n"
                            for q in QUESTIONS))
    return path


def infer(**flags: Any) -> int:
    return run({InferArgs: InferArgs(**flags)})


def chat_input(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


def results(folder: Path) -> list[dict[str, Any]]:
    (path,) = sorted(folder.glob("infer_result/*.jsonl"))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def parse(argv: list[str]) -> InferArgs:
    parser = argparse.ArgumentParser()
    add_group(parser, InferArgs)
    parser.add_argument("--config", default=None)
    return parse_flags("infer", argv, [InferArgs], parser)[InferArgs]


# ---------------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------------


def test_seed_commands_parse() -> None:
    assert parse(["--adapters", "output/v0-20250811-150539/checkpoint-551", "--stream", "true", "--temperature", "0",
                  "--max_new_tokens", "2048"]) == InferArgs(adapters="output/v0-20250811-150539/checkpoint-551")
    assert parse(["--model", "output/v0/checkpoint-551-merged", "--val_dataset", "val.json", "--max_new_tokens",
                  "2048", "--result_path", "out.jsonl"]) == \
        InferArgs(model="output/v0/checkpoint-551-merged", val_dataset=["val.json"], result_path="out.jsonl")
    assert parse(["--ckpt_dir", "ck", "--stream", "false", "--reasoning_effort", "high", "--max_batch_size", "2"]) == \
        InferArgs(adapters="ck", stream=False, reasoning_effort="high", max_batch_size=2)
    defaults = InferArgs()
    assert (defaults.temperature, defaults.top_p, defaults.max_new_tokens, defaults.max_batch_size,
            defaults.torch_dtype, defaults.infer_backend, defaults.stream) == (0.0, 1.0, 2048, 8, "auto", "pt", True)


@pytest.mark.parametrize(("flags", "message"), [
    ({"model": "m", "infer_backend": "vllm"},
     "--infer_backend vllm: osstune generates with PyTorch (transformers) only. Leave the flag out (pt), or merge the "
     "adapter with `osstune export --adapters CKPT --merge_lora true` and serve the merged folder with vllm "
     "yourself."),
    ({}, "Give --adapters CHECKPOINT (a LoRA checkpoint of osstune sft) or --model DIR (a base or merged model)."),
    ({"model": "m", "temperature": -0.5}, "--temperature -0.5: must be 0 (greedy) or positive."),
    ({"model": "m", "top_p": 0.0}, "--top_p 0.0: must be in (0, 1]."),
    ({"model": "m", "max_new_tokens": 0}, "--max_new_tokens 0: must be at least 1."),
    ({"model": "m", "max_batch_size": 0}, "--max_batch_size 0: must be at least 1."),
    ({"model": "m", "result_path": "out.jsonl"},
     "--result_path is where batch inference writes; give --val_dataset FILE with it (without --val_dataset, "
     "osstune infer is an interactive chat)."),
])
def test_flag_errors(flags: dict[str, Any], message: str) -> None:
    with pytest.raises(OsstuneError) as err:
        infer(**flags)
    assert str(err.value) == message


def test_data_errors_come_before_the_model_is_loaded(tmp_path: Path) -> None:
    bad = tmp_path / "val.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "ok"}]}\n{"messages": "oops"}\n')
    with pytest.raises(DataError, match=rf"^{bad}, line 2, field messages: messages must be a non-empty list"):
        infer(model=str(tmp_path / "no-such-model"), val_dataset=[str(bad)])


# ---------------------------------------------------------------------------------------------------------------
# Train -> infer
# ---------------------------------------------------------------------------------------------------------------


def test_train_then_batch_infer_with_adapters(checkpoint: Path, tiny_model_dir: Path, val_file: Path) -> None:
    """The base model and the rendering options come from args.json; results land in the checkpoint folder."""
    assert infer(adapters=str(checkpoint), val_dataset=[str(val_file)], max_new_tokens=8, max_batch_size=2) == 0
    rows = results(checkpoint)
    loaded = load_for_inference(adapters=str(checkpoint))
    assert loaded.base_dir == tiny_model_dir.resolve() and loaded.options == TRAINED_OPTIONS
    convs = [[Message("user", q)] for q in QUESTIONS]
    tuned = generate_batch(loaded.model, loaded.tokenizer, convs, TRAINED_OPTIONS, max_new_tokens=8)
    base = load_for_inference(model=str(tiny_model_dir), torch_dtype="float32")
    untuned = generate_batch(base.model, base.tokenizer, convs, TRAINED_OPTIONS, max_new_tokens=8)
    assert [r.token_ids for r in tuned] != [r.token_ids for r in untuned]  # the adapter is in use
    assert [r["index"] for r in rows] == [0, 1, 2]
    for row, conv, reply in zip(rows, convs, tuned):
        assert row["prompt_tokens"] == len(render_prompt(conv, loaded.tokenizer, TRAINED_OPTIONS))
        assert (row["response"], row["reasoning"], row["completion_tokens"]) == \
            (reply.final, reply.reasoning, len(reply.token_ids))
        assert row["reference"] == "ref"


def test_chat_with_adapters_reads_piped_input(checkpoint: Path, tiny_model_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    chat_input(monkeypatch, "Hi\n/reasoning high\nAgain\n/exit\nnever sent\n")
    assert infer(adapters=str(checkpoint), max_new_tokens=4, stream=True) == 0
    out = capsys.readouterr().out
    assert (f"chatting with {tiny_model_dir.resolve()} + adapter {checkpoint} (reasoning low, date {DATE}, "
            "temperature 0)") in out
    assert "you> Hi\n" in out and "(reasoning effort: high)\n" in out and "you> Again\n" in out
    assert out.count("(cut off after 4 new tokens") == 2 and "never sent" not in out


def test_model_overrides_the_recorded_base(checkpoint: Path, tiny_model_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    chat_input(monkeypatch, "/exit\n")
    assert infer(adapters=str(checkpoint), model=str(copy), reasoning_effort="high", current_date="2026-02-03") == 0
    out = capsys.readouterr().out
    assert f"chatting with {copy.resolve()} + adapter {checkpoint} (reasoning high, date 2026-02-03" in out


def test_model_alone_writes_results_into_the_model_folder(tiny_model_dir: Path, tmp_path: Path,
                                                          val_file: Path) -> None:
    merged = shutil.copytree(tiny_model_dir, tmp_path / "checkpoint-2-merged")
    assert infer(model=str(merged), val_dataset=[str(val_file)], max_new_tokens=3, current_date=DATE) == 0
    rows = results(merged)
    assert [(r["index"], r["completion_tokens"]) for r in rows] == [(0, 3), (1, 3), (2, 3)]
    expected = render_prompt([Message("user", QUESTIONS[0])], load_for_inference(model=str(merged)).tokenizer,
                             RenderOptions(current_date=DATE))
    assert rows[0]["prompt_tokens"] == len(expected)


def test_explicit_result_path_is_resumed(tiny_model_dir: Path, tmp_path: Path, val_file: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out.jsonl"
    flags = {"model": str(tiny_model_dir), "val_dataset": [str(val_file)], "max_new_tokens": 3,
             "result_path": str(out)}
    assert infer(**flags) == 0
    first = out.read_text()
    assert infer(**flags) == 0
    assert out.read_text() == first
    assert f"resuming {out}: 3 of 3 records already answered" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Errors from loading and from the model's context
# ---------------------------------------------------------------------------------------------------------------


def test_checkpoint_without_args_json_asks_for_the_model(checkpoint: Path, tiny_model_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(checkpoint / name, lonely / name)
    with pytest.raises(OsstuneError, match="no args.json in the checkpoint or its run folder, so the base model is "
                                           "unknown. Pass --model BASE_MODEL_DIR."):
        infer(adapters=str(lonely))
    chat_input(monkeypatch, "")
    assert infer(adapters=str(lonely), model=str(tiny_model_dir)) == 0


def test_adapter_of_another_base_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    from osstune.models.gpt_oss.tiny import write_tiny_model

    narrow = write_tiny_model(tmp_path / "narrow", hidden_size=32, intermediate_size=32)
    with pytest.raises(OsstuneError, match=rf"--adapters {checkpoint} does not fit the model {narrow}: it was trained "
                                           "on .*size mismatch.*Pass the matching --model."):
        infer(adapters=str(checkpoint), model=str(narrow))


def test_prompt_longer_than_the_model_context(tiny_model_dir: Path, tmp_path: Path) -> None:
    short = shutil.copytree(tiny_model_dir, tmp_path / "short-context")
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 80
    (short / "config.json").write_text(json.dumps(config))
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n" +
                   json.dumps({"messages": [{"role": "user", "content": "word " * 40}]}) + "\n")
    loaded = load_for_inference(model=str(short))
    assert context_length(loaded.model) == 80
    length = len(render_prompt([Message("user", "word " * 40)], loaded.tokenizer, RenderOptions(current_date=DATE)))
    assert length >= 80
    with pytest.raises(OsstuneError) as err:
        infer(model=str(short), val_dataset=[str(val)], current_date=DATE, result_path=str(tmp_path / "o.jsonl"))
    assert str(err.value) == (f"{val}, line 2 (index 1): the prompt has {length} tokens, but the model's context "
                              "(max_position_embeddings) is 80. Shorten this record or leave it out of --val_dataset.")
