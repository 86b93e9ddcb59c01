"""An input embedding whose table stays in host RAM while the rest of the model trains on the GPU.

The frozen token-embedding table of a large vocabulary is a sizeable part of the weights a LoRA run keeps on the
device (gpt-oss: 201,088 x 2,880 in bf16, 1.08 GiB) although each step reads only the rows of its tokens.
``HostEmbedding`` holds the table in (pinned) host RAM, gathers the rows of a batch on the CPU and copies just those,
``[tokens, hidden]``, to the compute device (asynchronously from pinned memory). :func:`offload_input_embeddings`
puts one in place of a model's ``get_input_embeddings()``.

The table keeps the parameter name ``weight``, so state dicts, PEFT's saving and ``modules_to_save`` lookups see the
usual names. It must stay frozen: a trained embedding (PEFT ``modules_to_save``, or ``requires_grad``) is refused.
Moving the model (``.to``, ``.cuda``) changes where the rows go, never where the table lives; a dtype change converts
the table in host RAM. The module is registered last among its siblings, so that ``model.device`` (transformers:
the device of the first parameter) stays the compute device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from osstune.errors import OsstuneError

TRAINED_EMBEDDING = ("the input embedding is kept in host RAM (--offload_embeddings true) and must stay frozen, but "
                     "it is trained (requires_grad, or listed in modules_to_save); train it on the device with "
                     "--offload_embeddings false, or leave it out of the trained modules")
"""Why a trained host-RAM embedding is refused, and what to do instead."""


class HostEmbedding(nn.Module):
    """A frozen token embedding that keeps its table in host RAM and sends only the gathered rows to the device.

    Args:
        weight: the table, ``[num_embeddings, embedding_dim]``, on any device; copied to host RAM (pinned when
            ``compute_device`` is a CUDA device) unless it is there already.
        compute_device: where the embedded rows go (the device the rest of the model computes on).
        padding_idx: the padding row of the original embedding (kept for code that reads it; a frozen table needs
            no special treatment of that row).

    Raises:
        OsstuneError: a table that is not two-dimensional.
    """

    def __init__(self, weight: torch.Tensor, compute_device: torch.device, padding_idx: int | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise OsstuneError(f"an embedding table is [num_embeddings, embedding_dim]; got {tuple(weight.shape)}")
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.compute_device = torch.device(compute_device)
        self.weight = nn.Parameter(_host_copy(weight.detach(), self.pinned), requires_grad=False)

    @property
    def pinned(self) -> bool:
        """Whether the table and the gathered rows live in pinned memory (the compute device is a CUDA device)."""
        return self.compute_device.type == "cuda"

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of ``input_ids``, on the compute device.

        Args:
            input_ids: token ids of any shape, on any device (they are brought to the CPU to gather the rows).

        Returns:
            ``[*input_ids.shape, embedding_dim]`` in the table's dtype, on ``compute_device``.

        Raises:
            OsstuneError: the table requires a gradient while autograd records (see ``TRAINED_EMBEDDING``).
        """
        if self.weight.requires_grad and torch.is_grad_enabled():
            raise OsstuneError(TRAINED_EMBEDDING)
        ids = input_ids.to("cpu").reshape(-1)
        rows = torch.empty((ids.numel(), self.embedding_dim), dtype=self.weight.dtype, pin_memory=self.pinned)
        torch.index_select(self.weight, 0, ids, out=rows)
        return rows.view(*input_ids.shape, self.embedding_dim).to(self.compute_device, non_blocking=True)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> HostEmbedding:
        """``Module.to``, ``.cuda``, ``.half`` and the like: they set where the rows go and the table's dtype; the
        table itself stays in host RAM.

        Args:
            fn: the conversion ``nn.Module`` applies to every tensor; it is tried on an empty tensor of the table's
                dtype to learn the target device and dtype.
            recurse: unused (this module has no children); part of ``nn.Module._apply``'s signature.
        """
        probe = fn(torch.empty(0, dtype=self.weight.dtype))
        self.compute_device = probe.device
        table = self.weight.detach()
        if probe.dtype != table.dtype or (self.pinned and not table.is_pinned()):
            self.weight = nn.Parameter(_host_copy(table.to(probe.dtype), self.pinned),
                                       requires_grad=self.weight.requires_grad)
        return self

    def extra_repr(self) -> str:
        """Sizes and the compute device, for ``print(model)``."""
        return f"{self.num_embeddings}, {self.embedding_dim}, host RAM -> {self.compute_device}"


def offloadable_embedding(model: nn.Module) -> nn.Embedding:
    """A model's input embedding, checked to be one that ``offload_input_embeddings`` can keep in host RAM.

    Args:
        model: a transformers model (``get_input_embeddings``), on any device (the meta device included).

    Raises:
        OsstuneError: the embedding is not a plain ``nn.Embedding`` (a subclass may scale or transform rows), has
            ``max_norm`` (which rewrites the table), or shares its table with the output layer (tied embeddings:
            the unembedding would have to stay on the device anyway).
    """
    embedding = model.get_input_embeddings()
    plain = type(embedding) is nn.Embedding
    if not plain or embedding.max_norm is not None:
        raise OsstuneError(f"--offload_embeddings: the input embedding is a {type(embedding).__name__}"
                           f"{'' if not plain else ' with max_norm'}; only a plain torch.nn.Embedding without "
                           "max_norm can be kept in host RAM. Use --offload_embeddings false.")
    output = model.get_output_embeddings()
    if output is not None and getattr(output, "weight", None) is embedding.weight:
        raise OsstuneError("--offload_embeddings: this model ties its input embedding to the output layer (one "
                           "table); the output layer needs it on the device at every step, so nothing would be "
                           "saved. Use --offload_embeddings false.")
    return embedding


def offload_input_embeddings(model: nn.Module) -> HostEmbedding:
    """Replace a model's input embedding by a ``HostEmbedding`` holding its table in host RAM.

    The rows are sent to the device the embedding was on. On a CUDA device the table is copied to pinned host RAM
    and the device copy is released; on the CPU the same tensor is kept. The table is frozen (``requires_grad``
    off; transformers loads every weight trainable and PEFT freezes the base only later). The new module takes the
    old one's name and is registered after its siblings (see the module docstring). Call it before LoRA is applied
    and before ``enable_input_require_grads``.

    Args:
        model: a transformers model whose input embedding passes ``offloadable_embedding``.

    Returns:
        The ``HostEmbedding`` now in the model.

    Raises:
        OsstuneError: an embedding that cannot be kept in host RAM (see ``offloadable_embedding``).
    """
    embedding = offloadable_embedding(model)
    name = next(name for name, module in model.named_modules() if module is embedding)
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    host = HostEmbedding(embedding.weight, embedding.weight.device, embedding.padding_idx)
    delattr(parent, leaf)
    setattr(parent, leaf, host)  # re-registered last: the first parameter stays on the compute device
    return host


def frozen_host_embeddings(model: nn.Module) -> list[str]:
    """Names of the host-RAM embedding tables of a model (``HostEmbedding.weight``), checked to be frozen.

    Args:
        model: any module, PEFT-wrapped included.

    Returns:
        Qualified parameter names such as ``base_model.model.model.embed_tokens.weight``, in module order.

    Raises:
        OsstuneError: a table is trained (``requires_grad``; PEFT's ``modules_to_save`` makes such a trained copy).
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, HostEmbedding):
            if module.weight.requires_grad:
                raise OsstuneError(TRAINED_EMBEDDING)
            names.append(f"{name}.weight" if name else "weight")
    return names


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input embedding puts its output: the device the model computes on.

    Args:
        model: a transformers model (PEFT-wrapped included).
    """
    embedding = model.get_input_embeddings()
    return embedding.compute_device if isinstance(embedding, HostEmbedding) else embedding.weight.device


def _host_copy(table: torch.Tensor, pinned: bool) -> torch.Tensor:
    """``table`` in host RAM (pinned when asked), copying only when it is not there already.

    Args:
        table: a tensor on any device.
        pinned: whether the result must be in pinned memory.
    """
    if not pinned:
        return table.to("cpu")
    if table.device.type == "cpu" and table.is_pinned():
        return table
    return torch.empty(table.shape, dtype=table.dtype, pin_memory=True).copy_(table)
