"""Writing safetensors checkpoints in shards, tensor by tensor, as Hugging Face lays them out.

A writer plans the shards from the tensors' names, dtypes and shapes alone (``shard_plan``), names the files as
Hugging Face does (``shard_names``), and streams each tensor's bytes behind its shard's header as the tensor
arrives (``ShardWriter``), so no shard is ever held in memory. The merge of ``osstune export`` and the random
checkpoints of ``osstune.models.gpt_oss.random_model`` both write through it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

import torch

from osstune.errors import OsstuneError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
"""safetensors dtype codes and the torch dtype each stands for."""

INDEX_FILE = "model.safetensors.index.json"
"""The index Hugging Face writes beside several shards."""

_HEADER_ALIGNMENT = 8


class PlannedTensor(Protocol):
    """What a shard plan needs to know of a tensor before its values exist."""

    @property
    def name(self) -> str:
        """Its key."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """Its dtype."""
        ...

    @property
    def shape(self) -> tuple[int, ...]:
        """Its shape."""
        ...

    @property
    def nbytes(self) -> int:
        """Size of its data in bytes."""
        ...


T = TypeVar("T", bound=PlannedTensor)


@dataclass(frozen=True)
class OutputTensor:
    """One tensor to write: a ``PlannedTensor``.

    Args:
        name: its key.
        dtype: its dtype.
        shape: its shape.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of its data in bytes."""
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def shard_plan(tensors: Sequence[T], max_shard_bytes: int) -> list[list[T]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own shard).

    Args:
        tensors: the tensors in writing order.
        max_shard_bytes: the largest data size of a shard.
    """
    shards: list[list[T]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return [shard for shard in shards if shard]


def shard_names(count: int) -> list[str]:
    """File names of ``count`` shards, as Hugging Face names them (``model.safetensors`` when there is one)."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardWriter:
    """Writes planned safetensors shards, tensor by tensor, without holding a shard in memory.

    Each shard's header (names, dtypes, shapes, offsets) is known from the plan, so it is written when the shard is
    opened and every tensor's bytes are appended as it arrives. Tensors must come in plan order.

    Args:
        folder: where the shards go.
        shards: the shard plan (``shard_plan``).
    """

    def __init__(self, folder: Path, shards: Sequence[Sequence[PlannedTensor]]) -> None:
        self.folder = folder
        self.shards = shards
        self.names = shard_names(len(shards))
        self.queue: list[tuple[int, PlannedTensor]] = [(i, t) for i, shard in enumerate(shards) for t in shard]
        self.position = 0
        self.handle: BinaryIO | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor.

        Args:
            name: its key (must be the next one in the plan).
            tensor: its value (dtype and shape as planned).

        Raises:
            OsstuneError: the tensor is not the next one planned (name, dtype or shape), or the plan is done.
        """
        if self.position == len(self.queue):
            raise OsstuneError(f"{name}: every planned tensor is written already")
        shard, planned = self.queue[self.position]
        if (name, tensor.dtype, tuple(tensor.shape)) != (planned.name, planned.dtype, tuple(planned.shape)):
            raise OsstuneError(f"expected {planned.name} {planned.dtype} {list(planned.shape)}, got {name} "
                               f"{tensor.dtype} {list(tensor.shape)}")
        if self.position == 0 or self.queue[self.position - 1][0] != shard:
            self._open(shard)
        assert self.handle is not None
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.handle.write(memoryview(data))
        self.position += 1
        if self.position == len(self.queue) or self.queue[self.position][0] != shard:
            self.close()

    @property
    def done(self) -> bool:
        """Whether every planned tensor has been written."""
        return self.position == len(self.queue)

    def close(self) -> None:
        """Close the open shard, if any (a shard left incomplete by an error stays truncated)."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def index(self) -> dict[str, Any]:
        """``model.safetensors.index.json``'s content: total data size and which shard holds each tensor."""
        weight_map = {t.name: self.names[i] for i, t in self.queue}
        total = sum(t.nbytes for _, t in self.queue)
        return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}

    def _open(self, shard: int) -> None:
        """Open shard ``shard`` and write its header."""
        self.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor in self.shards[shard]:
            header[tensor.name] = {"dtype": dtype_code(tensor.dtype), "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % _HEADER_ALIGNMENT)
        self.handle = (self.folder / self.names[shard]).open("wb")
        self.handle.write(struct.pack("<Q", len(blob)))
        self.handle.write(blob)


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype.

    Raises:
        OsstuneError: a dtype safetensors has no code for.
    """
    for code, known in SAFETENSORS_DTYPES.items():
        if known == dtype:
            return code
    raise OsstuneError(f"osstune cannot write {dtype} tensors to safetensors.")
