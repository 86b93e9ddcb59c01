"""Generation metrics against reference answers: exact match, corpus BLEU and chrF (sacrebleu), length statistics.

BLEU depends on how text is split into words. :func:`choose_bleu_tokenize` picks sacrebleu's tokenizer from the
references, so that ``auto`` gives the customary choice for the language:

- ``char`` when kana or hangul make up at least 10% of the references' non-space characters (Japanese, Korean:
  sacrebleu's ``ja-mecab``/``ko-mecab`` need MeCab, which osstune does not install, and character BLEU needs
  nothing);
- ``zh`` when Han characters make up at least 10% (Chinese, alone or mixed with English: the ``zh`` tokenizer
  splits every Chinese character and tokenizes the rest like ``13a``, as in WMT's Chinese evaluations);
- ``13a`` otherwise (mteval-v13a, sacrebleu's default and the WMT standard for space-delimited languages).

``intl``, ``flores200`` (SentencePiece, language-independent; needs the ``sentencepiece`` package, and sacrebleu
downloads its model on first use) and ``none`` can be chosen explicitly. chrF works on characters and needs no
tokenizer.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from osstune.errors import OsstuneError

BLEU_TOKENIZERS: tuple[str, ...] = ("auto", "13a", "zh", "char", "intl", "flores200", "none")
"""Accepted ``--bleu_tokenize`` values."""

SCRIPT_SHARE = 0.1
"""Share of non-space characters from which a script decides the BLEU tokenizer (see the module docstring)."""

_HAN_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F))
_KANA_HANGUL_RANGES = ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF))


def _in_ranges(char: str, ranges: tuple[tuple[int, int], ...]) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in ranges)


def choose_bleu_tokenize(references: Sequence[str]) -> str:
    """sacrebleu's tokenizer for these references: ``char``, ``zh`` or ``13a`` (rules in the module docstring).

    Args:
        references: the reference texts.
    """
    chars = [c for text in references for c in text if not c.isspace()]
    if not chars:
        return "13a"
    kana_hangul = sum(_in_ranges(c, _KANA_HANGUL_RANGES) for c in chars)
    if kana_hangul >= SCRIPT_SHARE * len(chars):
        return "char"
    han = sum(_in_ranges(c, _HAN_RANGES) for c in chars)
    return "zh" if han >= SCRIPT_SHARE * len(chars) else "13a"


def exact_match_count(responses: Sequence[str], references: Sequence[str]) -> int:
    """How many responses equal their reference after stripping surrounding whitespace.

    Args:
        responses: the model's answers.
        references: the expected answers, one per response.

    Raises:
        ValueError: when the two sequences differ in length.
    """
    _check_pairs(responses, references)
    return sum(r.strip() == ref.strip() for r, ref in zip(responses, references))


@dataclass(frozen=True)
class CorpusScore:
    """A corpus-level sacrebleu score.

    Args:
        score: the score, 0 to 100.
        signature: sacrebleu's reproducibility signature (references, case, tokenizer, smoothing, version).
    """

    score: float
    signature: str


def corpus_bleu(responses: Sequence[str], references: Sequence[str], tokenize: str = "auto") -> CorpusScore:
    """Corpus BLEU of the responses against one reference each (texts stripped first).

    Args:
        responses: the model's answers.
        references: the expected answers, one per response.
        tokenize: one of :data:`BLEU_TOKENIZERS`; ``auto`` applies :func:`choose_bleu_tokenize` to the references.

    Raises:
        OsstuneError: an unknown tokenizer, or ``flores200`` without the ``sentencepiece`` package.
        ValueError: when the two sequences differ in length.
    """
    from sacrebleu.metrics import BLEU

    _check_pairs(responses, references)
    refs = [r.strip() for r in references]
    name = resolve_bleu_tokenize(tokenize, refs)
    metric = BLEU(tokenize=name)
    result = metric.corpus_score([r.strip() for r in responses], [refs])
    return CorpusScore(score=float(result.score), signature=str(metric.get_signature()))


def resolve_bleu_tokenize(tokenize: str, references: Sequence[str]) -> str:
    """The sacrebleu tokenizer name for a ``--bleu_tokenize`` value, checked to be usable here.

    Args:
        tokenize: one of :data:`BLEU_TOKENIZERS`.
        references: the reference texts (used by ``auto``).

    Raises:
        OsstuneError: an unknown name, or ``flores200`` without the ``sentencepiece`` package.
    """
    if tokenize not in BLEU_TOKENIZERS:
        raise OsstuneError(f"--bleu_tokenize {tokenize}: unknown tokenizer; use one of {', '.join(BLEU_TOKENIZERS)}.")
    if tokenize == "flores200":
        try:
            import sentencepiece  # noqa: F401
        except ImportError:
            raise OsstuneError("--bleu_tokenize flores200 needs the sentencepiece package (pip install "
                               "sentencepiece), and downloads its model on first use; or use char, zh or "
                               "13a.") from None
    return choose_bleu_tokenize(references) if tokenize == "auto" else tokenize


def corpus_chrf(responses: Sequence[str], references: Sequence[str]) -> CorpusScore:
    """Corpus chrF (character 6-grams, beta 2: sacrebleu's defaults) against one reference each (texts stripped).

    Args:
        responses: the model's answers.
        references: the expected answers, one per response.

    Raises:
        ValueError: when the two sequences differ in length.
    """
    from sacrebleu.metrics import CHRF

    _check_pairs(responses, references)
    metric = CHRF()
    result = metric.corpus_score([r.strip() for r in responses], [[r.strip() for r in references]])
    return CorpusScore(score=float(result.score), signature=str(metric.get_signature()))


@dataclass(frozen=True)
class LengthStats:
    """Lengths of the answers against the references, in tokens of the model's tokenizer.

    Args:
        response_mean: mean tokens of the final answers.
        response_median: median tokens of the final answers.
        reference_mean: mean tokens of the references.
        reference_median: median tokens of the references.
        completion_mean: mean tokens generated per record, reasoning and stop token included.
        finished_share: share of replies that ended on a stop token rather than the token budget.
    """

    response_mean: float
    response_median: float
    reference_mean: float
    reference_median: float
    completion_mean: float
    finished_share: float


def length_stats(
    response_tokens: Sequence[int],
    reference_tokens: Sequence[int],
    completion_tokens: Sequence[int],
    finished: Sequence[bool],
) -> LengthStats:
    """Summarise answer lengths.

    Args:
        response_tokens: token count of each final answer.
        reference_tokens: token count of each reference.
        completion_tokens: tokens generated for each record (reasoning and stop token included).
        finished: whether each reply ended on a stop token.

    Raises:
        ValueError: when the sequences are empty or differ in length.
    """
    sizes = {len(response_tokens), len(reference_tokens), len(completion_tokens), len(finished)}
    if len(sizes) != 1 or not response_tokens:
        raise ValueError(f"length_stats needs equally long, non-empty sequences, got lengths {sorted(sizes)}")
    return LengthStats(
        response_mean=statistics.fmean(response_tokens),
        response_median=float(statistics.median(response_tokens)),
        reference_mean=statistics.fmean(reference_tokens),
        reference_median=float(statistics.median(reference_tokens)),
        completion_mean=statistics.fmean(completion_tokens),
        finished_share=sum(map(bool, finished)) / len(finished),
    )


def _check_pairs(responses: Sequence[str], references: Sequence[str]) -> None:
    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} responses but {len(references)} references")
