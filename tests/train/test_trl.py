"""osstune's prepared data trains under TRL's SFTTrainer, with exactly osstune's loss masks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")

from osstune.chat.options import RenderOptions  # noqa: E402
from osstune.config import DataArgs  # noqa: E402
from osstune.data.pipeline import prepare_dataset  # noqa: E402
from osstune.eval.scoring import teacher_forced_scores  # noqa: E402
from osstune.models.loading import load_model  # noqa: E402
from osstune.models.lora import LoraSpec, apply_lora  # noqa: E402
from osstune.train.collator import PaddingCollator  # noqa: E402


def rows(batch: dict) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The (input_ids, labels) of every real (unpadded) row, order-independent."""
    masks = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))  # none: no pad in the batch
    return sorted((tuple(ids[mask.bool()].tolist()), tuple(lab[mask.bool()].tolist()))
                  for ids, lab, mask in zip(batch["input_ids"], batch["labels"], masks))


def test_sft_trainer_trains_prepared_data_with_the_same_masks(tmp_path: Path, tiny_model_dir: Path) -> None:
    records = [{"messages": [{"role": "user", "content": f"Say {i}."},
                             {"role": "assistant", "thinking": f"Repeat {i}.", "content": f"{i}, nya~"}]}
               for i in range(8)]
    data_file = tmp_path / "d.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = load_model(str(tiny_model_dir), torch_dtype="float32")
    data = prepare_dataset(DataArgs(dataset=[str(data_file)]), RenderOptions(current_date="2026-01-01"),
                           loaded.tokenizer, show_progress=False)
    model = apply_lora(loaded.model, LoraSpec(rank=4, alpha=8, dropout=0.0))
    expected = teacher_forced_scores(model, data.train.input_ids, data.train.labels, batch_size=8)

    trainer = trl.SFTTrainer(
        model=model,
        # router_aux_loss_coef=0: TRL would otherwise add gpt-oss's router load-balancing loss to the logged loss.
        args=trl.SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=8,
                           learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no",
                           use_cpu=True, max_length=None, router_aux_loss_coef=0.0),
        train_dataset=data.train.to_hf_dataset(),
        processing_class=loaded.tokenizer,
    )
    trl_batch = next(iter(trainer.get_train_dataloader()))
    ours = PaddingCollator(loaded.tokenizer.pad_token_id)(
        [{"input_ids": i, "labels": lab} for i, lab in zip(data.train.input_ids, data.train.labels)])
    assert rows(trl_batch) == rows(ours)  # the same tokens, the same supervised positions

    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged[0] == pytest.approx(expected.loss, rel=5e-4)  # TRL's own loss path: float32 rounding only
    assert logged[1] < logged[0]
