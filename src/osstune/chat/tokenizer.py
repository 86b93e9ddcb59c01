"""The gpt-oss vocabulary (o200k_harmony) built offline, and harmony special-token lookup for any tokenizer.

The o200k_base BPE ranks ship inside the ``bpe-openai`` wheel; :func:`build_o200k_harmony_tokenizer` turns them into a
``transformers`` fast tokenizer with the harmony special tokens at their real ids, and caches the result on disk.
``openai-harmony`` reads the same un-gzipped file when ``TIKTOKEN_ENCODINGS_BASE`` points at
:func:`harmony_encoding_dir`, which makes it usable offline as a reference renderer.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from osstune.errors import OsstuneError
from osstune.paths import cache_root

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_BASE_FILENAME = "o200k_base.tiktoken"
O200K_HARMONY_VOCAB_SIZE = 201088
# Bump when the conversion below changes, so that stale cached tokenizers are not reused.
_TOKENIZER_FORMAT = "v1"

# The o200k pre-tokenization regex (tiktoken's o200k_base ``pat_str``), alternative by alternative.
_O200K_PATTERN_PARTS = (
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
)
O200K_PATTERN = "|".join(_O200K_PATTERN_PARTS)

# Named special tokens of o200k_harmony; every other id from 199998 to 201087 is ``<|reserved_{id}|>``.
_NAMED_SPECIAL_IDS: tuple[tuple[int, str], ...] = (
    (199998, "<|startoftext|>"),
    (199999, "<|endoftext|>"),
    (200002, "<|return|>"),
    (200003, "<|constrain|>"),
    (200005, "<|channel|>"),
    (200006, "<|start|>"),
    (200007, "<|end|>"),
    (200008, "<|message|>"),
    (200012, "<|call|>"),
)
_FIRST_SPECIAL_ID = 199998

_DEV_EXTRA_HINT = "install the development extras: pip install osstune[dev]"


def o200k_harmony_special_tokens() -> list[str]:
    """The o200k_harmony special tokens in id order, starting at id 199998 (right after the BPE ranks).

    Returns:
        1090 token strings; the token at position ``i`` has id ``199998 + i``.
    """
    named = dict(_NAMED_SPECIAL_IDS)
    return [
        named.get(token_id, f"<|reserved_{token_id}|>")
        for token_id in range(_FIRST_SPECIAL_ID, O200K_HARMONY_VOCAB_SIZE)
    ]


def default_cache_dir() -> Path:
    """The folder that holds the o200k_harmony files: ``$OSSTUNE_CACHE/o200k_harmony``, else
    ``~/.cache/osstune/o200k_harmony``."""
    return cache_root() / "o200k_harmony"


def harmony_encoding_dir(cache_dir: Path | None = None) -> Path:
    """Un-gzip ``o200k_base.tiktoken`` from the ``bpe-openai`` wheel (once) and return the folder holding it.

    Point ``TIKTOKEN_ENCODINGS_BASE`` at the returned folder to make tiktoken and
    ``openai_harmony.load_harmony_encoding`` work without network access.

    Args:
        cache_dir: the o200k_harmony cache folder; defaults to :func:`default_cache_dir`. Files are stored under a
            subfolder named by the sha256 of the vocabulary file.

    Returns:
        The folder that contains ``o200k_base.tiktoken`` (its sha256 is checked when the file is written).

    Raises:
        OsstuneError: ``bpe-openai`` is not installed, or the shipped file does not have the expected sha256.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / O200K_BASE_SHA256
    target = folder / O200K_BASE_FILENAME
    if target.is_file():
        return folder
    data = gzip.decompress(_packed_vocabulary().read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_BASE_SHA256:
        raise OsstuneError(
            f"bpe-openai's {O200K_BASE_FILENAME}.gz un-gzips to sha256 {digest}, expected {O200K_BASE_SHA256}; "
            "reinstall a matching bpe-openai (pip install 'bpe-openai>=0.1.4,<0.2')."
        )
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, delete=False) as tmp:
        tmp.write(data)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, target)
    return folder


def _packed_vocabulary() -> Path:
    """The gzipped o200k_base file inside the installed ``bpe-openai`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        raise OsstuneError(f"The offline gpt-oss vocabulary needs the `bpe-openai` package: {_DEV_EXTRA_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / f"{O200K_BASE_FILENAME}.gz"


def build_o200k_harmony_tokenizer(cache_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """The gpt-oss tokenizer (o200k_harmony, vocabulary 201088), built offline and cached.

    The first call converts the BPE ranks with transformers' ``TikTokenConverter`` (a few seconds) and saves the
    tokenizer with ``save_pretrained`` next to the vocabulary file; later calls load it from there.

    Args:
        cache_dir: the o200k_harmony cache folder; defaults to :func:`default_cache_dir`.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with bos ``<|startoftext|>``, eos ``<|return|>`` and pad
        ``<|endoftext|>`` as gpt-oss ships them.

    Raises:
        OsstuneError: the development extras (``bpe-openai``, ``tiktoken``) are missing.
    """
    from transformers import PreTrainedTokenizerFast

    encoding_dir = harmony_encoding_dir(cache_dir)
    saved = encoding_dir / f"tokenizer-{_TOKENIZER_FORMAT}"
    if (saved / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(saved))
    tokenizer = _convert(encoding_dir / O200K_BASE_FILENAME)
    staging = Path(tempfile.mkdtemp(dir=encoding_dir, prefix=".tokenizer-"))
    tokenizer.save_pretrained(str(staging))
    os.chmod(staging, 0o755)
    try:
        os.replace(staging, saved)
    except OSError:  # another process saved it first
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


def _convert(vocab_file: Path) -> PreTrainedTokenizerFast:
    """Convert an o200k_base ``.tiktoken`` file into a fast tokenizer carrying the harmony special tokens."""
    try:
        import tiktoken  # noqa: F401  (TikTokenConverter reads the ranks through tiktoken)
    except ModuleNotFoundError as exc:
        raise OsstuneError(f"Converting the gpt-oss vocabulary needs `tiktoken`: {_DEV_EXTRA_HINT}") from exc
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = o200k_harmony_special_tokens()
    backend = TikTokenConverter(
        vocab_file=str(vocab_file), pattern=O200K_PATTERN, extra_special_tokens=specials
    ).converted()
    if backend.get_vocab_size() != O200K_HARMONY_VOCAB_SIZE or backend.token_to_id(specials[0]) != _FIRST_SPECIAL_ID:
        raise OsstuneError(
            f"Converted o200k_harmony has {backend.get_vocab_size()} tokens, expected {O200K_HARMONY_VOCAB_SIZE}; "
            "the bpe-openai vocabulary file is not o200k_base."
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|return|>",
        pad_token="<|endoftext|>",
        model_input_names=["input_ids", "attention_mask"],
    )


@dataclass(frozen=True)
class HarmonyTokens:
    """Ids of the harmony control tokens in one tokenizer (looked up by token string, never assumed).

    Args:
        start: ``<|start|>``, opens a message.
        end: ``<|end|>``, closes a message that is not the last of a generation.
        message: ``<|message|>``, separates the header from the content.
        channel: ``<|channel|>``, introduces the channel name in the header.
        return_: ``<|return|>``, closes the final answer (generation stops).
        call: ``<|call|>``, closes a tool call (generation stops).
        constrain: ``<|constrain|>``, introduces a content-type constraint in the header.
    """

    start: int
    end: int
    message: int
    channel: int
    return_: int
    call: int
    constrain: int


_HARMONY_TOKEN_STRINGS: tuple[tuple[str, str], ...] = (
    ("start", "<|start|>"),
    ("end", "<|end|>"),
    ("message", "<|message|>"),
    ("channel", "<|channel|>"),
    ("return_", "<|return|>"),
    ("call", "<|call|>"),
    ("constrain", "<|constrain|>"),
)


def harmony_tokens(tokenizer: Any) -> HarmonyTokens | None:
    """Look up the harmony control tokens of a tokenizer by their strings.

    Args:
        tokenizer: a ``transformers`` tokenizer (fast or slow).

    Returns:
        The ids, or ``None`` when any of the tokens is not a single token of this vocabulary.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        lookup = backend.token_to_id
    else:
        lookup = tokenizer.get_vocab().get
    ids = {field: lookup(text) for field, text in _HARMONY_TOKEN_STRINGS}
    if any(token_id is None for token_id in ids.values()):
        return None
    return HarmonyTokens(**ids)


def is_harmony_tokenizer(tokenizer: Any) -> bool:
    """Whether the tokenizer speaks harmony (gpt-oss and models derived from it).

    Args:
        tokenizer: a ``transformers`` tokenizer.
    """
    return harmony_tokens(tokenizer) is not None
