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
    install_packed_attention_masks,
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


def test_install_packed_attention_masks_needs_a_gpt_oss_model() -> None:
    with pytest.raises(OsstuneError, match="needs a gpt-oss model"):
        install_packed_attention_masks(torch.nn.Linear(2, 2))
