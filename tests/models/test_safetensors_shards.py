"""The streaming safetensors shard writer shared by export and the random checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from osstune.errors import OsstuneError
from osstune.models.safetensors_shards import OutputTensor, ShardWriter, dtype_code, shard_names, shard_plan


def test_shard_plan_fills_in_order() -> None:
    tensors = [OutputTensor(f"t{i}", torch.uint8, (size,)) for i, size in enumerate((3, 3, 3, 10, 1, 2))]
    plan = shard_plan(tensors, max_shard_bytes=6)
    assert [[t.name for t in shard] for shard in plan] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(3) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_writer_streams_shards_that_safetensors_reads(tmp_path: Path) -> None:
    values = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.uint8),
              "c": torch.ones(3, dtype=torch.bfloat16)}
    plan = shard_plan([OutputTensor(name, value.dtype, tuple(value.shape)) for name, value in values.items()], 24)
    writer = ShardWriter(tmp_path, plan)
    for name, value in values.items():
        assert not writer.done
        writer.write(name, value)
    assert writer.done and writer.names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert writer.index() == {"metadata": {"total_size": 24 + 2 + 6},
                              "weight_map": {"a": writer.names[0], "b": writer.names[1], "c": writer.names[1]}}
    for name, value in values.items():
        with safe_open(str(tmp_path / writer.index()["weight_map"][name]), framework="pt") as f:
            assert torch.equal(f.get_tensor(name), value)
    with pytest.raises(OsstuneError, match="every planned tensor is written already"):
        writer.write("d", torch.zeros(1))


def test_writer_refuses_what_the_plan_does_not_hold(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, [[OutputTensor("a", torch.float32, (2,))]])
    with pytest.raises(OsstuneError, match=r"expected a torch.float32 \[2\], got a torch.float32 \[3\]"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(OsstuneError, match="cannot write torch.complex64"):
        dtype_code(torch.complex64)
