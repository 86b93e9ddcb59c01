"""Padding and packing collators: exact tensors on small hand-written batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from osstune.chat.options import IGNORE_INDEX
from osstune.errors import OsstuneError
from osstune.train.collator import (
    PackingCollator,
    PaddingCollator,
    count_trained_tokens,
    install_attention_masks,
)

X = IGNORE_INDEX


def test_count_trained_tokens_skips_position_zero_and_ignored_labels() -> None:
    labels = torch.tensor([[7, X, 8, 9], [X, 5, X, X]])
    assert count_trained_tokens(labels) == 3


def test_padding_collator_right_pads_every_tensor() -> None:
    items = [
        {"input_ids": [5, 6, 7], "labels": [X, 6, 7]},
        {"input_ids": np.array([8, 9], dtype=np.int32), "labels": np.array([8, 9], dtype=np.int32),
         "source": "a.jsonl", "index": 3},
    ]
    batch = PaddingCollator(pad_token_id=0)(items)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels", "num_trained_tokens"]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[X, 6, 7], [8, 9, X]]
    assert all(batch[k].dtype == torch.int64 for k in ("input_ids", "attention_mask", "labels"))
    # The first label of a row is never a target after the shift: 2 + 1 trained positions.
    assert batch["num_trained_tokens"] == 3


def test_padding_collator_pads_to_a_multiple() -> None:
    items = [{"input_ids": [1, 2, 3, 4, 5], "labels": [X, X, 3, 4, 5]}, {"input_ids": [6], "labels": [X]}]
    batch = PaddingCollator(pad_token_id=99, pad_to_multiple_of=4)(items)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 99, 99, 99], [6, 99, 99, 99, 99, 99, 99, 99]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[X, X, 3, 4, 5, X, X, X], [X] * 8]
    assert batch["num_trained_tokens"] == 3


def test_padding_collator_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        PaddingCollator(0)([])
    with pytest.raises(ValueError, match="same non-zero length"):
        PaddingCollator(0)([{"input_ids": [1, 2], "labels": [X]}])
    with pytest.raises(ValueError, match="same non-zero length"):
        PaddingCollator(0)([{"input_ids": [], "labels": []}])
    with pytest.raises(ValueError, match="positive"):
        PaddingCollator(0, pad_to_multiple_of=0)


def test_packing_collator_concatenates_into_one_row_and_masks_sample_starts() -> None:
    items = [
        # a packed row of two samples (as PackedDataset hands it out), the second trained everywhere
        {"input_ids": [10, 11, 12, 20, 21], "labels": [X, 11, 12, 20, 21], "position_ids": [0, 1, 2, 0, 1]},
        # a single sample without position ids
        {"input_ids": np.array([30, 31, 32], dtype=np.int32), "labels": np.array([30, 31, X], dtype=np.int32)},
        # a one-token sample
        {"input_ids": [40], "labels": [40]},
    ]
    batch = PackingCollator()(items)
    assert sorted(batch) == ["input_ids", "labels", "num_trained_tokens", "position_ids"]
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 31, 32, 40]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 0]]
    assert batch["labels"].tolist() == [[X, 11, 12, X, 21, X, 31, X, X]]
    assert all(batch[k].dtype == torch.int64 for k in ("input_ids", "position_ids", "labels"))
    assert batch["num_trained_tokens"] == 4


def test_packing_collator_leaves_its_input_untouched() -> None:
    labels = np.array([5, 6, 7], dtype=np.int64)
    PackingCollator()([{"input_ids": np.array([5, 6, 7]), "labels": labels}])
    assert labels.tolist() == [5, 6, 7]


def test_packing_collator_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        PackingCollator()([])
    with pytest.raises(ValueError, match="start at 0"):
        PackingCollator()([{"input_ids": [1, 2], "labels": [1, 2], "position_ids": [1, 2]}])
    with pytest.raises(ValueError, match="start at 0"):
        PackingCollator()([{"input_ids": [1, 2], "labels": [1, 2], "position_ids": [0]}])


def test_padding_collator_leaves_out_the_mask_of_a_batch_without_pads() -> None:
    items = [{"input_ids": [1, 2, 3], "labels": [X, 2, 3]}, {"input_ids": [4, 5, 6], "labels": [4, 5, X]}]
    batch = PaddingCollator(pad_token_id=0)(items)
    assert sorted(batch) == ["input_ids", "labels", "num_trained_tokens"]  # no pad: the model's default mask
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    padded = PaddingCollator(pad_token_id=0, pad_to_multiple_of=4)(items)
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]


def test_install_attention_masks_needs_a_gpt_oss_model() -> None:
    with pytest.raises(OsstuneError, match="needs a gpt-oss model"):
        install_attention_masks(torch.nn.Linear(2, 2))
    assert install_attention_masks(torch.nn.Linear(2, 2), required=False) == []


def test_flex_masks_of_a_batch_shape_are_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # transformers' builders stand in for themselves (flex block masks need CUDA): count the calls.
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssModel

    from osstune.train import collator

    built: list[tuple[str, tuple[int, ...], object]] = []

    def builder(kind: str):
        def build(*, config, inputs_embeds, attention_mask, cache, position_ids):
            built.append((kind, tuple(inputs_embeds.shape[:2]), position_ids))
            return object()
        return build

    monkeypatch.setattr(collator, "create_causal_mask", builder("full"))
    monkeypatch.setattr(collator, "create_sliding_window_causal_mask", builder("sliding"))
    monkeypatch.setattr(collator, "MASK_CACHE_SIZE", 2)
    config = GptOssConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=16, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                          vocab_size=32, layer_types=["sliding_attention", "full_attention"])
    model = GptOssModel(config)
    model.config._attn_implementation = "flex_attention"
    [handle] = install_attention_masks(model, required=False)

    def masks(rows: int, length: int, **extra: object) -> dict | None:
        hooked = collator._masks_hook(model, (), {"input_ids": torch.zeros(rows, length, dtype=torch.long), **extra})
        return None if hooked is None else hooked[1]["attention_mask"]

    first = masks(2, 8)
    assert sorted(first) == ["full_attention", "sliding_attention"] and len(built) == 2
    again = masks(2, 8)
    assert len(built) == 2 and all(again[kind] is first[kind] for kind in first)  # reused, not rebuilt
    masks(1, 8)
    masks(2, 4)  # a third shape drops the least recently used, (2, 8)
    assert len(built) == 6
    masks(1, 8)
    assert len(built) == 6  # kept
    masks(2, 8)
    assert len(built) == 8  # rebuilt
    assert masks(2, 8, attention_mask=torch.ones(2, 8)) is None  # a padding mask: the model's own masks
    packed = masks(1, 6, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))
    assert packed is not None and built[-1][2] is not None and len(built) == 10  # packed rows: never cached
    model.config._attn_implementation = "eager"
    assert masks(2, 8) is None  # eager masks are tensors of the batch's size: not kept
    handle.remove()
