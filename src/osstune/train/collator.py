"""Batches for training: right padding, or padding-free packing with per-sample attention.

Both collators take items with ``input_ids`` and ``labels`` (unshifted, ``IGNORE_INDEX`` where not trained; the
model shifts them) and return torch tensors plus ``num_trained_tokens``, the number of positions that contribute to
the loss (labels after the shift that are not ``IGNORE_INDEX``), for logging trained tokens and tokens/s. That key
is bookkeeping: remove it before the batch reaches the model.

Loss reduction. The Hugging Face causal-LM loss sums the cross entropy of every trained position and divides by
the trained positions of the batch, or, under the Trainer with gradient accumulation, by ``num_items_in_batch``:
the trained positions (``labels[..., 1:]`` that are not ignored) of all micro-batches of the optimizer step, over
all devices when ``average_tokens_across_devices`` is on. Either way the step's loss is a token mean over the step,
so it does not depend on how samples are grouped into micro-batches or rows. Packing does change which samples
share a step (a row holds several), so step losses of packed and unpacked runs are means over different samples;
over the same samples, padded and packed batches give the same loss and the same gradients.

Packing and attention. :class:`PackingCollator` returns ``position_ids`` that restart at 0 for each sample and no
``attention_mask``; transformers then finds the samples from the position ids and builds a block-diagonal causal
mask, sliding-window layers included (``masking_utils.find_packed_sequence_indices``), for eager, sdpa and
flex_attention. gpt-oss in transformers 5.24 does not pass ``position_ids`` to its mask builders, so without
:func:`install_attention_masks` attention crosses sample boundaries; call it once on the model before
training with packing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
)
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssModel

from osstune.chat.options import IGNORE_INDEX
from osstune.errors import OsstuneError


def _as_long(values: Any) -> torch.Tensor:
    """A 1-D int64 tensor from a list, numpy array or tensor of token ids."""
    return torch.as_tensor(np.asarray(values, dtype=np.int64))


def _split_item(item: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``input_ids`` and ``labels`` of one item as int64 tensors, checked to be non-empty and of equal length."""
    ids, labels = _as_long(item["input_ids"]), _as_long(item["labels"])
    if ids.ndim != 1 or ids.shape != labels.shape or len(ids) == 0:
        raise ValueError(
            f"each item needs 1-D input_ids and labels of the same non-zero length, got {tuple(ids.shape)} "
            f"and {tuple(labels.shape)}"
        )
    return ids, labels


def count_trained_tokens(labels: torch.Tensor) -> int:
    """Positions that contribute to a causal-LM loss: labels after the one-token shift that are not ignored.

    Args:
        labels: ``[batch, length]`` unshifted labels, ``IGNORE_INDEX`` where not trained.

    Returns:
        The count, as the Trainer's ``num_items_in_batch`` counts it (position 0 of a row is never a target).
    """
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


class PaddingCollator:
    """Right-pads items to the longest in the batch.

    Returns ``input_ids`` (pads are ``pad_token_id``), ``attention_mask`` (1 on tokens, 0 on pads; left out when
    the batch has no pad, which means the same to the model and lets it reuse its masks, ``install_attention_masks``)
    and ``labels`` (``IGNORE_INDEX`` on pads), all ``[batch, length]`` int64, and ``num_trained_tokens`` (int). See
    the module docstring for how the loss is reduced.

    Args:
        pad_token_id: token id written on pad positions (never attended to, never trained).
        pad_to_multiple_of: round the padded length up to a multiple of this (None: the longest item's length).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate ``items`` (each with ``input_ids`` and ``labels``; other keys are ignored) into one batch."""
        if not items:
            raise ValueError("cannot collate an empty batch")
        pairs = [_split_item(item) for item in items]
        length = max(len(ids) for ids, _ in pairs)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(pairs), length), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(pairs), length), dtype=torch.int64)
        labels = torch.full((len(pairs), length), IGNORE_INDEX, dtype=torch.int64)
        for row, (ids, row_labels) in enumerate(pairs):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            labels[row, : len(ids)] = row_labels
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "num_trained_tokens": count_trained_tokens(labels)}
        if all(len(ids) == length for ids, _ in pairs):
            del batch["attention_mask"]
        return batch


class PackingCollator:
    """Concatenates all items of a batch into one row, padding-free: ``input_ids`` ``[1, total]``.

    An item is one sample (``input_ids``, ``labels``) or a packed row from
    :class:`~osstune.train.dataset.PackedDataset` that also carries ``position_ids`` restarting at 0 for each of
    its samples. The batch holds ``input_ids``, ``labels`` and ``position_ids``, all ``[1, total]`` int64, and
    ``num_trained_tokens`` (int); no ``attention_mask``, so the model builds a block-diagonal causal mask from the
    position ids (gpt-oss needs :func:`install_attention_masks` for that). The first label of every sample
    is set to ``IGNORE_INDEX``, so the last position of one sample never predicts the first token of the next (this
    matters where labels equal input ids, as with ``--loss_scale all``); unpacked, that label is never a target
    either, so packed and unpacked samples train exactly the same positions. See the module docstring for how the
    loss is reduced.
    """

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate ``items`` into one packed row (each item: ``input_ids``, ``labels``, optional ``position_ids``)."""
        if not items:
            raise ValueError("cannot collate an empty batch")
        ids_parts, label_parts, position_parts = [], [], []
        for item in items:
            ids, labels = _split_item(item)
            positions = _as_long(item["position_ids"]) if "position_ids" in item else torch.arange(len(ids))
            if positions.shape != ids.shape or positions[0] != 0:
                raise ValueError("position_ids must match input_ids in length and start at 0")
            ids_parts.append(ids)
            label_parts.append(labels)
            position_parts.append(positions)
        position_ids = torch.cat(position_parts)[None]
        labels = torch.cat(label_parts)[None]
        labels[position_ids == 0] = IGNORE_INDEX
        return {
            "input_ids": torch.cat(ids_parts)[None],
            "labels": labels,
            "position_ids": position_ids,
            "num_trained_tokens": count_trained_tokens(labels),
        }


MASK_CACHE_SIZE = 8
"""Shapes whose flex_attention block masks a decoder keeps (``install_attention_masks``), least recently used
dropped first."""


def _masks_hook(
    module: GptOssModel, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Forward pre-hook of a gpt-oss decoder: per-sample masks for packed rows, reused masks for plain ones.

    Acts only on a call with no attention mask and no cache (a training or scoring forward); other calls pass
    unchanged. With ``position_ids`` that hold several samples it builds the per-sample masks; without, under
    flex_attention, it takes the block masks of an earlier call of the same batch shape (they depend on nothing
    else) or builds and keeps them. Either way it sets ``attention_mask`` to the mapping from layer type to mask
    that the decoder accepts in place of a 2-D mask, built by transformers' own mask builders (with the position
    ids), for the attention implementation the model is configured with.

    Args:
        module: the ``GptOssModel`` being called.
        args: positional arguments of the call (``input_ids`` only, if any).
        kwargs: keyword arguments of the call.

    Returns:
        The arguments with ``attention_mask`` filled in, or None to leave the call as it is.
    """
    if (
        len(args) > 1
        or kwargs.get("attention_mask") is not None
        or kwargs.get("cache") is not None
        or kwargs.get("past_key_values") is not None
    ):
        return None
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.ndim == 1:
        position_ids = position_ids[None]
    packed = position_ids is not None and find_packed_sequence_indices(position_ids) is not None
    if not packed and module.config._attn_implementation != "flex_attention":
        return None
    embeds = kwargs.get("inputs_embeds")
    tokens = embeds if embeds is not None else (args[0] if args else kwargs["input_ids"])
    if packed:
        kwargs["attention_mask"] = _build_masks(module, tokens, embeds, position_ids)
        return args, kwargs
    # Creating flex block masks costs milliseconds of host time per call (a compile wrapper each), before the
    # step's first kernels; plain masks depend only on the batch shape.
    cache: OrderedDict[Any, dict[str, Any]] = module.__dict__.setdefault("_osstune_block_masks", OrderedDict())
    key = (tuple(tokens.shape[:2]), tokens.device)
    if key in cache:
        cache.move_to_end(key)
    else:
        cache[key] = _build_masks(module, tokens, embeds, None)
        while len(cache) > MASK_CACHE_SIZE:
            cache.popitem(last=False)
    kwargs["attention_mask"] = dict(cache[key])
    return args, kwargs


def _build_masks(module: GptOssModel, tokens: torch.Tensor, embeds: torch.Tensor | None,
                 position_ids: torch.Tensor | None) -> dict[str, Any]:
    """The decoder's masks by layer type, from transformers' builders (see ``_masks_hook``)."""
    dtype = embeds.dtype if embeds is not None else module.get_input_embeddings().weight.dtype
    # The mask builders read only the batch size, length, dtype and device of the embeddings.
    shape_only = torch.empty((tokens.shape[0], tokens.shape[1], 0), dtype=dtype, device=tokens.device)
    builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    masks = {}
    for layer_type in set(module.config.layer_types):
        if layer_type not in builders:
            raise OsstuneError(f"osstune's attention masks do not support attention layers of type {layer_type!r}.")
        masks[layer_type] = builders[layer_type](
            config=module.config, inputs_embeds=shape_only, attention_mask=None, cache=None, position_ids=position_ids
        )
    return masks


def install_attention_masks(model: torch.nn.Module, *, required: bool = True) -> list[RemovableHandle]:
    """Make a gpt-oss model keep attention within each sample of a packed row, and reuse its flex_attention masks.

    Registers a forward pre-hook (``_masks_hook``) on every ``GptOssModel`` inside ``model`` (a
    ``GptOssForCausalLM``, a PEFT model wrapping one, ...). When a forward gets ``position_ids`` that restart for
    several samples and no attention mask or cache, the hook builds block-diagonal causal masks, windowed on the
    sliding-attention layers, for the model's attention implementation (eager, sdpa or flex_attention), as
    transformers does for models that pass position ids to their mask builders. A forward without mask, positions
    or cache under flex_attention reuses the block masks of the last forwards of its shape (``MASK_CACHE_SIZE``).
    Other forwards (padded batches, generation) are unchanged.

    Args:
        model: a model holding one or more gpt-oss decoders.
        required: raise when the model holds none (packing needs the hook); otherwise return no handles.

    Returns:
        The hook handles (``handle.remove()`` uninstalls one).
    """
    handles = [
        module.register_forward_pre_hook(_masks_hook, with_kwargs=True)
        for module in model.modules()
        if isinstance(module, GptOssModel)
    ]
    if not handles and required:
        raise OsstuneError(
            f"--packing true needs a gpt-oss model; {type(model).__name__} holds none. Use --packing false."
        )
    return handles
