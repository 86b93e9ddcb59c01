"""The input embedding kept in host RAM (``HostEmbedding``) and the bounded MXFP4 dequantisation scratch
(``limit_dense_experts``): same outputs, nothing else moved, PEFT and input-gradient hooks, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from osstune.errors import OsstuneError
from osstune.models.gpt_oss.mxfp4_experts import Mxfp4Experts
from osstune.models.host_embedding import (
    HostEmbedding,
    frozen_host_embeddings,
    input_device,
    offload_input_embeddings,
    offloadable_embedding,
)
from osstune.models.loading import check_dequant_experts, limit_dense_experts, load_model
from osstune.models.lora import LoraSpec, apply_lora

SPEC = LoraSpec(rank=4, alpha=8, dropout=0.0)
VOCAB, HIDDEN, LAYERS = 3072, 64, 4  # the tiny gpt-oss (osstune.models.gpt_oss.tiny)


def quiet() -> Console:
    """A console that prints nothing."""
    return Console(quiet=True)


def batch() -> torch.Tensor:
    """A fixed batch of 2 sequences of 12 token ids."""
    return torch.randint(0, 3000, (2, 12), generator=torch.Generator().manual_seed(1))


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    """A two-layer Llama with random weights, its embedding tied to the output layer or not."""
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def test_offloaded_model_gives_the_same_logits_and_moves_nothing_else(tiny_model_dir: Path) -> None:
    reference = load_model(tiny_model_dir, torch_dtype="float32", device="cpu", console=quiet()).model
    loaded = load_model(tiny_model_dir, torch_dtype="float32", device="cpu", console=quiet())
    model = loaded.model
    before = {name: (param.device, param.data_ptr()) for name, param in model.named_parameters()}
    table = model.model.embed_tokens.weight
    host = offload_input_embeddings(model)

    assert model.get_input_embeddings() is host and isinstance(host, HostEmbedding)
    assert host.weight.device.type == "cpu" and host.weight.data_ptr() == table.data_ptr()  # no copy on the CPU
    assert not host.weight.requires_grad and (host.num_embeddings, host.embedding_dim) == (VOCAB, HIDDEN)
    after = {name: (param.device, param.data_ptr()) for name, param in model.named_parameters()}
    assert after == before  # same names (``weight`` kept), same storage: nothing moved
    names = [name for name, _ in model.named_parameters()]
    assert names[0] == "model.layers.0.self_attn.sinks"  # registered last, so model.device is the compute device
    assert names.index("model.embed_tokens.weight") == len(names) - 2
    assert input_device(model) == torch.device("cpu")
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch()).logits, reference(input_ids=batch()).logits)


def test_rows_go_to_the_compute_device_and_the_table_stays(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, torch_dtype="float32", device="cpu", console=quiet()).model
    host = offload_input_embeddings(model)
    expected = host.weight[batch()].clone()

    model.to(torch.float64)  # a dtype change converts the table where it is
    assert host.weight.dtype == torch.float64 and host.weight.device.type == "cpu"
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float64
    assert torch.equal(host(batch()), expected.double())

    host.to("meta")  # any other device stands for the GPU: only where the rows go changes
    assert host.compute_device == torch.device("meta") and input_device(model) == torch.device("meta")
    assert host.weight.device.type == "cpu" and host.weight.dtype == torch.float64
    rows = host(batch())
    assert rows.device.type == "meta" and rows.shape == (2, 12, HIDDEN) and rows.dtype == torch.float64
    host.to("cpu")
    assert host.compute_device == torch.device("cpu")
    assert torch.equal(host(batch()), expected.double())


def test_peft_wrapping_input_gradients_and_saving(tiny_model_dir: Path, tmp_path: Path) -> None:
    def lora(offload: bool) -> nn.Module:
        base = load_model(tiny_model_dir, torch_dtype="float32", device="cpu", console=quiet(),
                          offload_embeddings=offload).model
        torch.manual_seed(0)
        return apply_lora(base, SPEC, console=quiet())

    plain, offloaded = lora(False), lora(True)
    assert frozen_host_embeddings(plain) == []
    assert frozen_host_embeddings(offloaded) == ["base_model.model.model.embed_tokens.weight"]
    assert isinstance(offloaded.get_input_embeddings(), HostEmbedding)
    assert set(dict(offloaded.named_parameters())) == set(dict(plain.named_parameters()))
    offloaded.enable_input_require_grads()  # what checkpointed training needs: the embedding output requires grad
    rows = offloaded.get_input_embeddings()(batch())
    assert rows.requires_grad and rows.grad_fn is None

    grads = []
    for model in (plain, offloaded):
        model.train()
        loss = model(input_ids=batch(), labels=batch()).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, grad in grads[0].items():
        assert torch.equal(grads[1][name], grad), name

    plain.save_pretrained(tmp_path / "plain")
    offloaded.save_pretrained(tmp_path / "offloaded")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "offloaded" / "adapter_model.safetensors")
    assert saved.keys() == load_file(tmp_path / "plain" / "adapter_model.safetensors").keys()
    assert not any("embed_tokens" in key for key in saved)


def test_a_trained_embedding_is_refused(tiny_model_dir: Path) -> None:
    base = load_model(tiny_model_dir, torch_dtype="float32", device="cpu", console=quiet(),
                      offload_embeddings=True).model
    model = apply_lora(base, LoraSpec(rank=4, alpha=8, dropout=0.0, modules_to_save=("embed_tokens",)),
                       console=quiet())
    with pytest.raises(OsstuneError, match="must stay frozen"):
        frozen_host_embeddings(model)
    with pytest.raises(OsstuneError, match="must stay frozen"):
        model(input_ids=batch())

    host = HostEmbedding(torch.randn(10, 4), torch.device("cpu"))
    host.weight.requires_grad_(True)
    with pytest.raises(OsstuneError, match="must stay frozen"):
        frozen_host_embeddings(host)
    with torch.no_grad():  # without autograd nothing is trained: inference still works
        assert torch.equal(host(torch.tensor([3, 1])), host.weight[[3, 1]])


def test_tied_scaled_and_max_norm_embeddings_are_refused() -> None:
    with pytest.raises(OsstuneError, match="ties its input embedding"):
        offload_input_embeddings(tiny_llama(tied=True))
    untied = tiny_llama(tied=False)
    assert offloadable_embedding(untied) is untied.model.embed_tokens
    assert isinstance(offload_input_embeddings(untied), HostEmbedding)

    class Scaled(nn.Embedding):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return super().forward(input) * 2.0

    scaled = tiny_llama(tied=False)
    scaled.model.embed_tokens = Scaled(128, 32)
    with pytest.raises(OsstuneError, match="is a Scaled; only a plain torch.nn.Embedding without max_norm"):
        offload_input_embeddings(scaled)
    normed = tiny_llama(tied=False)
    normed.model.embed_tokens = nn.Embedding(128, 32, max_norm=1.0)
    with pytest.raises(OsstuneError, match="Embedding with max_norm"):
        offload_input_embeddings(normed)
    with pytest.raises(OsstuneError, match=r"\[num_embeddings, embedding_dim\]"):
        HostEmbedding(torch.zeros(3), torch.device("cpu"))


def test_dequant_experts_sets_every_layer(tiny_model_dir: Path) -> None:
    loaded = load_model(tiny_model_dir, torch_dtype="float32", device="cpu", console=quiet(),
                        expert_weights="mxfp4", dequant_experts=2)
    assert loaded.dequant_experts == 2 and loaded.expert_weights == "mxfp4"
    layers = [module for module in loaded.model.modules() if isinstance(module, Mxfp4Experts)]
    assert len(layers) == LAYERS and all(layer.max_dense_experts == 2 for layer in layers)
    assert all(stack.max_dense_experts == 2 for layer in layers for stack in layer.weight_stacks())
    assert limit_dense_experts(apply_lora(loaded.model, SPEC, console=quiet()), 0) == LAYERS  # PEFT-wrapped too
    assert all(layer.max_dense_experts is None for layer in layers)

    dense = load_model(tiny_model_dir, torch_dtype="float32", device="cpu", console=quiet()).model
    with pytest.raises(OsstuneError, match="holds no MXFP4 experts; load it with --expert_weights mxfp4"):
        limit_dense_experts(dense, 2)
    with pytest.raises(OsstuneError, match="at least 1"):
        limit_dense_experts(loaded.model, -1)


def test_dequant_experts_needs_mxfp4_experts(tiny_model_dir: Path) -> None:
    check_dequant_experts(0, "bf16")
    check_dequant_experts(4, "mxfp4")
    check_dequant_experts(4, "auto")
    with pytest.raises(OsstuneError, match="Add --expert_weights mxfp4"):
        check_dequant_experts(4, "bf16")
    with pytest.raises(OsstuneError, match="--dequant_experts -1"):
        check_dequant_experts(-1, "mxfp4")
    with pytest.raises(OsstuneError, match="Add --expert_weights mxfp4"):
        load_model(tiny_model_dir, torch_dtype="float32", device="cpu", console=quiet(), dequant_experts=2)
    # auto picks bf16 when the dense weights fit (the tiny model always does): the bound does not apply, it says so.
    console = Console(record=True, width=200)
    auto = load_model(tiny_model_dir, torch_dtype="float32", device="cpu", console=console, expert_weights="auto",
                      dequant_experts=2)
    assert auto.expert_weights == "bf16" and auto.dequant_experts == 0
    assert "--dequant_experts 2 does not apply" in console.export_text()
