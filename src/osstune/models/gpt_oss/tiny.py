"""A tiny random gpt-oss checkpoint in the real Hugging Face layout, for tests and the offline demo.

``write_tiny_model`` writes a folder that ``AutoModelForCausalLM.from_pretrained`` (with
``Mxfp4Config(dequantize=True)`` when the experts are MXFP4) and ``AutoTokenizer.from_pretrained`` load like
``openai/gpt-oss-20b``: the same config keys, tensor names, tensor layouts and dtypes, harmony special tokens and
chat template, only far smaller. Its tokenizer is a byte-level BPE trained on the text bundled with osstune, so
token ids differ from o200k: look special tokens up by their string.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from osstune.errors import OsstuneError
from osstune.models.gpt_oss.mxfp4 import BLOCK_SIZE, dequantize_mxfp4, quantize_mxfp4

HARMONY_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|reserved_200000|>",
    "<|reserved_200001|>",
    "<|return|>",
    "<|constrain|>",
    "<|reserved_200004|>",
    "<|channel|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|reserved_200009|>",
    "<|reserved_200010|>",
    "<|reserved_200011|>",
    "<|call|>",
    "<|reserved_200013|>",
    "<|reserved_200014|>",
    "<|reserved_200015|>",
    "<|reserved_200016|>",
    "<|reserved_200017|>",
    "<|endofprompt|>",
)
"""The special tokens of o200k_harmony with ids 199998..200018, in id order; the tiny tokenizer gives them
consecutive ids after its BPE vocabulary, in this order."""

O200K_PRETOKENIZE_PATTERN = "|".join(
    (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    )
)
"""The o200k pre-tokenization regex (text is split on it before byte-level BPE), as gpt-oss's tokenizer uses."""

HARMONY_SCAFFOLD_TEXTS: tuple[str, ...] = (
    "You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\nCurrent date: 2025-06-28"
    "\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. Channel must be included for every "
    "message.",
    "# Instructions\n\n",
    "system developer user assistant analysis commentary final functions to=assistant json",
    "Calls to these tools must go to the commentary channel: 'functions'.",
    "Reasoning: low Reasoning: high",
)
"""Text of the harmony message scaffolding, added to the tokenizer's training text so that it tokenizes compactly."""

SCAFFOLD_REPEATS = 16
"""How often the scaffolding text is repeated in the tokenizer's training text."""

TINY_MODEL_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
"""Files that ``write_tiny_model`` writes (the weights are small enough for one unsharded safetensors file)."""

_RESOURCES = Path(__file__).resolve().parents[2] / "resources"
_MAX_POSITION_EMBEDDINGS = 131072
_ORIGINAL_CONTEXT_LENGTH = 4096


def bundled_texts(resources_dir: Path = _RESOURCES) -> list[str]:
    """Every string value found in the ``.jsonl`` files under ``resources_dir``, in a fixed order.

    Files are read in sorted path order, records in file order, and the strings of each record depth-first in key
    order, so that the tokenizer trained on them does not depend on the file system.

    Args:
        resources_dir: folder searched recursively for ``*.jsonl`` files (osstune's bundled resources by default).

    Returns:
        The strings, possibly none when no ``.jsonl`` file exists.
    """
    texts: list[str] = []
    for path in sorted(resources_dir.rglob("*.jsonl")):
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise OsstuneError(f"{path}:{number}: not valid JSON ({error.msg})") from error
                texts.extend(_strings_in(record))
    return texts


def train_tokenizer(texts: Sequence[str], vocab_size: int = 3072) -> Tokenizer:
    """Train a byte-level BPE tokenizer in gpt-oss's style, carrying every harmony special token.

    The pre-tokenizer splits on the o200k regex, then maps bytes to printable characters; all 256 bytes are in
    the vocabulary, so any text encodes and decodes losslessly. The special tokens of ``HARMONY_SPECIAL_TOKENS``
    are added after the BPE vocabulary, as special tokens that are never split. Training is deterministic.

    Args:
        texts: training text; ``HARMONY_SCAFFOLD_TEXTS`` (repeated ``SCAFFOLD_REPEATS`` times) is added to it.
        vocab_size: total size including the special tokens; the result is smaller when the text supports fewer
            merges (pairs must occur at least twice).

    Returns:
        The trained tokenizer.
    """
    learned_size = vocab_size - len(HARMONY_SPECIAL_TOKENS)
    if learned_size < 256:
        raise OsstuneError(f"vocab_size must be at least {256 + len(HARMONY_SPECIAL_TOKENS)}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE(fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=learned_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    corpus = list(texts) + list(HARMONY_SCAFFOLD_TEXTS) * SCAFFOLD_REPEATS
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    tokenizer.add_special_tokens(
        [AddedToken(token, normalized=False, special=True) for token in HARMONY_SPECIAL_TOKENS]
    )
    return tokenizer


def write_tiny_model(
    out_dir: str | Path,
    *,
    mxfp4: bool = True,
    seed: int = 0,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    num_experts: int = 8,
    experts_per_token: int = 2,
    intermediate_size: int = 64,
    sliding_window: int = 16,
    vocab_size: int = 3072,
    init_std: float = 0.02,
) -> Path:
    """Write a tiny random gpt-oss model (config, weights, tokenizer, chat template) in the Hugging Face layout.

    The folder holds ``TINY_MODEL_FILES``. ``config.json`` has the keys of ``openai/gpt-oss-20b``'s (alternating
    sliding/full attention starting with sliding, yarn rope scaling x32 over 4096 positions, rope theta 150000,
    SwiGLU limit 7) with small sizes; its ``vocab_size`` is the tokenizer's size rounded up to a multiple of 64.
    ``model.safetensors`` holds bf16 weights under the checkpoint's tensor names. With ``mxfp4`` the experts are
    stored as ``mlp.experts.{gate_up,down}_proj_{blocks,scales}`` (uint8, see ``osstune.models.gpt_oss.mxfp4``)
    and the config carries gpt-oss's ``quantization_config``; without it they are stored dense as
    ``mlp.experts.gate_up_proj`` ``[E, H, 2I]`` and ``down_proj`` ``[E, I, H]``. Both variants hold the same
    model for the same seed: the dense experts are the dequantised MXFP4 ones.

    Weights are drawn from a private generator seeded with ``seed``: every matrix, bias, embedding, router and
    attention-sink entry from N(0, ``init_std``), norms set to one. Biases are random rather than zero so that
    code which loses a bias changes the model's output. The output is byte-identical for the same arguments and
    bundled text.

    Args:
        out_dir: folder to write; created if missing. It may hold only files this function writes.
        mxfp4: store the experts in MXFP4, as gpt-oss ships them.
        seed: seed of the random weights (the tokenizer does not depend on it).
        num_layers: decoder layers.
        hidden_size: model width; a multiple of 32 (an MXFP4 block).
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (grouped-query attention); divides ``num_attention_heads``.
        head_dim: width of one attention head.
        num_experts: experts per layer.
        experts_per_token: experts each token is routed to (top-k).
        intermediate_size: expert hidden width; a multiple of 32.
        sliding_window: attention window of the sliding-attention layers.
        vocab_size: target tokenizer size including the harmony special tokens.
        init_std: standard deviation of the random weights.

    Returns:
        The folder, as a ``Path``.
    """
    for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
        if value < BLOCK_SIZE or value % BLOCK_SIZE:
            raise OsstuneError(f"{name} must be a positive multiple of {BLOCK_SIZE} (an MXFP4 block), got {value}")
    if num_attention_heads % num_key_value_heads:
        raise OsstuneError(
            f"num_attention_heads ({num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({num_key_value_heads})"
        )
    if not 1 <= experts_per_token <= num_experts:
        raise OsstuneError(
            f"experts_per_token must be between 1 and num_experts ({num_experts}), got {experts_per_token}"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OsstuneError(f"{out} exists and is not a folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in TINY_MODEL_FILES) if out.exists() else []
    if foreign:
        raise OsstuneError(f"{out} already holds other files ({', '.join(foreign[:5])}); choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(bundled_texts(), vocab_size)
    ids = {token: tokenizer.token_to_id(token) for token in HARMONY_SPECIAL_TOKENS}
    config = _config(
        mxfp4=mxfp4,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        num_experts=num_experts,
        experts_per_token=experts_per_token,
        intermediate_size=intermediate_size,
        sliding_window=sliding_window,
        vocab_size=64 * math.ceil(tokenizer.get_vocab_size() / 64),
        init_std=init_std,
        eos_token_id=ids["<|return|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    generator = torch.Generator().manual_seed(seed)
    tensors = dict(_random_weights(config, generator, mxfp4=mxfp4))

    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": ids["<|startoftext|>"],
            "do_sample": True,
            "eos_token_id": [ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]],
            "pad_token_id": ids["<|endoftext|>"],
        },
    )
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    _write_json(
        out / "tokenizer_config.json",
        {
            "bos_token": "<|startoftext|>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|return|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": _MAX_POSITION_EMBEDDINGS,
            "pad_token": "<|endoftext|>",
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    (out / "chat_template.jinja").write_text(
        (_RESOURCES / "chat_template.jinja").read_text(encoding="utf-8"), encoding="utf-8"
    )
    return out


def _strings_in(value: Any) -> Iterator[str]:
    """Yield every string in a JSON value, depth-first (dict values in key order, not the keys themselves)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key in sorted(value):
            yield from _strings_in(value[key])
    elif isinstance(value, list):
        for item in value:
            yield from _strings_in(item)


def _config(
    *,
    mxfp4: bool,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int,
    num_experts: int,
    experts_per_token: int,
    intermediate_size: int,
    sliding_window: int,
    vocab_size: int,
    init_std: float,
    eos_token_id: int,
    pad_token_id: int,
) -> dict[str, Any]:
    """``config.json`` with gpt-oss-20b's keys and fixed settings, and the given sizes."""
    config: dict[str, Any] = {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": eos_token_id,
        "experts_per_token": experts_per_token,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initial_context_length": _ORIGINAL_CONTEXT_LENGTH,
        "initializer_range": init_std,
        "intermediate_size": intermediate_size,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        "max_position_embeddings": _MAX_POSITION_EMBEDDINGS,
        "model_type": "gpt_oss",
        "num_attention_heads": num_attention_heads,
        "num_experts_per_tok": experts_per_token,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_key_value_heads,
        "num_local_experts": num_experts,
        "output_router_logits": False,
        "pad_token_id": pad_token_id,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": _MAX_POSITION_EMBEDDINGS / _ORIGINAL_CONTEXT_LENGTH,
            "original_max_position_embeddings": _ORIGINAL_CONTEXT_LENGTH,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": sliding_window,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if mxfp4:
        config["quantization_config"] = {
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
            "quant_method": "mxfp4",
        }
    return config


def _random_weights(
    config: dict[str, Any], generator: torch.Generator, *, mxfp4: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(checkpoint name, tensor)`` for every weight of the model, drawn in a fixed order."""
    std = float(config["initializer_range"])
    hidden = config["hidden_size"]
    q_width = config["num_attention_heads"] * config["head_dim"]
    kv_width = config["num_key_value_heads"] * config["head_dim"]
    experts = config["num_local_experts"]
    inter = config["intermediate_size"]

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * std).to(torch.bfloat16)

    def ones(*shape: int) -> torch.Tensor:
        return torch.ones(*shape, dtype=torch.bfloat16)

    yield "model.embed_tokens.weight", normal(config["vocab_size"], hidden)
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        yield f"{prefix}.input_layernorm.weight", ones(hidden)
        attention = (("q", q_width, hidden), ("k", kv_width, hidden), ("v", kv_width, hidden), ("o", hidden, q_width))
        for proj, out_width, in_width in attention:
            yield f"{prefix}.self_attn.{proj}_proj.weight", normal(out_width, in_width)
            yield f"{prefix}.self_attn.{proj}_proj.bias", normal(out_width)
        yield f"{prefix}.self_attn.sinks", normal(config["num_attention_heads"])
        yield f"{prefix}.post_attention_layernorm.weight", ones(hidden)
        yield f"{prefix}.mlp.router.weight", normal(experts, hidden)
        yield f"{prefix}.mlp.router.bias", normal(experts)
        for proj, in_width, out_width in (("gate_up_proj", hidden, 2 * inter), ("down_proj", inter, hidden)):
            blocks, scales = quantize_mxfp4(torch.randn(experts, in_width, out_width, generator=generator) * std)
            if mxfp4:
                yield f"{prefix}.mlp.experts.{proj}_blocks", blocks
                yield f"{prefix}.mlp.experts.{proj}_scales", scales
            else:
                yield f"{prefix}.mlp.experts.{proj}", dequantize_mxfp4(blocks, scales, torch.bfloat16)
            yield f"{prefix}.mlp.experts.{proj}_bias", normal(experts, out_width)
    yield "model.norm.weight", ones(hidden)
    # Unit-scale logits: with ``std`` here the softmax of a random tiny model is almost flat and learns slowly.
    yield "lm_head.weight", (torch.randn(config["vocab_size"], hidden, generator=generator) * hidden**-0.5).to(
        torch.bfloat16)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` as indented, key-sorted JSON with a trailing newline."""
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


@dataclass
class TinyModelArgs:
    """Flags of ``osstune tiny-model``."""

    path: str = field(metadata={"positional": True, "help": "Folder to write the tiny gpt-oss into."})
    mxfp4: bool = field(default=True, metadata={"help": "Store the experts in MXFP4 blocks/scales, as gpt-oss ships."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights."})


def run(args: dict[type, Any]) -> int:
    """``osstune tiny-model DIR [--mxfp4 true] [--seed N]``: write the tiny model and say where it is."""
    cmd: TinyModelArgs = args[TinyModelArgs]
    path = write_tiny_model(cmd.path, mxfp4=cmd.mxfp4, seed=cmd.seed)
    print(f"wrote a tiny gpt-oss ({'MXFP4' if cmd.mxfp4 else 'bf16'} experts) to {path}")
    return 0
