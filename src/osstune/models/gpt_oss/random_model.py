"""Random-weight gpt-oss checkpoints in the released Hugging Face layout, from a tiny test model up to gpt-oss-120b.

``write_random_checkpoint`` writes what ``openai/gpt-oss-20b`` ships (``config.json``, ``generation_config.json``,
safetensors shards with ``model.safetensors.index.json``, the o200k_harmony tokenizer and the chat template) with
random weights: the experts as MXFP4 ``*_blocks`` / ``*_scales`` (uint8), everything else bf16, under the released
tensor names. Benchmarks load it exactly like the real model, without downloading 13 GB.

Weights are drawn on a device, one tensor at a time, and streamed into the shard files as they are drawn: at any
moment only one tensor is held (for an expert projection, also its dense float32 draw while it is quantised, on
the device), never the whole model and never the experts in bf16. ``write_checkpoint`` is the writer shared with
the tiny model of ``osstune.models.gpt_oss.tiny``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from tokenizers import Tokenizer

from osstune.errors import OsstuneError
from osstune.models.gpt_oss.mxfp4 import BLOCK_SIZE, dequantize_mxfp4, quantize_mxfp4
from osstune.models.gpt_oss.mxfp4_experts import EXPERT_STACKS, is_mxfp4_checkpoint
from osstune.models.safetensors_shards import INDEX_FILE, ShardWriter, shard_plan

MAX_POSITION_EMBEDDINGS = 131072
"""Context length of gpt-oss (yarn-scaled x32 from ``ORIGINAL_CONTEXT_LENGTH``)."""

ORIGINAL_CONTEXT_LENGTH = 4096
"""Context length gpt-oss was pre-trained at, before yarn scaling."""

DEFAULT_SHARD_BYTES = 4 * 2**30
"""Largest shard written by ``write_random_checkpoint`` (a single tensor larger than this gets a shard of its own)."""

GPT_OSS_MODULES_TO_NOT_CONVERT: tuple[str, ...] = (
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
)
"""Modules that the released checkpoints keep in bf16 (``quantization_config.modules_to_not_convert``)."""

TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
"""Tokenizer files ``write_checkpoint`` writes beside the weights."""

Init = Literal["normal", "ones", "unembed", "expert_blocks", "expert_scales", "expert_dense"]
"""How a tensor's values are drawn (see ``random_tensors``)."""

_RESOURCES = Path(__file__).resolve().parents[2] / "resources"


@dataclass(frozen=True)
class GptOssSizes:
    """The sizes that distinguish one gpt-oss model from another; every other config value is fixed.

    Args:
        num_layers: decoder layers (attention alternates sliding and full, starting with sliding).
        hidden_size: model width; a multiple of 32 (an MXFP4 block).
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (grouped-query attention); divides ``num_attention_heads``.
        head_dim: width of one attention head.
        num_experts: experts per layer.
        experts_per_token: experts each token is routed to (top-k).
        intermediate_size: expert hidden width; a multiple of 32.
        sliding_window: attention window of the sliding-attention layers.
        vocab_size: rows of the embedding and the unembedding.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    intermediate_size: int
    sliding_window: int
    vocab_size: int


GPT_OSS_PRESETS: Mapping[str, GptOssSizes] = MappingProxyType(
    {
        "20b": GptOssSizes(num_layers=24, hidden_size=2880, num_attention_heads=64, num_key_value_heads=8,
                           head_dim=64, num_experts=32, experts_per_token=4, intermediate_size=2880,
                           sliding_window=128, vocab_size=201088),
        "120b": GptOssSizes(num_layers=36, hidden_size=2880, num_attention_heads=64, num_key_value_heads=8,
                            head_dim=64, num_experts=128, experts_per_token=4, intermediate_size=2880,
                            sliding_window=128, vocab_size=201088),
    }
)
"""The sizes of the released models, as their ``config.json`` files give them."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a checkpoint: its name, shape, dtype and how its random values are drawn.

    Args:
        name: the checkpoint name, e.g. ``model.layers.0.mlp.experts.down_proj_blocks``.
        shape: its shape.
        dtype: its dtype.
        init: ``normal`` N(0, initializer_range); ``ones``; ``unembed`` N(0, 1/sqrt(hidden)) so that random logits
            have unit scale; ``expert_blocks`` / ``expert_scales`` the MXFP4 codes of an N(0, initializer_range)
            expert stack (blocks first, then scales); ``expert_dense`` that stack dequantised to bf16.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    init: Init

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def check_sizes(sizes: GptOssSizes) -> None:
    """Reject sizes that gpt-oss (or MXFP4) cannot have.

    Args:
        sizes: the sizes to check.

    Raises:
        OsstuneError: a width that is not a positive multiple of 32, query heads not a multiple of the key/value
            heads, or a top-k outside ``1..num_experts``.
    """
    for name in ("hidden_size", "intermediate_size"):
        value = getattr(sizes, name)
        if value < BLOCK_SIZE or value % BLOCK_SIZE:
            raise OsstuneError(f"{name} must be a positive multiple of {BLOCK_SIZE} (an MXFP4 block), got {value}")
    if sizes.num_attention_heads % sizes.num_key_value_heads:
        raise OsstuneError(
            f"num_attention_heads ({sizes.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({sizes.num_key_value_heads})"
        )
    if not 1 <= sizes.experts_per_token <= sizes.num_experts:
        raise OsstuneError(
            f"experts_per_token must be between 1 and num_experts ({sizes.num_experts}), got {sizes.experts_per_token}"
        )


def build_config(
    sizes: GptOssSizes,
    *,
    eos_token_id: int,
    pad_token_id: int,
    mxfp4: bool = True,
    init_std: float = 0.02,
) -> dict[str, Any]:
    """``config.json`` of a gpt-oss model: the released models' keys and fixed settings, with ``sizes``.

    Fixed settings: alternating sliding/full attention starting with sliding, yarn rope scaling x32 over 4096
    positions with beta_fast 32 and beta_slow 1, rope theta 150000, SwiGLU limit 7, RMSNorm eps 1e-5, attention
    biases, untied embeddings, router auxiliary loss coefficient 0.9.

    Args:
        sizes: the model's sizes (see ``GPT_OSS_PRESETS``).
        eos_token_id: id of ``<|return|>`` in the model's tokenizer.
        pad_token_id: id of ``<|endoftext|>`` in the model's tokenizer.
        mxfp4: the experts are stored in MXFP4; adds the released ``quantization_config``.
        init_std: ``initializer_range``, the standard deviation of the random weights.

    Returns:
        The config as a JSON-ready dict.
    """
    check_sizes(sizes)
    config: dict[str, Any] = {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": eos_token_id,
        "experts_per_token": sizes.experts_per_token,
        "head_dim": sizes.head_dim,
        "hidden_act": "silu",
        "hidden_size": sizes.hidden_size,
        "initial_context_length": ORIGINAL_CONTEXT_LENGTH,
        "initializer_range": init_std,
        "intermediate_size": sizes.intermediate_size,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(sizes.num_layers)],
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "model_type": "gpt_oss",
        "num_attention_heads": sizes.num_attention_heads,
        "num_experts_per_tok": sizes.experts_per_token,
        "num_hidden_layers": sizes.num_layers,
        "num_key_value_heads": sizes.num_key_value_heads,
        "num_local_experts": sizes.num_experts,
        "output_router_logits": False,
        "pad_token_id": pad_token_id,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": MAX_POSITION_EMBEDDINGS / ORIGINAL_CONTEXT_LENGTH,
            "original_max_position_embeddings": ORIGINAL_CONTEXT_LENGTH,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": sizes.sliding_window,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": sizes.vocab_size,
    }
    if mxfp4:
        config["quantization_config"] = {
            "modules_to_not_convert": list(GPT_OSS_MODULES_TO_NOT_CONVERT),
            "quant_method": "mxfp4",
        }
    return config


def o200k_harmony_config(sizes: GptOssSizes, *, mxfp4: bool = True, init_std: float = 0.02) -> dict[str, Any]:
    """``config.json`` of a gpt-oss model that uses the o200k_harmony tokenizer (every released gpt-oss does).

    ``eos_token_id`` (``<|return|>``) and ``pad_token_id`` (``<|endoftext|>``) are looked up by token string in
    the o200k_harmony special tokens.

    Args:
        sizes: the model's sizes; ``vocab_size`` must be at least 201088 for the tokenizer's ids to fit.
        mxfp4: the experts are stored in MXFP4.
        init_std: ``initializer_range``.
    """
    from osstune.chat.tokenizer import O200K_HARMONY_VOCAB_SIZE, o200k_harmony_special_tokens

    specials = o200k_harmony_special_tokens()
    first_id = O200K_HARMONY_VOCAB_SIZE - len(specials)
    return build_config(sizes, eos_token_id=first_id + specials.index("<|return|>"),
                        pad_token_id=first_id + specials.index("<|endoftext|>"), mxfp4=mxfp4, init_std=init_std)


def gpt_oss_config(preset: str) -> dict[str, Any]:
    """The ``config.json`` of a released gpt-oss model, MXFP4 experts included.

    Args:
        preset: ``20b`` or ``120b``.

    Raises:
        OsstuneError: an unknown preset.
    """
    if preset not in GPT_OSS_PRESETS:
        raise OsstuneError(f"unknown gpt-oss preset {preset!r}; choose one of {', '.join(GPT_OSS_PRESETS)}")
    return o200k_harmony_config(GPT_OSS_PRESETS[preset])


def checkpoint_layout(config: Mapping[str, Any]) -> list[TensorSpec]:
    """Every tensor of the checkpoint that ``config`` describes, in the order they are drawn and written.

    MXFP4 checkpoints (``quantization_config.quant_method == "mxfp4"``) store each expert projection as
    ``{proj}_blocks`` uint8 ``[E, out, in / 32, 16]`` and ``{proj}_scales`` uint8 ``[E, out, in / 32]``; dense ones
    as ``{proj}`` bf16 ``[E, in, out]`` (transformers' ``GptOssExperts`` layout). Everything else is bf16.

    Args:
        config: a gpt-oss ``config.json``.
    """
    hidden = int(config["hidden_size"])
    q_width = int(config["num_attention_heads"]) * int(config["head_dim"])
    kv_width = int(config["num_key_value_heads"]) * int(config["head_dim"])
    experts = int(config["num_local_experts"])
    inter = int(config["intermediate_size"])
    mxfp4 = is_mxfp4_checkpoint(dict(config))
    bf16 = torch.bfloat16

    def spec(name: str, init: Init, *shape: int, dtype: torch.dtype = bf16) -> TensorSpec:
        return TensorSpec(name, tuple(shape), dtype, init)

    layout = [spec("model.embed_tokens.weight", "normal", int(config["vocab_size"]), hidden)]
    for layer in range(int(config["num_hidden_layers"])):
        prefix = f"model.layers.{layer}"
        layout.append(spec(f"{prefix}.input_layernorm.weight", "ones", hidden))
        for proj, out_width, in_width in (("q", q_width, hidden), ("k", kv_width, hidden), ("v", kv_width, hidden),
                                          ("o", hidden, q_width)):
            layout.append(spec(f"{prefix}.self_attn.{proj}_proj.weight", "normal", out_width, in_width))
            layout.append(spec(f"{prefix}.self_attn.{proj}_proj.bias", "normal", out_width))
        layout.append(spec(f"{prefix}.self_attn.sinks", "normal", int(config["num_attention_heads"])))
        layout.append(spec(f"{prefix}.post_attention_layernorm.weight", "ones", hidden))
        layout.append(spec(f"{prefix}.mlp.router.weight", "normal", experts, hidden))
        layout.append(spec(f"{prefix}.mlp.router.bias", "normal", experts))
        for proj, in_width, out_width in zip(EXPERT_STACKS, (hidden, inter), (2 * inter, hidden)):
            name = f"{prefix}.mlp.experts.{proj}"
            if mxfp4:
                groups = in_width // BLOCK_SIZE
                layout.append(spec(f"{name}_blocks", "expert_blocks", experts, out_width, groups, BLOCK_SIZE // 2,
                                   dtype=torch.uint8))
                layout.append(spec(f"{name}_scales", "expert_scales", experts, out_width, groups, dtype=torch.uint8))
            else:
                layout.append(spec(name, "expert_dense", experts, in_width, out_width))
            layout.append(spec(f"{name}_bias", "normal", experts, out_width))
    layout.append(spec("model.norm.weight", "ones", hidden))
    layout.append(spec("lm_head.weight", "unembed", int(config["vocab_size"]), hidden))
    return layout


def checkpoint_bytes(config: Mapping[str, Any]) -> int:
    """Bytes of tensor data in the checkpoint that ``config`` describes (file headers not counted).

    Args:
        config: a gpt-oss ``config.json``.
    """
    return sum(spec.nbytes for spec in checkpoint_layout(config))


def random_tensors(
    config: Mapping[str, Any], *, seed: int = 0, device: str | torch.device = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of ``checkpoint_layout(config)``, in order, on the CPU.

    Values are drawn on ``device`` from a generator seeded with ``seed``, one tensor at a time: linear weights,
    biases, embeddings, router and attention sinks from N(0, ``initializer_range``), norms one, the unembedding
    from N(0, 1/sqrt(hidden)) (unit-scale logits; with ``initializer_range`` the softmax of a random model is
    almost flat). An expert stack is drawn dense in float32 ``[E, in, out]`` from N(0, ``initializer_range``) and
    quantised with ``quantize_mxfp4`` on ``device``, so its codes dequantise to about the same spread; the dense
    variant is that stack dequantised. The same ``seed`` and device type give the same tensors.

    Args:
        config: a gpt-oss ``config.json``.
        seed: seed of the generator.
        device: where values are drawn and quantised (``cuda`` for large models).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    generator = torch.Generator(device=device).manual_seed(seed)
    std = float(config["initializer_range"])
    pending_scales: torch.Tensor | None = None
    for spec in checkpoint_layout(config):
        if spec.init == "normal":
            tensor = (torch.randn(*spec.shape, generator=generator, device=device) * std).to(spec.dtype)
        elif spec.init == "ones":
            tensor = torch.ones(*spec.shape, dtype=spec.dtype, device=device)
        elif spec.init == "unembed":
            scale = int(config["hidden_size"]) ** -0.5
            tensor = (torch.randn(*spec.shape, generator=generator, device=device) * scale).to(spec.dtype)
        elif spec.init == "expert_blocks":
            experts, out_width, groups, _ = spec.shape
            dense = torch.randn(experts, groups * BLOCK_SIZE, out_width, generator=generator, device=device) * std
            tensor, pending_scales = quantize_mxfp4(dense)
            del dense
        elif spec.init == "expert_scales":
            if pending_scales is None:
                raise OsstuneError(f"{spec.name}: MXFP4 scales must follow their blocks in the layout")
            tensor, pending_scales = pending_scales, None
        else:
            dense = torch.randn(*spec.shape, generator=generator, device=device) * std
            tensor = dequantize_mxfp4(*quantize_mxfp4(dense), spec.dtype)
            del dense
        yield spec.name, tensor.cpu()
        del tensor


def write_weights(
    out_dir: Path,
    layout: Sequence[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[str]:
    """Stream tensors into safetensors shards (and their index when there are several), as they arrive.

    Each shard's header is written from ``layout`` before its data, so a tensor is written and dropped as soon as
    it is yielded; only one tensor is held at a time. The files are ordinary safetensors files (metadata
    ``{"format": "pt"}``); the index is ``{"metadata": {"total_size": N}, "weight_map": {name: file}}``.

    Args:
        out_dir: the folder to write into (it must exist).
        layout: the tensors, in the order ``tensors`` yields them.
        tensors: ``(name, CPU tensor)`` pairs matching ``layout`` one for one.
        shard_bytes: the most tensor data in one shard (see ``safetensors_shards.shard_plan``).

    Returns:
        The weight files written, in order (the index, when written, last).

    Raises:
        OsstuneError: ``tensors`` does not match ``layout`` (a name, shape or dtype differs, or the counts differ),
            or ``shard_bytes`` is not positive.
    """
    if shard_bytes < 1:
        raise OsstuneError(f"shard_bytes must be positive, got {shard_bytes}")
    writer = ShardWriter(out_dir, shard_plan(layout, shard_bytes))
    try:
        for name, tensor in tensors:
            if writer.done:
                raise OsstuneError("the tensors go on after the last tensor of the layout")
            writer.write(name, tensor)
    finally:
        writer.close()
    if not writer.done:
        raise OsstuneError(f"{writer.queue[writer.position][1].name}: the tensors ended before the layout did")
    if len(writer.names) == 1:
        return writer.names
    write_json(out_dir / INDEX_FILE, writer.index())
    return [*writer.names, INDEX_FILE]


def write_checkpoint(
    out_dir: Path,
    config: Mapping[str, Any],
    tokenizer: Tokenizer,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[str]:
    """Write a random gpt-oss checkpoint with a given tokenizer into an existing folder.

    Writes ``config.json``, ``generation_config.json`` (bos ``<|startoftext|>``, stops on ``<|return|>``,
    ``<|endoftext|>`` and ``<|call|>``, as gpt-oss ships it), the weights (see ``write_weights`` and
    ``random_tensors``), ``tokenizer.json``, ``tokenizer_config.json`` and osstune's copy of the gpt-oss
    ``chat_template.jinja``.

    Args:
        out_dir: the folder (it must exist).
        config: the model's ``config.json``; its ``vocab_size`` must cover the tokenizer.
        tokenizer: the model's tokenizer; it must hold the harmony special tokens.
        seed: seed of the random weights.
        device: where weights are drawn and quantised.
        shard_bytes: the most tensor data in one shard.

    Returns:
        Names of the files written.

    Raises:
        OsstuneError: the tokenizer lacks a harmony special token or has more ids than the embedding has rows.
    """
    ids = {}
    for token in ("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|call|>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise OsstuneError(f"the tokenizer has no {token} token; gpt-oss needs the harmony special tokens")
        ids[token] = token_id
    if tokenizer.get_vocab_size() > int(config["vocab_size"]):
        raise OsstuneError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the config's vocab_size is "
                           f"{config['vocab_size']}; token ids past the embedding would crash the model")
    write_json(out_dir / "config.json", dict(config))
    write_json(out_dir / "generation_config.json", {
        "bos_token_id": ids["<|startoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    })
    weights = write_weights(out_dir, checkpoint_layout(config), random_tensors(config, seed=seed, device=device),
                            shard_bytes=shard_bytes)
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    write_json(out_dir / "tokenizer_config.json", {
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|return|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    shutil.copyfile(_RESOURCES / "chat_template.jinja", out_dir / "chat_template.jinja")
    return ["config.json", "generation_config.json", *weights, *TOKENIZER_FILES]


def write_random_checkpoint(
    path: str | Path,
    preset_or_config: str | Mapping[str, Any],
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a gpt-oss checkpoint with random weights and the real o200k_harmony tokenizer.

    The folder is written under a temporary name beside ``path`` and renamed into place when complete, so an
    existing ``path`` is always a whole checkpoint. The tokenizer is osstune's offline o200k_harmony (see
    ``osstune.chat.tokenizer.build_o200k_harmony_tokenizer``; the first build takes a few seconds). The 20b preset
    is about 13.8 GB (``checkpoint_bytes``); on a GPU with a fast disk it is written in well under a minute.

    Args:
        path: the model folder to create; it must not exist, or be an empty folder.
        preset_or_config: ``20b`` or ``120b`` (see ``gpt_oss_config``), or a gpt-oss ``config.json`` dict, e.g.
            ``o200k_harmony_config`` of smaller sizes for tests; its ``vocab_size`` must be at least 201088.
        seed: seed of the random weights.
        device: where weights are drawn and quantised: ``cuda`` for the released sizes, ``cpu`` for small ones.
        shard_bytes: the most tensor data in one shard; a checkpoint that fits one shard is a single
            ``model.safetensors`` without index, as Hugging Face writes it.

    Returns:
        The folder, as a ``Path``.

    Raises:
        OsstuneError: ``path`` holds files, an unknown preset, or a config whose vocabulary is too small.
    """
    from osstune.chat.tokenizer import O200K_HARMONY_VOCAB_SIZE, build_o200k_harmony_tokenizer

    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OsstuneError(f"{out} already exists and is not an empty folder; choose a new folder")
    config = gpt_oss_config(preset_or_config) if isinstance(preset_or_config, str) else dict(preset_or_config)
    if int(config["vocab_size"]) < O200K_HARMONY_VOCAB_SIZE:
        raise OsstuneError(f"the config's vocab_size is {config['vocab_size']}; the o200k_harmony tokenizer needs at "
                           f"least {O200K_HARMONY_VOCAB_SIZE}")
    tokenizer = build_o200k_harmony_tokenizer().backend_tokenizer
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted write of this same folder
    staging.mkdir(parents=True)
    try:
        write_checkpoint(staging, config, tokenizer, seed=seed, device=device, shard_bytes=shard_bytes)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def write_json(path: Path, value: Mapping[str, Any]) -> None:
    """Write ``value`` as indented, key-sorted JSON with a trailing newline.

    Args:
        path: the file to write.
        value: a JSON-ready mapping.
    """
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
