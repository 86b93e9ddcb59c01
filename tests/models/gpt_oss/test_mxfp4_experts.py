"""Experts kept as MXFP4: exact on-the-fly dequantisation, the dense path's logits and gradients, PEFT round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from rich.console import Console
from safetensors import safe_open
from torch import nn
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from osstune.errors import OsstuneError
from osstune.models.gpt_oss.experts import experts_forward, grouped_matmul, route_by_expert
from osstune.models.gpt_oss.moe_lora import disable_grouped_expert_lora
from osstune.models.gpt_oss.mxfp4 import quantize_mxfp4
from osstune.models.gpt_oss.mxfp4_experts import (
    Mxfp4Experts,
    Mxfp4Stack,
    dense_expert_weights,
    is_mxfp4_checkpoint,
    load_mxfp4_model,
)
from osstune.models.loading import load_model, resolve_expert_weights
from osstune.models.lora import LoraSpec, apply_lora

INT_VIEW = {torch.bfloat16: torch.int16, torch.float32: torch.int32}
LAYERS, EXPERTS, HIDDEN, INTERMEDIATE = 4, 8, 64, 64  # the tiny model (osstune.models.gpt_oss.tiny)
SPEC = LoraSpec(rank=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm()).item()


def quiet() -> Console:
    """A console that prints nothing."""
    return Console(quiet=True)


def lora_model(model_dir: Path, dtype: str, expert_weights: str) -> PeftModel:
    """The tiny model with LoRA on attention and all experts, every LoRA factor random (seeded, same in any mode)."""
    base = load_model(model_dir, torch_dtype=dtype, device="cpu", console=quiet(), expert_weights=expert_weights)
    torch.manual_seed(0)
    model = apply_lora(base.model, SPEC, console=quiet())
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model


def batch() -> torch.Tensor:
    """A fixed batch of 2 sequences of 12 token ids."""
    return torch.randint(0, 3000, (2, 12), generator=torch.Generator().manual_seed(1))


def logits_and_grads(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the LM loss's gradient of every trainable parameter."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch(), labels=batch())
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_stacks_dequantise_bit_identically_to_transformers(tiny_model_dir: Path) -> None:
    loaded = load_model(tiny_model_dir, torch_dtype="bfloat16", device="cpu", console=quiet(), expert_weights="mxfp4")
    assert loaded.expert_weights == "mxfp4"
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as shard:
        for index, layer in enumerate(loaded.model.model.layers):
            experts = layer.mlp.experts
            assert isinstance(experts, Mxfp4Experts)
            for name, stack in zip(("gate_up_proj", "down_proj"), experts.weight_stacks(), strict=True):
                prefix = f"model.layers.{index}.mlp.experts.{name}"
                blocks, scales = shard.get_tensor(f"{prefix}_blocks"), shard.get_tensor(f"{prefix}_scales")
                assert torch.equal(stack.blocks, blocks) and torch.equal(stack.scales, scales)
                for dtype in INT_VIEW:
                    reference = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
                    ours = Mxfp4Stack(blocks, scales, dtype)
                    assert ours.shape == reference.shape
                    assert torch.equal(ours.dequantize().view(INT_VIEW[dtype]), reference.view(INT_VIEW[dtype]))
                    one = ours.dequantize(slice(3, 4))  # the per-expert scratch of the loop path
                    assert torch.equal(one.view(INT_VIEW[dtype]), reference[3:4].view(INT_VIEW[dtype]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_byte_and_scale_edge_matches_transformers_bitwise(dtype: torch.dtype) -> None:
    # 256 byte values cover every (low, high) nibble pair; scales: zero, subnormal results, 1.0, large, 254, 255 (NaN
    # in the OCP spec: transformers' ldexp gives inf for non-zero codes).
    edge_scales = torch.tensor([0, 1, 2, 100, 126, 127, 128, 200, 253, 254, 255], dtype=torch.uint8)
    blocks = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(2, len(edge_scales), 16, 16)
    scales = edge_scales.reshape(1, -1, 1).expand(2, -1, 16).contiguous()
    stack = Mxfp4Stack(blocks.contiguous(), scales, dtype)
    reference = convert_moe_packed_tensors(blocks.contiguous(), scales, dtype=dtype)
    ours = stack.dequantize()
    assert torch.equal(ours.view(INT_VIEW[dtype]), reference.view(INT_VIEW[dtype]))
    assert ours[0, 0:2, 5].tolist() == [0.0, 0.0]  # byte 0 at scale 127
    assert ours[0, 32:34, 5].tolist() == [0.0, 0.5]  # byte 0x10 at scale 127: low nibble (even column) first
    assert ours[0, 33, 10].item() == 2.0**127  # byte 0x10 (code 1, 0.5, in the odd column) at scale 255
    assert ours[0, 65, 10].item() == float("inf")  # byte 0x20 (code 2, 1.0) at scale 255 overflows
    assert ours[0, 33, 0].item() == 0.5 * 2.0**-127  # scale 0: a subnormal float32 and bfloat16 value


def test_loaded_model_holds_no_dense_expert_weight(tiny_model_dir: Path, tiny_bf16_dir: Path) -> None:
    dense = load_model(tiny_model_dir, torch_dtype="float32", device="cpu", console=quiet())
    assert len(dense_expert_weights(dense.model)) == 2 * LAYERS
    loaded = load_model(tiny_model_dir, torch_dtype="float32", device="cpu", console=quiet(), expert_weights="mxfp4")
    model = loaded.model
    assert dense_expert_weights(model) == []
    assert not hasattr(model.config, "quantization_config")
    assert model.config.name_or_path == str(tiny_model_dir)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (EXPERTS, HIDDEN, 2 * INTERMEDIATE)
    assert experts.gate_up_proj.untyped_storage().nbytes() == 4  # one float32 element behind the whole stack
    assert not experts.gate_up_proj.requires_grad
    assert {name: tuple(buf.shape) for name, buf in experts.named_buffers()} == {
        "gate_up_proj_blocks": (EXPERTS, 2 * INTERMEDIATE, HIDDEN // 32, 16),
        "gate_up_proj_scales": (EXPERTS, 2 * INTERMEDIATE, HIDDEN // 32),
        "down_proj_blocks": (EXPERTS, HIDDEN, INTERMEDIATE // 32, 16),
        "down_proj_scales": (EXPERTS, HIDDEN, INTERMEDIATE // 32),
    }
    dense_state = dense.model.state_dict()
    for name, tensor in model.state_dict().items():
        if name.endswith(("_blocks", "_scales", "gate_up_proj", "down_proj")):
            continue
        assert torch.equal(tensor, dense_state[name]), name
    with pytest.raises(OsstuneError, match="not a gpt-oss checkpoint with MXFP4 experts"):
        load_model(tiny_bf16_dir, torch_dtype="float32", device="cpu", console=quiet(), expert_weights="mxfp4")
    with pytest.raises(OsstuneError, match="does not store its experts as MXFP4"):
        load_mxfp4_model(tiny_bf16_dir, [tiny_bf16_dir / "model.safetensors"], dtype=torch.float32,
                         attn_impl="eager", device=torch.device("cpu"))


def test_expert_weights_choice(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from osstune.models import loading

    config = {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}, "hidden_size": 64,
              "intermediate_size": 64, "num_local_experts": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "num_hidden_layers": 4, "vocab_size": 3072}
    assert is_mxfp4_checkpoint(config)
    cpu = torch.device("cpu")
    console = Console(record=True, width=400)
    monkeypatch.setattr(loading, "free_memory_bytes", lambda device: 1000)
    assert resolve_expert_weights("auto", config, torch.bfloat16, cpu, console) == "mxfp4"
    assert "keeping the experts as MXFP4" in console.export_text()
    monkeypatch.setattr(loading, "free_memory_bytes", lambda device: 10**12)
    assert resolve_expert_weights("auto", config, torch.bfloat16, cpu, console) == "bf16"
    assert resolve_expert_weights("mxfp4", config, torch.bfloat16, cpu, console) == "mxfp4"
    dense = {key: value for key, value in config.items() if key != "quantization_config"}
    assert resolve_expert_weights("auto", dense, torch.bfloat16, cpu, console) == "bf16"
    with pytest.raises(OsstuneError, match="not a gpt-oss checkpoint with MXFP4 experts"):
        resolve_expert_weights("mxfp4", dense, torch.bfloat16, cpu, console)
    with pytest.raises(OsstuneError, match="use one of mxfp4, bf16, auto"):
        resolve_expert_weights("fp8", config, torch.bfloat16, cpu, console)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_and_lora_grads_equal_the_dense_path(tiny_model_dir: Path, dtype: str) -> None:
    dense_logits, dense_grads = logits_and_grads(lora_model(tiny_model_dir, dtype, "bf16"))
    model = lora_model(tiny_model_dir, dtype, "mxfp4")
    logits, grads = logits_and_grads(model)
    assert grads.keys() == dense_grads.keys()
    assert sum(".mlp.experts." in name for name in grads) == 4 * LAYERS  # lora_A and lora_B of both stacks
    # The dense weights are the dequantised ones and every matmul is the same: the results are bit-identical.
    assert torch.equal(logits, dense_logits)
    for name, grad in grads.items():
        assert dense_grads[name].abs().max() > 0, name
        assert torch.equal(grad, dense_grads[name]), name
    experts = model.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    assert experts.gate_up_proj.grad is None and experts.gate_up_proj_bias.grad is None


def saved_shapes(run) -> list[tuple[int, ...]]:
    """Shapes of every tensor that autograd saves for the backward pass while ``run()`` builds the graph."""
    shapes: list[tuple[int, ...]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return shapes


@pytest.mark.parametrize("grouped", [False, True])
def test_backward_recomputes_the_weights_instead_of_keeping_them(grouped: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    w_EIO = torch.randn(4, 64, 96, generator=gen, dtype=torch.float32)
    stack = Mxfp4Stack(*quantize_mxfp4(w_EIO), torch.float32)
    dense_EIO = stack.dequantize()
    routing = route_by_expert(torch.tensor([[0, 3], [3, 1], [1, 0], [0, 3], [3, 0]]), 4)  # expert 2 gets no row
    x_SI = torch.randn(10, 64, generator=gen).requires_grad_(True)
    probe = torch.randn(10, 96, generator=gen)

    dense_out = grouped_matmul(x_SI, dense_EIO.requires_grad_(True), routing.ends_E, grouped)
    dense_grad = torch.autograd.grad((dense_out * probe).sum(), x_SI)[0]
    dense_EIO.requires_grad_(False)
    out = stack.matmul(x_SI, routing.ends_E, grouped)
    grad = torch.autograd.grad((out * probe).sum(), x_SI)[0]
    assert torch.equal(out, dense_out.detach())
    assert rel_err(grad, dense_grad) < 1e-6
    assert grad.abs().max() > 0

    weight_shapes = {(4, 64, 96), (64, 96), (96, 64), (4, 96, 64)}
    dense_saved = saved_shapes(lambda: grouped_matmul(x_SI, dense_EIO.requires_grad_(False), routing.ends_E, grouped))
    assert weight_shapes & set(dense_saved)  # the dense path keeps the weight for the input gradient
    assert weight_shapes.isdisjoint(saved_shapes(lambda: stack.matmul(x_SI, routing.ends_E, grouped)))


@pytest.mark.parametrize("chunk", [1, 2, 3, 4])
def test_bounded_scratch_gives_the_whole_stack_result(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(5)
    blocks, scales = quantize_mxfp4(torch.randn(4, 128, 96, generator=gen))  # I = 128 (4 scale groups), O = 96
    whole = Mxfp4Stack(blocks, scales, torch.float32)
    bounded = Mxfp4Stack(blocks, scales, torch.float32, max_dense_experts=chunk)
    routing = route_by_expert(torch.tensor([[0, 3], [3, 1], [1, 0], [0, 3], [3, 0]]), 4)  # expert 2 gets no row
    x_SI = torch.randn(10, 128, generator=gen)
    probe = torch.randn(10, 96, generator=gen)
    dense_sizes: list[int] = []
    original = Mxfp4Stack.dequantize_rows

    def recorded(self: Mxfp4Stack, *args: Any, **kwargs: Any) -> torch.Tensor:
        dense = original(self, *args, **kwargs)
        dense_sizes.append(dense.numel())
        return dense

    monkeypatch.setattr(Mxfp4Stack, "dequantize_rows", recorded)
    for transpose, rows in ((False, x_SI), (True, probe)):
        expected = whole.multiply(rows, routing.ends_E, grouped=True, transpose=transpose)
        dense_sizes.clear()
        assert torch.equal(bounded.multiply(rows, routing.ends_E, grouped=True, transpose=transpose), expected)
        # One dequantisation per slice, each every expert's share of it: the slices add up to the stack once.
        slices = bounded.slices(4 if transpose else 96, align=1 if transpose else 32)
        assert len(dense_sizes) == len(slices) and sum(dense_sizes) == 4 * 128 * 96
        assert (len(slices) > 1 and max(dense_sizes) < 4 * 128 * 96) if chunk < 4 else len(slices) == 1
        looped = whole.multiply(rows, routing.ends_E, grouped=False, transpose=transpose)
        assert rel_err(expected, looped) < 1e-6 and expected.abs().max() > 0


def test_slices_cover_the_dimension_aligned() -> None:
    blocks = torch.zeros(32, 5760, 90, 16, dtype=torch.uint8)  # gpt-oss-20b's gate_up stack
    stack = Mxfp4Stack(blocks, blocks[..., 0], torch.bfloat16, max_dense_experts=8)
    assert stack.slices(5760, align=32) == [slice(0, 1440), slice(1440, 2880), slice(2880, 4320), slice(4320, 5760)]
    assert stack.slices(90, align=1) == [slice(0, 23), slice(23, 46), slice(46, 69), slice(69, 90)]
    assert Mxfp4Stack(blocks, blocks[..., 0], torch.bfloat16, max_dense_experts=12).slices(2880, align=32) == [
        slice(0, 960), slice(960, 1920), slice(1920, 2880)]
    assert Mxfp4Stack(blocks, blocks[..., 0], torch.bfloat16).slices(5760, align=32) == [slice(None)]
    assert Mxfp4Stack(blocks, blocks[..., 0], torch.bfloat16, max_dense_experts=32).slices(90, 1) == [slice(None)]


def test_layer_forward_without_lora_matches_dense(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, torch_dtype="float32", device="cpu", console=quiet(),
                       expert_weights="mxfp4").model
    experts = model.model.layers[1].mlp.experts
    hidden = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(3))
    indices = torch.tensor([[0, 5], [5, 7], [2, 0], [1, 2], [7, 6], [6, 1], [3, 4]])
    weights = torch.softmax(torch.randn(7, 2, generator=torch.Generator().manual_seed(4)), dim=-1)
    gate_up, down = experts.weight_stacks()
    reference = experts_forward(
        hidden, indices, weights, gate_up_EHF=gate_up.dequantize(), gate_up_bias_EF=experts.gate_up_proj_bias,
        down_EIH=down.dequantize(), down_bias_EH=experts.down_proj_bias, apply_gate=experts._apply_gate,
    )
    assert torch.equal(experts(hidden, indices, weights), reference)


def test_short_training_gives_the_dense_losses(tiny_model_dir: Path) -> None:
    def train(expert_weights: str) -> list[float]:
        model = lora_model(tiny_model_dir, "bfloat16", expert_weights)
        model.train()
        params = [param for param in model.parameters() if param.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for _ in range(4):
            optimizer.zero_grad(set_to_none=True)
            loss = model(input_ids=batch(), labels=batch()).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    dense, mxfp4 = train("bf16"), train("mxfp4")
    assert dense[-1] < dense[0] - 0.1  # it learns
    for ours, reference in zip(mxfp4, dense, strict=True):
        assert abs(ours - reference) <= 2**-8 * abs(reference)  # bf16 noise (on the CPU they are in fact equal)


def test_saved_adapter_loads_with_plain_peft_on_a_dense_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = lora_model(tiny_model_dir, "float32", "mxfp4")
    with torch.no_grad():
        logits = model(input_ids=batch()).logits
        with model.disable_adapter():
            base_logits = model(input_ids=batch()).logits
    assert rel_err(logits, base_logits) > 0.01  # the adapter matters
    model.save_pretrained(tmp_path)

    dense = load_model(tiny_model_dir, torch_dtype="float32", device="cpu", console=quiet()).model
    reloaded = PeftModel.from_pretrained(dense, tmp_path)  # PEFT's own forward: W + BA materialised
    with torch.no_grad():
        assert rel_err(reloaded(input_ids=batch()).logits, logits) < 1e-5
        with reloaded.disable_adapter():
            assert rel_err(reloaded(input_ids=batch()).logits, base_logits) < 1e-5


def test_peft_forward_on_mxfp4_experts_is_refused(tiny_model_dir: Path) -> None:
    model = lora_model(tiny_model_dir, "float32", "mxfp4")
    assert disable_grouped_expert_lora(model) == 2 * LAYERS
    with pytest.raises(OsstuneError, match="grouped forward only"):
        model(input_ids=batch())
