"""gpt-oss's causal-LM forward with osstune's fused linear cross-entropy (``osstune.kernels.cross_entropy``).

With labels, ``fused_loss_forward`` runs the decoder, then the loss of ``lm_head`` on the final hidden states
against the shifted labels in chunks of logits, and returns no logits; it computes what
``GptOssForCausalLM.forward`` computes (Hugging Face's causal-LM loss: labels shifted by one, ``-100`` ignored, the
sum divided by ``num_items_in_batch`` when the Trainer passes it, else the mean; plus the router's auxiliary loss
when ``output_router_logits`` is on). Without labels (evaluation of logits, generation) the model's own forward runs.
It is what ``osstune sft --use_liger_kernel true`` trains gpt-oss with, in place of liger's fused loss, whose
128-row chunks run the output-embedding GEMMs well below the card's rate at gpt-oss's vocabulary (bench/RESULTS.md).
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F

from osstune.chat.options import IGNORE_INDEX
from osstune.kernels.cross_entropy import linear_cross_entropy


def fused_loss_applies(model: Any) -> bool:
    """Whether ``install_fused_loss`` can take over the loss: a gpt-oss causal LM whose ``lm_head`` is a plain
    bias-free ``nn.Linear`` (not LoRA-wrapped, not offloaded to host RAM).

    Args:
        model: the causal LM (unwrapped from PEFT).
    """
    head = getattr(model, "lm_head", None)
    return (getattr(getattr(model, "config", None), "model_type", None) == "gpt_oss"
            and type(head) is torch.nn.Linear and head.bias is None)


def install_fused_loss(model: Any) -> bool:
    """Make the model's forward compute its training loss with the fused linear cross-entropy.

    Args:
        model: the gpt-oss causal LM (unwrapped from PEFT).

    Returns:
        Whether it was installed (see ``fused_loss_applies``).
    """
    if not fused_loss_applies(model):
        return False
    model.forward = MethodType(fused_loss_forward, model)
    return True


def fused_loss_forward(self: Any, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                       labels: torch.Tensor | None = None, use_cache: bool | None = None,
                       output_router_logits: bool | None = None, **kwargs: Any) -> Any:
    """``GptOssForCausalLM.forward`` whose loss is the fused linear cross-entropy (see the module docstring).

    Args:
        self: the causal LM.
        input_ids: token ids ``[B, T]``.
        attention_mask: as the model's forward.
        position_ids: as the model's forward.
        inputs_embeds: as the model's forward.
        labels: ``[B, T]``, unshifted; None runs the model's own forward.
        use_cache: as the model's forward.
        output_router_logits: as the model's forward.
        **kwargs: the model's other arguments, and the Trainer's ``num_items_in_batch``.
    """
    if labels is None:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  inputs_embeds=inputs_embeds, use_cache=use_cache,
                                  output_router_logits=output_router_logits, **kwargs)
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast
    from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func

    if output_router_logits is None:
        output_router_logits = self.config.output_router_logits
    divisor = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("logits_to_keep", None)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, output_router_logits=output_router_logits,
                         **kwargs)
    hidden = outputs.last_hidden_state
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(hidden.device)
    loss = linear_cross_entropy(hidden, self.lm_head.weight, targets, divisor=divisor)
    aux_loss = None
    if output_router_logits:
        aux_loss = load_balancing_loss_func(outputs.router_logits, self.num_experts, self.num_experts_per_tok,
                                            attention_mask)
        loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
    return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=None, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions, router_logits=outputs.router_logits)
