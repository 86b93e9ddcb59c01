"""bench/train_step.py's ``liger_layer_kernels`` on CUDA: gpt-oss with liger's RMSNorm and rotary embedding computes
the loss and gradients of transformers' own modules, and undoing the patch restores them exactly (the benchmark's
stacks share one model and transformers' module)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.gpt_oss import modeling_gpt_oss

from osstune.models.memory import norm_bytes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def train_step() -> Any:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("train_step", BENCH / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_step"] = module
    spec.loader.exec_module(module)
    return module


def loss_and_grads(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), [param.grad.clone() for param in model.parameters()]


def test_liger_norm_and_rope_match_transformers_and_undo(train_step: Any) -> None:
    config = train_step.make_setup(True, 4).config
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    ids = torch.randint(0, config.vocab_size - 1, (2, 48), device="cuda")
    rope = modeling_gpt_oss.apply_rotary_pos_emb
    loss, grads = loss_and_grads(model, ids)

    undo, label = train_step.liger_layer_kernels(model)
    assert undo is not None and label == "liger RMSNorm + RoPE"
    assert modeling_gpt_oss.apply_rotary_pos_emb is not rope
    norms = [module for module in model.modules() if isinstance(module, modeling_gpt_oss.GptOssRMSNorm)]
    assert len(norms) == 2 * config.num_hidden_layers + 1 and all("forward" in norm.__dict__ for norm in norms)
    liger_loss, liger_grads = loss_and_grads(model, ids)
    torch.testing.assert_close(liger_loss, loss, rtol=1e-5, atol=1e-5)
    for mine, reference in zip(liger_grads, grads):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)

    undo()
    assert modeling_gpt_oss.apply_rotary_pos_emb is rope
    assert not any("forward" in norm.__dict__ or "casting_mode" in norm.__dict__ for norm in norms)
    again, again_grads = loss_and_grads(model, ids)
    torch.testing.assert_close(again, loss, rtol=1e-6, atol=0)  # transformers' own path again (up to atomics)
    for mine, reference in zip(again_grads, grads):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-7)


def test_liger_rmsnorm_saves_what_the_estimate_counts(train_step: Any) -> None:
    tokens, hidden = 512, 2880
    norm = modeling_gpt_oss.GptOssRMSNorm(hidden, eps=1e-5).to("cuda", torch.bfloat16).requires_grad_(False)
    undo, _ = train_step.liger_layer_kernels(norm)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() != norm.weight.untyped_storage().data_ptr():
            saved[tensor.untyped_storage().data_ptr()] = tensor.numel() * tensor.element_size()
        return tensor

    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        norm(x * 1.0)  # a fresh input: liger saves it (its backward writes into the upstream gradient)
    undo()
    assert sum(saved.values()) == tokens * norm_bytes(hidden, 2, fused=True)
