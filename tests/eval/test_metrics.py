"""Generation metrics on hand-written pairs: exact match, BLEU and chrF as sacrebleu computes them, the BLEU
tokenizer choice, and length statistics."""

from __future__ import annotations

import sys

import pytest
import sacrebleu

from osstune.errors import OsstuneError
from osstune.eval.metrics import (
    choose_bleu_tokenize,
    corpus_bleu,
    corpus_chrf,
    exact_match_count,
    length_stats,
    resolve_bleu_tokenize,
)

RESPONSES = ["The cat sat on the mat.", "  42\n", "Paris is the capital of France.", "I do not know."]
REFERENCES = ["The cat is on the mat.", "42", "Paris is the capital of France.", "Berlin."]


def test_exact_match_strips_surrounding_whitespace_only() -> None:
    assert exact_match_count(RESPONSES, REFERENCES) == 2
    assert exact_match_count(["a b", "A", "x "], ["a  b", "a", "\tx"]) == 1
    assert exact_match_count([], []) == 0
    with pytest.raises(ValueError, match="2 responses but 1 references"):
        exact_match_count(["a", "b"], ["a"])


def test_bleu_and_chrf_equal_sacrebleu_on_the_stripped_texts() -> None:
    stripped = [r.strip() for r in RESPONSES]
    expected_bleu = sacrebleu.corpus_bleu(stripped, [REFERENCES], tokenize="13a").score
    expected_chrf = sacrebleu.corpus_chrf(stripped, [REFERENCES]).score
    assert corpus_bleu(RESPONSES, REFERENCES).score == expected_bleu
    assert corpus_bleu(RESPONSES, REFERENCES, "13a").score == expected_bleu
    assert corpus_chrf(RESPONSES, REFERENCES).score == expected_chrf
    assert 0 < expected_bleu < 100 and 0 < expected_chrf < 100
    assert corpus_bleu(REFERENCES, REFERENCES).score == pytest.approx(100.0)
    assert corpus_chrf(REFERENCES, REFERENCES).score == pytest.approx(100.0)
    assert corpus_bleu(["xyz uvw"], ["abc def"]).score == 0.0


def test_chinese_references_get_the_zh_tokenizer() -> None:
    refs = ["今天天气很好，我们去公园散步吧。", "我喜欢吃苹果和香蕉。"]
    hyps = ["今天天气不错，我们去公园吧。", "我喜欢吃苹果。"]
    assert choose_bleu_tokenize(refs) == "zh"
    zh = sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score
    assert corpus_bleu(hyps, refs).score == zh
    # 13a sees each unsegmented sentence as one or two words and finds almost nothing in common.
    assert zh > 30 and sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score < 1


@pytest.mark.parametrize(("references", "expected"), [
    (["The quick brown fox."], "13a"),
    ([""], "13a"),
    ([], "13a"),
    (["これはペンです。"], "char"),
    (["안녕하세요, 반갑습니다."], "char"),
    (["東京は日本の首都です。"], "char"),
    (["我喜欢 Python programming"], "zh"),  # 3 Han of 24 non-space characters: 12.5%
    (["我 likes Python programming"], "13a"),  # 1 of 24: 4%
])
def test_bleu_tokenizer_choice(references: list[str], expected: str) -> None:
    assert choose_bleu_tokenize(references) == expected


def test_explicit_tokenizers_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_bleu_tokenize("auto", ["今天天气很好"]) == "zh"
    assert resolve_bleu_tokenize("char", ["hello"]) == "char"
    hyps, refs = ["abc def"], ["abd def"]
    assert corpus_bleu(hyps, refs, "char").score == sacrebleu.corpus_bleu(hyps, [refs], tokenize="char").score
    with pytest.raises(OsstuneError, match="--bleu_tokenize spm: unknown tokenizer"):
        resolve_bleu_tokenize("spm", ["x"])
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # the import fails as when it is not installed
    with pytest.raises(OsstuneError, match="needs the sentencepiece package"):
        corpus_bleu(hyps, refs, "flores200")


def test_signatures_name_the_tokenizer() -> None:
    bleu = corpus_bleu(["今天天气很好"], ["今天天气不错"]).signature
    assert bleu.startswith("nrefs:1|case:mixed|eff:no|tok:zh|smooth:exp|version:")
    assert corpus_chrf(["a"], ["b"]).signature.startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")


def test_length_stats() -> None:
    stats = length_stats([1, 2, 3, 10], [4, 4, 6, 7], [10, 20, 30, 41], [True, True, False, True])
    assert stats.response_mean == 4.0
    assert stats.response_median == 2.5
    assert stats.reference_mean == 5.25
    assert stats.reference_median == 5.0
    assert stats.completion_mean == 25.25
    assert stats.finished_share == 0.75
    one = length_stats([5], [3], [9], [False])
    assert (one.response_mean, one.response_median, one.reference_median, one.finished_share) == (5.0, 5.0, 3.0, 0.0)
    with pytest.raises(ValueError, match="equally long, non-empty"):
        length_stats([1, 2], [1], [1, 2], [True, True])
    with pytest.raises(ValueError, match="equally long, non-empty"):
        length_stats([], [], [], [])
