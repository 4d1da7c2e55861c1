"""The validation checks on one text at a time: the reference definition of each drop reason's test.

:mod:`tasks.cleaning.validate` screens whole columns with polars first and calls these functions only on
the rows its screens flag (they confirm the verdict and write the detail), and on every live row for the
checks that cannot be vectorised (py3langid, zlib). The thresholds below are the whole calibration.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# degenerate-text thresholds (calibrated on natural text in several languages and on loops)
DEGENERATE_MIN_CHARS = 20  # shorter fields are only checked for having a letter or digit
MIN_DISTINCT_CHARS = 5  # fewer distinct non-space characters in a >= 20-char text is degenerate
MIN_LETTER_RATIO = 0.2  # letters (incl. combining marks) over non-space characters
REPEAT_MIN_TOKENS = 10
MAX_TOP_TOKEN_SHARE = 0.5  # one token making up half of the tokens
ZLIB_MIN_BYTES = 200
MAX_ZLIB_RATIO = 6.0  # natural prose compresses 2-3.5x (up to ~5x for lists); loops 8x and more

# instruction leak
LEAK_MIN_CHARS = 20
LEAK_MIN_TOKENS = 4
LEAK_TOKEN_OVERLAP = 0.9

# language identification
LANGUAGE_MIN_PROB = 0.9
LANGUAGE_SAMPLE_CHARS = 300  # py3langid walks bytes in Python: identify on the first 300 characters

#: language names used by prompts/task_types.py (and a few more) -> ISO 639-1
LANGUAGE_CODES: dict[str, str] = {
    "english": "en",
    "chinese": "zh",
    "spanish": "es",
    "french": "fr",
    "german": "de",
    "japanese": "ja",
    "russian": "ru",
    "portuguese": "pt",
    "italian": "it",
    "korean": "ko",
    "arabic": "ar",
    "hindi": "hi",
    "dutch": "nl",
    "polish": "pl",
    "turkish": "tr",
    "vietnamese": "vi",
    "indonesian": "id",
    "swedish": "sv",
    "czech": "cs",
    "danish": "da",
    "finnish": "fi",
    "greek": "el",
    "hebrew": "he",
    "hungarian": "hu",
    "norwegian": "no",
    "persian": "fa",
    "romanian": "ro",
    "thai": "th",
    "ukrainian": "uk",
    "malay": "ms",
    "bengali": "bn",
    "urdu": "ur",
    "tamil": "ta",
    "catalan": "ca",
}
#: py3langid's "no linguistic content" (URLs, numbers, code): not a language, so never a mismatch
NO_LANGUAGE = frozenset({"zxx", "und"})
#: detections that do not count as a mismatch for a requested language: varieties and close
#: languages that py3langid confuses with it (kanji-only Japanese reads as Chinese, etc.)
COMPATIBLE_CODES: dict[str, frozenset[str]] = {
    "en": frozenset({"en", "pcm"}),
    "zh": frozenset({"zh", "wuu", "yue"}),
    "ja": frozenset({"ja", "zh", "wuu", "yue"}),
    "es": frozenset({"es", "gl", "an", "ext"}),
    "pt": frozenset({"pt", "gl"}),
    "fr": frozenset({"fr", "wa", "oc"}),
    "de": frozenset({"de", "lb"}),
    "it": frozenset({"it", "vec", "lij"}),
    "nl": frozenset({"nl", "af", "fy"}),
    "ar": frozenset({"ar", "arz", "ary"}),
    "hi": frozenset({"hi", "mr", "ne"}),
    "id": frozenset({"id", "ms", "jv"}),
    "ms": frozenset({"ms", "id"}),
    "sv": frozenset({"sv", "no", "nn", "da"}),
    "no": frozenset({"no", "nn", "da", "sv"}),
    "da": frozenset({"da", "no", "nn", "sv"}),
    "tr": frozenset({"tr", "az"}),
}


# --------------------------------------------------------------------------- single-text checks


def degenerate_detail(text: str, letter_ratio: float | None = None) -> str | None:
    """Why ``text`` is degenerate (repetition, junk), or None. Thresholds: see module constants.

    ``letter_ratio`` (letters and combining marks over non-space characters) may be passed in when
    it was computed for a whole column (:func:`letter_ratios`).
    """
    s = text.strip()
    if not any(ch.isalnum() for ch in s):
        return "no letter or digit"
    if len(s) < DEGENERATE_MIN_CHARS:
        return None
    distinct = set(s)
    distinct.difference_update(" \t\n\r\f\v")
    if len(distinct) < MIN_DISTINCT_CHARS:
        return f"only {len(distinct)} distinct characters in {len(s)}"
    if letter_ratio is None:
        letter_ratio = float(letter_ratios(pa.array([s]))[0])
    if letter_ratio < MIN_LETTER_RATIO:
        return f"only {letter_ratio:.0%} letters"
    tokens = s.casefold().split()
    # a token with half of the tokens leaves at most n/2 + 1 distinct ones (cheap pre-check)
    if len(tokens) >= REPEAT_MIN_TOKENS and len(set(tokens)) <= len(tokens) // 2 + 1:
        token, count = Counter(tokens).most_common(1)[0]
        if count / len(tokens) >= MAX_TOP_TOKEN_SHARE:
            return f"token {token[:20]!r} is {count} of {len(tokens)} tokens"
    raw = s.encode("utf-8")
    if len(raw) >= ZLIB_MIN_BYTES:
        ratio = zlib_ratio(raw)
        if ratio > MAX_ZLIB_RATIO:
            return f"compresses {ratio:.1f}x (repetition)"
    return None


def zlib_ratio(raw: bytes) -> float:
    """How many times zlib (level 6) shrinks ``raw``: natural prose 2-3.5x, loops 8x and more."""
    return len(raw) / len(zlib.compress(raw, 6))


def letter_ratios(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Per text: letters and combining marks (Devanagari vowel signs...) over non-space characters
    (1.0 for null or blank texts). Arrow regexes over runs, not per character, to stay fast."""
    length = _np(pc.fill_null(pc.utf8_length(texts), 0)).astype(float)
    other = pc.replace_substring_regex(texts, pattern=r"[\p{L}\p{M}\s\p{Z}]+", replacement="")
    spaces = pc.replace_substring_regex(texts, pattern=r"[^\s\p{Z}]+", replacement="")
    nonspace = length - _np(pc.fill_null(pc.utf8_length(spaces), 0))
    letters = nonspace - _np(pc.fill_null(pc.utf8_length(other), 0))
    return np.divide(letters, nonspace, out=np.ones_like(letters), where=nonspace > 0)


def _tokens(normalized: str) -> set[str]:
    return set(normalized.split())


def instruction_leak_detail(instruction_n: str | None, query_n: str, positive_n: str) -> str | None:
    """Leak check on *normalized* texts (see :func:`tasks.cleaning.dedup.dedup_keys`)."""
    if not instruction_n:
        return None
    if len(instruction_n) >= LEAK_MIN_CHARS:
        padded = f" {instruction_n} "
        if padded in f" {query_n} ":
            return "instruction text inside the query"
        if padded in f" {positive_n} ":
            return "instruction text inside the positive"
    q_tokens = _tokens(query_n)
    if len(q_tokens) >= LEAK_MIN_TOKENS:
        overlap = len(q_tokens & _tokens(instruction_n)) / len(q_tokens)
        if overlap >= LEAK_TOKEN_OVERLAP:
            return f"{overlap:.0%} of the query's tokens are the instruction's"
    return None


# --------------------------------------------------------------------------- language


@lru_cache(maxsize=1)
def language_identifier():
    """py3langid with normalized (calibrated) probabilities; loaded once (about 1.5 s)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_code(name: str | None) -> str | None:
    """ISO 639-1 code of a prompt language name ("English" -> "en"); None if unknown."""
    if not isinstance(name, str):
        return None
    key = name.strip().casefold()
    if key in LANGUAGE_CODES:
        return LANGUAGE_CODES[key]
    return key if key in LANGUAGE_CODES.values() else None


def detect_language(text: str) -> tuple[str, float]:
    """(ISO code, probability) of ``text``'s language, from its first LANGUAGE_SAMPLE_CHARS characters."""
    lang, prob = language_identifier().classify(text[:LANGUAGE_SAMPLE_CHARS])
    return lang, float(prob)


def language_mismatch_detail(text: str | None, requested: str | None, field: str, min_chars: int) -> str | None:
    """Detail when ``text`` is confidently in another language than ``requested`` (a prompt name)."""
    code = language_code(requested)
    if code is None or text is None or len(text.strip()) < min_chars:
        return None
    detected, prob = detect_language(text.strip())
    if detected in NO_LANGUAGE:
        return None
    if prob >= LANGUAGE_MIN_PROB and detected not in COMPATIBLE_CODES.get(code, frozenset({code})):
        return f"{field}: requested {requested} ({code}), detected {detected} (p={prob:.2f})"
    return None


@lru_cache(maxsize=65536)
def _requested_languages(placeholders: str | None, task_type: str | None) -> tuple[str | None, str | None]:
    """(language asked for the query, language asked for the positive) from the placeholders JSON."""
    try:
        values = json.loads(placeholders) if placeholders else {}
    except (TypeError, ValueError):
        return None, None
    if not isinstance(values, dict):
        return None, None
    if task_type == "bitext":
        return values.get("src_lang"), values.get("tgt_lang")
    lang = values.get("language")
    return lang, lang


# --------------------------------------------------------------------------- Arrow helpers


def _np(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False))
