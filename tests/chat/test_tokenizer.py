"""The offline o200k_harmony tokenizer against openai-harmony/tiktoken, and harmony token lookup."""

from __future__ import annotations

import gzip
import hashlib
import sys
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from osstune.chat.tokenizer import (
    O200K_BASE_FILENAME,
    O200K_BASE_SHA256,
    HarmonyTokens,
    build_o200k_harmony_tokenizer,
    default_cache_dir,
    harmony_encoding_dir,
    harmony_tokens,
    is_harmony_tokenizer,
    o200k_harmony_special_tokens,
)
from osstune.errors import OsstuneError

SAMPLE_TEXTS = [
    "Hello, world! How's it going?",
    "你好，世界。今天天气怎么样？",
    "Zahlen: 1234567 und 3.14159; emoji 😀👍🏽",
    "  leading spaces\n\n\ttabs\r\nCRLF   trailing   ",
    "def f(x):\n    return x ** 2  # comment\n",
    "I'M SHOUTING and we've they'll don't",
    "mixed日本語とEnglish текст",
    "{\"city\": \"Paris\", \"unit\": null}",
]


def test_vocabulary_size_and_config(o200k_tokenizer: Any) -> None:
    assert len(o200k_tokenizer) == 201088
    assert o200k_tokenizer.bos_token == "<|startoftext|>"
    assert o200k_tokenizer.eos_token == "<|return|>"
    assert o200k_tokenizer.pad_token == "<|endoftext|>"
    assert (o200k_tokenizer.bos_token_id, o200k_tokenizer.eos_token_id, o200k_tokenizer.pad_token_id) == (
        199998,
        200002,
        199999,
    )


def test_special_token_ids_match_openai_harmony(o200k_tokenizer: Any, harmony_encoding: Any) -> None:
    # openai-harmony 0.0.8 also defines <|reserved_201088|>, one id past the model's 201088-row embedding table;
    # the gpt-oss tokenizer (and ours) stops at 201087.
    specials = harmony_encoding.special_tokens_set - {"<|reserved_201088|>"}
    assert harmony_encoding.encode("<|reserved_201088|>", allowed_special="all") == [201088]
    assert len(specials) == 201088 - 199998
    backend = o200k_tokenizer.backend_tokenizer
    for token in specials:
        assert [backend.token_to_id(token)] == harmony_encoding.encode(token, allowed_special="all"), token
    assert set(o200k_harmony_special_tokens()) == specials


def test_named_special_tokens_have_their_documented_ids(o200k_tokenizer: Any) -> None:
    expected = {
        "<|startoftext|>": 199998,
        "<|endoftext|>": 199999,
        "<|reserved_200000|>": 200000,
        "<|return|>": 200002,
        "<|constrain|>": 200003,
        "<|channel|>": 200005,
        "<|start|>": 200006,
        "<|end|>": 200007,
        "<|message|>": 200008,
        "<|call|>": 200012,
        "<|reserved_200018|>": 200018,
        "<|reserved_201087|>": 201087,
    }
    assert o200k_tokenizer.convert_tokens_to_ids(list(expected)) == list(expected.values())


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_ordinary_text_encodes_like_tiktoken(o200k_tokenizer: Any, harmony_encoding: Any, text: str) -> None:
    ids = o200k_tokenizer.encode(text, add_special_tokens=False)
    assert ids == harmony_encoding.encode(text, allowed_special=set())
    assert o200k_tokenizer.decode(ids) == text


def test_harmony_tokens_of_o200k(o200k_tokenizer: Any) -> None:
    assert harmony_tokens(o200k_tokenizer) == HarmonyTokens(
        start=200006, end=200007, message=200008, channel=200005, return_=200002, call=200012, constrain=200003
    )
    assert is_harmony_tokenizer(o200k_tokenizer)


def _small_tokenizer(specials: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a handful of words and the given special tokens appended in order."""
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_harmony_tokens_are_looked_up_by_string_not_id() -> None:
    tokenizer = _small_tokenizer(
        ["<|call|>", "<|constrain|>", "<|return|>", "<|channel|>", "<|message|>", "<|end|>", "<|start|>"]
    )
    assert harmony_tokens(tokenizer) == HarmonyTokens(
        start=9, end=8, message=7, channel=6, return_=5, call=3, constrain=4
    )
    assert is_harmony_tokenizer(tokenizer)


def test_tokenizer_without_harmony_tokens() -> None:
    tokenizer = _small_tokenizer(["<|start|>", "<|end|>", "<|message|>"])
    assert harmony_tokens(tokenizer) is None
    assert not is_harmony_tokenizer(tokenizer)


def test_encoding_dir_holds_the_verified_vocabulary(tmp_path: Path) -> None:
    folder = harmony_encoding_dir(tmp_path)
    assert folder == tmp_path / O200K_BASE_SHA256
    data = (folder / O200K_BASE_FILENAME).read_bytes()
    assert hashlib.sha256(data).hexdigest() == O200K_BASE_SHA256
    assert harmony_encoding_dir(tmp_path) == folder


def test_cached_tokenizer_is_reused(o200k_tokenizer: Any) -> None:
    saved = harmony_encoding_dir(default_cache_dir()) / "tokenizer-v1" / "tokenizer.json"
    assert saved.is_file()
    again = build_o200k_harmony_tokenizer(default_cache_dir())
    text = "Reuse 缓存 <|end|>"
    assert again.encode(text, add_special_tokens=False) == o200k_tokenizer.encode(text, add_special_tokens=False)


def test_corrupt_vocabulary_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packed = tmp_path / f"{O200K_BASE_FILENAME}.gz"
    packed.write_bytes(gzip.compress(b"not the vocabulary"))
    monkeypatch.setattr("osstune.chat.tokenizer._packed_vocabulary", lambda: packed)
    with pytest.raises(OsstuneError, match="expected 446a9538"):
        harmony_encoding_dir(tmp_path / "cache")


def test_missing_dev_extra_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bpe_openai", None)
    with pytest.raises(OsstuneError, match=r"pip install osstune\[dev\]"):
        harmony_encoding_dir(tmp_path)


def test_missing_tiktoken_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(OsstuneError, match=r"pip install osstune\[dev\]"):
        build_o200k_harmony_tokenizer(tmp_path)
