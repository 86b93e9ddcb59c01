"""The Hugging Face TRL gpt-oss fine-tuning recipe, step by step, with osstune's Python API.

The recipe: load gpt-oss-20b with its MXFP4 experts dequantised to bf16; render HuggingFaceH4/Multilingual-Thinking
with the chat template; LoRA r=8, alpha=16 on all linear layers plus the experts of layers 7, 15 and 23; train one
epoch (lr 2e-4, cosine schedule to 10%, warm-up 3%, batch 4 x 4, gradient checkpointing, max length 4096), then
answer with the system prompt "reasoning language: German".

    python examples/trl_recipe.py --model /models/gpt-oss-20b --dataset HuggingFaceH4/Multilingual-Thinking

With no --model it writes the tiny gpt-oss and uses the bundled sample in the same format, so it runs anywhere
(CI runs it that way with --max_steps 2).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from osstune.api import (
    DataArgs,
    LoraSpec,
    Message,
    RenderOptions,
    TrackArgs,
    TrainArgs,
    apply_lora,
    generate,
    load_model,
    prepare_dataset,
    train,
)
from osstune.models.gpt_oss.tiny import write_tiny_model

SAMPLE = Path(__file__).parent / "data" / "multilingual_thinking_sample.jsonl"


def expert_layers(num_layers: int) -> list[int]:
    """Layers 7, 15 and 23 of the 24-layer 20b, the same relative depths on other models."""
    return sorted({round(f * (num_layers - 1)) for f in (7 / 23, 15 / 23, 23 / 23)})


def main() -> None:
    """Run the recipe."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="gpt-oss folder (default: a freshly written tiny gpt-oss)")
    ap.add_argument("--dataset", default=str(SAMPLE))
    ap.add_argument("--output_dir", default="output/trl-recipe")
    ap.add_argument("--max_steps", type=int, default=-1)
    ap.add_argument("--report_to", nargs="+", default=["swanlab"])
    opts = ap.parse_args()

    model_dir = opts.model or str(write_tiny_model(Path(tempfile.mkdtemp()) / "tiny-gpt-oss"))
    tiny = opts.model is None

    # 1. Model and tokenizer: MXFP4 experts dequantised to bf16 (fp32 on the tiny CPU run).
    loaded = load_model(model_dir, torch_dtype="float32" if tiny else "bfloat16")

    # 2. Data: harmony rendering with exact loss masks (TRL: tokenizer.apply_chat_template).
    data_args = DataArgs(dataset=[opts.dataset], max_length=4096, split_dataset_ratio=0.0)
    data = prepare_dataset(data_args, RenderOptions(), loaded.tokenizer)

    # 3. LoRA: r=8, alpha=16, all linear layers, and the experts of three layers (TRL: target_parameters).
    layers = expert_layers(loaded.model.config.num_hidden_layers)
    targets = tuple(f"{i}.mlp.experts.{p}" for i in layers for p in ("gate_up_proj", "down_proj"))
    model = apply_lora(loaded.model, LoraSpec(rank=8, alpha=16, target_modules=("all-linear",),
                                              target_parameters=targets))

    # 4. Training (TRL: SFTConfig + SFTTrainer).
    result = train(model, loaded.tokenizer, data, TrainArgs(
        output_dir=opts.output_dir, learning_rate=2e-4, gradient_checkpointing=True, num_train_epochs=1,
        max_steps=opts.max_steps, logging_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=4,
        warmup_ratio=0.03, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs='{"min_lr_rate": 0.1}',
        save_strategy="steps", save_steps=500), TrackArgs(report_to=opts.report_to), data_args=data_args)
    print(f"adapter: {result.last_checkpoint}")

    # 5. Inference with the reasoning language set in the system prompt.
    reply = generate(model, loaded.tokenizer,
                     [Message("system", "reasoning language: German"),
                      Message("user", "¿Cuál es el capital de Australia?")],
                     RenderOptions(), max_new_tokens=64 if tiny else 512)
    print(f"reasoning: {reply.reasoning!r}\nanswer: {reply.final!r}")


if __name__ == "__main__":
    main()
