"""The whole lifecycle on the tiny gpt-oss, through the CLI: train, infer with the adapter, export (merge), infer
with the merged model, evaluate; greedy outputs match everywhere, and plain transformers + PEFT agree."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, Mxfp4Config

from osstune.chat.messages import Message
from osstune.chat.render import render_prompt
from osstune.cli import main
from osstune.infer.generate import parse_completion, stop_token_ids
from osstune.infer.loading import load_for_inference

DATE = "2026-01-01"
MAX_NEW = 12


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_train_infer_export_infer_eval(tmp_path: Path, tiny_model_dir: Path) -> None:
    train = tmp_path / "train.jsonl"
    val = tmp_path / "val.jsonl"
    records = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                             {"role": "assistant", "thinking": f"Count from 1 to {i}.",
                              "content": " ".join(str(k) for k in range(1, i + 1)) + ", nya~"}]} for i in range(1, 17)]
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    val.write_text("".join(json.dumps(r) + "\n" for r in records[:4]))
    out = tmp_path / "output"

    assert main(["sft", "--model", str(tiny_model_dir), "--dataset", str(train), "--torch_dtype", "float32",
                 "--max_steps", "6", "--learning_rate", "1e-2", "--per_device_train_batch_size", "4",
                 "--save_steps", "6", "--split_dataset_ratio", "0", "--output_dir", str(out), "--report_to", "none",
                 "--current_date", DATE]) == 0
    (ckpt,) = list(out.glob("v*/checkpoint-6"))

    adapter_results = tmp_path / "adapter.jsonl"
    assert main(["infer", "--adapters", str(ckpt), "--val_dataset", str(val), "--result_path",
                 str(adapter_results), "--temperature", "0", "--max_new_tokens", str(MAX_NEW)]) == 0

    merged = tmp_path / "merged"
    assert main(["export", "--adapters", str(ckpt), "--merge_lora", "true", "--output_dir", str(merged),
                 "--torch_dtype", "float32"]) == 0
    assert not json.loads((merged / "config.json").read_text()).get("quantization_config")

    merged_results = tmp_path / "merged.jsonl"
    assert main(["infer", "--model", str(merged), "--val_dataset", str(val), "--result_path", str(merged_results),
                 "--temperature", "0", "--max_new_tokens", str(MAX_NEW)]) == 0

    a, b = rows(adapter_results), rows(merged_results)
    assert [r["index"] for r in a] == [0, 1, 2, 3]
    for x, y in zip(a, b):
        assert (x["response"], x["reasoning"], x["completion_tokens"], x["prompt_tokens"]) == (
            y["response"], y["reasoning"], y["completion_tokens"], y["prompt_tokens"])
        assert x["reference"] == records[x["index"]]["messages"][-1]["content"]

    # Plain transformers + PEFT, prompted with the training renderer, generates the same tokens.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager",
                                                quantization_config=Mxfp4Config(dequantize=True))
    plain = PeftModel.from_pretrained(base, ckpt).eval()
    tokenizer = load_for_inference(adapters=str(ckpt)).tokenizer
    options = load_for_inference(model=str(merged)).options
    assert options.current_date == DATE  # the merged folder carries the run's args.json
    for record, result in zip(records[:4], a):
        prompt = render_prompt([Message("user", record["messages"][0]["content"])], tokenizer, options)
        assert len(prompt) == result["prompt_tokens"]
        with torch.no_grad():
            ids = plain.generate(input_ids=torch.tensor([prompt]), max_new_tokens=result["completion_tokens"],
                                 do_sample=False, eos_token_id=stop_token_ids(tokenizer),
                                 pad_token_id=stop_token_ids(tokenizer)[0])[0, len(prompt):].tolist()
        reply = parse_completion(tokenizer, ids)
        assert (reply.final, reply.reasoning) == (result["response"], result["reasoning"])

    eval_dir = tmp_path / "eval"
    assert main(["eval", "--adapters", str(ckpt), "--val_dataset", str(val), "--compare", "base",
                 "--max_new_tokens", str(MAX_NEW), "--output_dir", str(eval_dir)]) == 0
    results = json.loads((eval_dir / "results.json").read_text())
    text = json.dumps(results)
    assert "loss" in text and (eval_dir / "eval_report.html").is_file()
