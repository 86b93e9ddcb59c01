"""Torch datasets over prepared samples: one sample per item, or samples packed into rows (``--packing true``).

:class:`SampleDataset` hands out the samples of a :class:`~osstune.data.pipeline.Prepared` split one by one, for
:class:`~osstune.train.collator.PaddingCollator`. :class:`PackedDataset` groups them into rows of at most
``max_length`` tokens with :func:`plan_packing` and hands out one row per item, for
:class:`~osstune.train.collator.PackingCollator`. Items hold only keys that the model's ``forward`` accepts
(``input_ids``, ``labels``, ``position_ids``), so the Trainer's unused-column filter keeps them all.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

from osstune.data.pipeline import Prepared
from osstune.errors import OsstuneError


class SampleDataset(Dataset):
    """One prepared sample per item: ``{"input_ids", "labels"}`` as the int32 arrays the pipeline produced.

    Args:
        prepared: the tokenized split.
    """

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared

    def __len__(self) -> int:
        return len(self.prepared)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"input_ids": self.prepared.input_ids[i], "labels": self.prepared.labels[i]}


def plan_packing(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group samples into rows of at most ``max_length`` tokens, first-fit decreasing; no sample is split.

    Samples are placed longest first (ties in index order), each into the first row, in the order rows were opened,
    that still has room for it; a new row is opened when none has. A segment tree over the rows' free space finds
    that row in O(log n), so planning a million samples takes seconds. The result depends on ``lengths`` and
    ``max_length`` only.

    Args:
        lengths: token length of each sample, all between 1 and ``max_length``.
        max_length: the most tokens a row may hold.

    Returns:
        The rows, in the order they were opened (the first holds the longest sample); each row lists its sample
        indices in ascending order. Every index of ``lengths`` appears in exactly one row.
    """
    if max_length < 1:
        raise OsstuneError(f"Packing needs a positive max_length, got {max_length}.")
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise OsstuneError(
            f"Packing: {len(too_long)} sample(s) are longer than max_length={max_length} (sample {too_long[0]} has "
            f"{lengths[too_long[0]]} tokens). Set --max_length so that preprocessing cuts or drops them."
        )
    if any(n < 1 for n in lengths):
        raise OsstuneError("Packing: empty samples cannot be packed (every sample needs at least one token).")
    count = len(lengths)
    if count == 0:
        return []
    # Leaves are rows, in opening order; there can never be more rows than samples, and a leaf not yet used is an
    # empty row with max_length free. Inner nodes hold the most free space below them.
    size = 1 << (count - 1).bit_length()
    free = [0] * (2 * size)
    free[size:size + count] = [max_length] * count
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    rows: list[list[int]] = []
    for index in sorted(range(count), key=lambda i: (-lengths[i], i)):
        need = lengths[index]
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(index)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return [sorted(row) for row in rows]


class PackedDataset(Dataset):
    """Rows of packed samples: ``{"input_ids", "labels", "position_ids"}``, each the samples' arrays concatenated.

    ``position_ids`` restart at 0 for every sample; that is how the collator and the attention mask find the
    sample boundaries. Labels are the samples' own (the collator masks each sample's first label).

    Args:
        prepared: the tokenized split.
        max_length: the most tokens in a row (``--max_length``).
    """

    def __init__(self, prepared: Prepared, max_length: int) -> None:
        self.prepared = prepared
        self.rows = plan_packing([len(ids) for ids in prepared.input_ids], max_length)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        row = self.rows[i]
        return {
            "input_ids": np.concatenate([self.prepared.input_ids[j] for j in row]).astype(np.int64),
            "labels": np.concatenate([self.prepared.labels[j] for j in row]).astype(np.int64),
            "position_ids": np.concatenate([np.arange(len(self.prepared.input_ids[j]), dtype=np.int64) for j in row]),
        }
