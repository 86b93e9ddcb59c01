"""gpt-oss's forward with osstune's fused linear cross-entropy against transformers' own forward, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GptOssConfig, GptOssForCausalLM

from osstune.models.gpt_oss.fused_loss import fused_loss_applies, install_fused_loss


def tiny_model(**overrides: object) -> GptOssForCausalLM:
    """Two float64 layers with random weights (vocabulary 96)."""
    config = GptOssConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_local_experts=4,
                          num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          vocab_size=96, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                          attn_implementation="eager", experts_implementation="eager", **overrides)
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).double()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


def batch() -> dict[str, torch.Tensor]:
    """Two rows of 10 tokens, prompt positions and padding masked in the labels."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 96, (2, 10), generator=gen)
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[1, 8:] = -100
    return {"input_ids": input_ids, "labels": labels}


def loss_and_grads(model: GptOssForCausalLM, **kwargs: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The forward's loss and the gradients of every parameter that gets one."""
    model.zero_grad()
    out = model(**batch(), **kwargs)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("kwargs", [{}, {"num_items_in_batch": torch.tensor(11)}])
@pytest.mark.parametrize("router_logits", [False, True])
def test_fused_forward_gives_transformers_loss_and_gradients(kwargs: dict, router_logits: bool) -> None:
    model = tiny_model(output_router_logits=router_logits)
    ref_loss, ref_grads = loss_and_grads(model, **kwargs)
    assert install_fused_loss(model)
    loss, grads = loss_and_grads(model, **kwargs)
    out = model(**batch(), **kwargs)
    assert out.logits is None and (out.aux_loss is not None) == router_logits
    # transformers' loss casts the logits to float32; the fused one keeps float64 (its sum is float32).
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert len(grads) == len(ref_grads) > 0
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6 * ref_grad.abs().max().item())


def test_without_labels_the_models_own_forward_runs() -> None:
    model = tiny_model()
    input_ids = batch()["input_ids"]
    ref = model(input_ids=input_ids).logits
    install_fused_loss(model)
    assert torch.equal(model(input_ids=input_ids).logits, ref)


def test_applies_to_a_plain_output_embedding_only() -> None:
    model = tiny_model()
    assert fused_loss_applies(model)
    model.lm_head = nn.Linear(32, 96, bias=True).double()
    assert not fused_loss_applies(model) and not install_fused_loss(model)
