"""A tiny random gpt-oss checkpoint in the real Hugging Face layout, for tests and the offline demo.

``write_tiny_model`` writes a folder that ``AutoModelForCausalLM.from_pretrained`` (with
``Mxfp4Config(dequantize=True)`` when the experts are MXFP4) and ``AutoTokenizer.from_pretrained`` load like
``openai/gpt-oss-20b``: the same config keys, tensor names, tensor layouts and dtypes, harmony special tokens and
chat template, only far smaller. Its tokenizer is a byte-level BPE trained on the text bundled with osstune, so
token ids differ from o200k: look special tokens up by their string.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from osstune.errors import OsstuneError
from osstune.models.gpt_oss.random_model import GptOssSizes, build_config, check_sizes, write_checkpoint

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

TINY_SIZES = GptOssSizes(num_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=8, experts_per_token=2, intermediate_size=64, sliding_window=16, vocab_size=3072)
"""The tiny model's sizes (``write_tiny_model``'s defaults): small enough for CPU tests in seconds, every
gpt-oss feature present (grouped-query attention, sliding and full layers, top-k routing, MXFP4 blocks)."""


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
    init_std: float = 0.02,
    **overrides: int,
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

    Weights are drawn and written by the writer of full-size random checkpoints
    (``osstune.models.gpt_oss.random_model.write_checkpoint``), on the CPU from a private generator seeded with
    ``seed``: every matrix, bias, embedding, router and attention-sink entry from N(0, ``init_std``), the
    unembedding from N(0, 1/sqrt(hidden_size)), norms set to one. Biases are random rather than zero so that code
    which loses a bias changes the model's output. The output is byte-identical for the same arguments and bundled
    text.

    Args:
        out_dir: folder to write; created if missing. It may hold only files this function writes.
        mxfp4: store the experts in MXFP4, as gpt-oss ships them.
        seed: seed of the random weights (the tokenizer does not depend on it).
        init_std: standard deviation of the random weights.
        overrides: fields of ``GptOssSizes`` that differ from ``TINY_SIZES`` (``vocab_size`` is the target tokenizer
            size including the harmony special tokens).

    Returns:
        The folder, as a ``Path``.
    """
    try:
        sizes = dataclasses.replace(TINY_SIZES, **overrides)
    except TypeError as exc:
        raise OsstuneError(f"write_tiny_model: {exc}; the sizes are the fields of GptOssSizes") from None
    check_sizes(sizes)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OsstuneError(f"{out} exists and is not a folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in TINY_MODEL_FILES) if out.exists() else []
    if foreign:
        raise OsstuneError(f"{out} already holds other files ({', '.join(foreign[:5])}); choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(bundled_texts(), sizes.vocab_size)
    config = build_config(
        dataclasses.replace(sizes, vocab_size=64 * math.ceil(tokenizer.get_vocab_size() / 64)),
        eos_token_id=tokenizer.token_to_id("<|return|>"),
        pad_token_id=tokenizer.token_to_id("<|endoftext|>"),
        mxfp4=mxfp4,
        init_std=init_std,
    )
    write_checkpoint(out, config, tokenizer, seed=seed)
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
