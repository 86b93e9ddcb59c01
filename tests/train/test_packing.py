"""Padding-free packing: the planner, the packed dataset, and that a packed row trains exactly its samples.

Model checks run the tiny gpt-oss (fp32, eager attention; flex_attention too where CUDA is present) on samples
longer than its sliding window, so the sliding-window layers and the attention sinks are exercised.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from osstune.chat.options import IGNORE_INDEX
from osstune.data.pipeline import Prepared
from osstune.errors import OsstuneError
from osstune.models.gpt_oss.tiny import write_tiny_model
from osstune.train.collator import PackingCollator, PaddingCollator, install_attention_masks
from osstune.train.dataset import PackedDataset, SampleDataset, plan_packing

X = IGNORE_INDEX
SLIDING_WINDOW = 16
# Longer than the sliding window (40, 33, 17), short, a single token; the 33-token one is trained everywhere.
LENGTHS = (40, 33, 17, 6, 1, 12)
ALL_TRAINED = 1


# ---- planner ---------------------------------------------------------------------------------------------------


def _reference_first_fit_decreasing(lengths: list[int], max_length: int) -> list[list[int]]:
    """Straightforward first-fit decreasing, one scan over the open rows per sample."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        target = next((r for r, room in enumerate(free) if room >= lengths[index]), None)
        if target is None:
            rows.append([])
            free.append(max_length)
            target = len(rows) - 1
        rows[target].append(index)
        free[target] -= lengths[index]
    return [sorted(row) for row in rows]


def test_plan_packing_hand_example() -> None:
    # Placed 7, 5, 4, 3, 2, 1: 7 opens row 0, 5 row 1, 4 row 2; 3 fills row 1, 2 joins row 2, 1 fills row 0.
    assert plan_packing([5, 3, 7, 2, 4, 1], 8) == [[2, 5], [0, 1], [3, 4]]


def test_plan_packing_exact_fits_and_one_row_per_full_sample() -> None:
    assert plan_packing([4, 4, 4, 4], 4) == [[0], [1], [2], [3]]
    assert plan_packing([1, 1, 1, 1, 1], 5) == [[0, 1, 2, 3, 4]]
    assert plan_packing([], 8) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_packing_matches_reference_and_its_invariants(seed: int) -> None:
    rng = random.Random(seed)
    max_length = rng.choice([64, 100, 257])
    lengths = [rng.randint(1, max_length) if rng.random() < 0.2 else rng.randint(1, max_length // 4)
               for _ in range(1500)]
    rows = plan_packing(lengths, max_length)
    assert rows == _reference_first_fit_decreasing(lengths, max_length)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in row) for row in rows) <= max_length
    assert all(row == sorted(row) for row in rows)
    assert plan_packing(lengths, max_length) == rows
    # first-fit leaves no two rows that could have been one
    totals = sorted(sum(lengths[i] for i in row) for row in rows)
    assert totals[0] + totals[1] > max_length


def test_plan_packing_rejects_what_cannot_be_packed() -> None:
    with pytest.raises(OsstuneError, match=r"longer than max_length=8 \(sample 1 has 9 tokens\)"):
        plan_packing([3, 9, 10], 8)
    with pytest.raises(OsstuneError, match="empty samples"):
        plan_packing([3, 0], 8)
    with pytest.raises(OsstuneError, match="positive max_length"):
        plan_packing([1], 0)


# ---- datasets --------------------------------------------------------------------------------------------------


def _prepared(samples: list[tuple[list[int], list[int]]]) -> Prepared:
    prepared = Prepared()
    for i, (ids, labels) in enumerate(samples):
        prepared.append("data.jsonl", i, np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32))
    return prepared


def test_sample_dataset_hands_out_the_pipeline_arrays() -> None:
    prepared = _prepared([([1, 2, 3], [X, 2, 3]), ([4, 5], [X, 5])])
    dataset = SampleDataset(prepared)
    assert len(dataset) == 2
    assert sorted(dataset[1]) == ["input_ids", "labels"]
    assert dataset[1]["input_ids"] is prepared.input_ids[1]
    assert dataset[1]["labels"].tolist() == [X, 5]


def test_packed_dataset_rows_concatenate_their_samples() -> None:
    prepared = _prepared([([1, 2, 3], [X, 2, 3]), ([4, 5, 6, 7, 8], [4, 5, 6, 7, 8]), ([9, 10], [X, 10])])
    dataset = PackedDataset(prepared, max_length=6)
    assert dataset.rows == [[1], [0, 2]]
    assert len(dataset) == 2
    row = dataset[1]
    assert sorted(row) == ["input_ids", "labels", "position_ids"]
    assert row["input_ids"].tolist() == [1, 2, 3, 9, 10]
    assert row["labels"].tolist() == [X, 2, 3, X, 10]
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1]
    assert dataset[0]["labels"].tolist() == [4, 5, 6, 7, 8]
    assert all(row[k].dtype == np.int64 for k in row)


# ---- the model sees each packed sample exactly as it sees it alone ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", mxfp4=False, sliding_window=SLIDING_WINDOW)


def _load(tiny_dir: Path, attn: str = "eager", device: str = "cpu") -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation=attn)
    assert model.config.sliding_window == SLIDING_WINDOW
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    return model.to(device).eval()


@pytest.fixture()
def model(tiny_dir: Path) -> Iterator[torch.nn.Module]:
    model = _load(tiny_dir)
    handles = install_attention_masks(model)
    assert len(handles) == 1
    yield model
    for handle in handles:
        handle.remove()


@pytest.fixture(scope="module")
def prepared() -> Prepared:
    """Random samples: a prompt part left untrained, the rest trained; one trained on every token."""
    rng = np.random.default_rng(0)
    samples = []
    for i, n in enumerate(LENGTHS):
        ids = rng.integers(0, 2000, size=n).tolist()
        labels = list(ids) if i == ALL_TRAINED else [X] * (n // 2) + ids[n // 2:]
        samples.append((ids, labels))
    return _prepared(samples)


def _packed_batch(prepared: Prepared) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """All samples packed into one [1, T] row through PackedDataset and PackingCollator, and the sample order."""
    dataset = PackedDataset(prepared, max_length=sum(LENGTHS))
    assert len(dataset) == 1
    batch = PackingCollator()([dataset[0]])
    batch.pop("num_trained_tokens")
    return batch, dataset.rows


def _per_sample_losses(model: torch.nn.Module, prepared: Prepared) -> tuple[torch.Tensor, int]:
    """Sum of cross entropy over trained positions of each sample run alone, and the trained-position count."""
    total, count = torch.zeros(()), 0
    for ids, labels in zip(prepared.input_ids, prepared.labels):
        trained = int((labels[1:] != X).sum())
        if trained == 0:
            continue
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None],
                    labels=torch.as_tensor(labels, dtype=torch.long)[None])
        total = total + out.loss * trained
        count += trained
    return total, count


def test_packed_logits_equal_each_sample_alone(model: torch.nn.Module, prepared: Prepared) -> None:
    batch, rows = _packed_batch(prepared)
    with torch.no_grad():
        packed = model(**batch).logits[0]
        start = 0
        for index in rows[0]:
            ids = torch.as_tensor(prepared.input_ids[index], dtype=torch.long)
            alone = model(input_ids=ids[None]).logits[0]
            diff = (packed[start:start + len(ids)] - alone).abs().max().item()
            assert diff < 1e-4, f"sample {index} (length {len(ids)}) differs by {diff} when packed"
            start += len(ids)
    assert start == batch["input_ids"].shape[1]


def test_without_the_hook_gpt_oss_attends_across_samples(tiny_dir: Path, prepared: Prepared) -> None:
    # Why install_attention_masks exists: transformers' gpt-oss builds its masks without position_ids.
    model = _load(tiny_dir)
    batch, rows = _packed_batch(prepared)
    first = len(prepared.input_ids[rows[0][0]])
    second = torch.as_tensor(prepared.input_ids[rows[0][1]], dtype=torch.long)
    with torch.no_grad():
        packed = model(**batch).logits[0, first:first + len(second)]
        alone = model(input_ids=second[None]).logits[0]
    assert (packed - alone).abs().max().item() > 1e-2


def test_hook_builds_block_diagonal_masks_windowed_on_sliding_layers(model: torch.nn.Module) -> None:
    lengths = [20, 3, 18]
    positions = torch.cat([torch.arange(n) for n in lengths])
    sample = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    seen: dict[int, torch.Tensor] = {}

    def record(layer: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            seen[layer] = kwargs["attention_mask"]
        return hook

    handles = [model.model.layers[i].register_forward_pre_hook(record(i), with_kwargs=True) for i in (0, 1)]
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, len(positions)), dtype=torch.long), position_ids=positions[None])
    finally:
        for handle in handles:
            handle.remove()
    q, k = torch.meshgrid(torch.arange(len(positions)), torch.arange(len(positions)), indexing="ij")
    causal_within = (sample[q] == sample[k]) & (k <= q)
    window = positions[q] - positions[k] < SLIDING_WINDOW
    for layer, allowed in ((0, causal_within & window), (1, causal_within)):
        mask = seen[layer]
        assert mask.shape == (1, 1, len(positions), len(positions))
        assert torch.equal(mask[0, 0] == 0, allowed), f"layer {layer}"
        assert torch.equal(mask[0, 0][~allowed], torch.full((int((~allowed).sum()),), torch.finfo(torch.float32).min))


def test_hook_leaves_padded_and_single_sample_forwards_alone(model: torch.nn.Module, tiny_dir: Path,
                                                             prepared: Prepared) -> None:
    plain = _load(tiny_dir)
    batch = PaddingCollator(pad_token_id=0)([{"input_ids": i, "labels": l}
                                             for i, l in zip(prepared.input_ids, prepared.labels)])
    batch.pop("num_trained_tokens")
    ids = torch.as_tensor(prepared.input_ids[0], dtype=torch.long)[None]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain(**batch).logits)
        positions = torch.arange(ids.shape[1])[None]
        assert torch.equal(model(input_ids=ids, position_ids=positions).logits, plain(input_ids=ids).logits)


def test_packed_loss_equals_unpacked_and_padded_token_mean(model: torch.nn.Module, prepared: Prepared) -> None:
    batch, _ = _packed_batch(prepared)
    padded = PaddingCollator(pad_token_id=0)([{"input_ids": i, "labels": l}
                                              for i, l in zip(prepared.input_ids, prepared.labels)])
    trained = padded.pop("num_trained_tokens")
    with torch.no_grad():
        total, count = _per_sample_losses(model, prepared)
        packed_loss = model(**batch).loss.item()
        padded_loss = model(**padded).loss.item()
    # 40/2 + 32 + 17-8 + 6-3 + 0 + 12-6 trained positions (the all-trained sample's first token is no target)
    assert count == trained == 20 + 32 + 9 + 3 + 0 + 6
    expected = (total / count).item()
    assert packed_loss == pytest.approx(expected, rel=1e-5)
    assert padded_loss == pytest.approx(expected, rel=1e-5)


def test_packed_gradients_equal_unpacked(model: torch.nn.Module, prepared: Prepared) -> None:
    batch, _ = _packed_batch(prepared)
    model(**batch).loss.backward()
    packed = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    total, count = _per_sample_losses(model, prepared)
    (total / count).backward()
    unpacked = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert packed.keys() == unpacked.keys()
    assert any("sinks" in name for name in packed)
    for name, grad in unpacked.items():
        scale = grad.norm().item()
        assert (packed[name] - grad).norm().item() <= 1e-5 * scale + 1e-12, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention with sinks runs on CUDA only")
def test_packed_equals_unpacked_with_flex_attention(tmp_path: Path) -> None:
    # gpt-oss-20b's window (128) and samples over it, so the block mask spans several 128-token blocks.
    model_dir = write_tiny_model(tmp_path / "model", mxfp4=False, sliding_window=128)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="flex_attention")
    model = model.cuda().eval()
    install_attention_masks(model)
    rng = np.random.default_rng(1)
    samples = []
    for i, n in enumerate((700, 300, 129, 1, 257, 50, 128)):
        ids = rng.integers(0, 2000, size=n).tolist()
        samples.append((ids, list(ids) if i % 2 else [X] * (n // 2) + ids[n // 2:]))
    prepared = _prepared(samples)
    batch = PackingCollator()([PackedDataset(prepared, max_length=2000)[0]])
    batch.pop("num_trained_tokens")
    with torch.no_grad():
        packed = model(**{k: v.cuda() for k, v in batch.items()})
        total, count, start = 0.0, 0, 0
        for ids, labels in samples:
            alone = model(input_ids=torch.tensor([ids], device="cuda"), labels=torch.tensor([labels], device="cuda"))
            diff = (packed.logits[0, start:start + len(ids)] - alone.logits[0]).abs().max().item()
            assert diff < 1e-4, f"sample of length {len(ids)} differs by {diff} when packed"
            start += len(ids)
            trained = sum(1 for t in labels[1:] if t != X)
            if trained:
                total, count = total + alone.loss.item() * trained, count + trained
    assert packed.loss.item() == pytest.approx(total / count, rel=1e-5)
