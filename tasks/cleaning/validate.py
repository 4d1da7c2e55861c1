"""Validation: the first cleaning stage, which drops generated examples that cannot be training pairs.

Generation already checks the *shape* of every output (JSON schema); this stage checks the
*content* of the mapped ``query`` / ``positive`` / ``negative`` fields, row by row, and drops a row
at the first check it fails (the check's code is the ``reason``, with a human ``detail``):

=========================  ==================================================================
``empty_query``            query missing or blank
``empty_positive``         positive missing or blank
``missing_negative``       no negative for a type that has one (retrieval, classification, sts, bitext)
``query_too_short/long``   query length outside ``min/max_query_chars`` (long_long queries are
                           documents: ``min/max_doc_chars``)
``positive_too_short/long``, ``negative_too_short/long``
                           outside ``min/max_doc_chars``; classification positives and negatives
                           are labels: 1 to ``min(max_query_chars, LABEL_MAX_CHARS)`` characters
``degenerate``             a field with no letter or digit, or (from ``DEGENERATE_MIN_CHARS`` chars)
                           very few distinct characters, mostly non-letters, one token repeated,
                           or zlib compressing it like a loop
``positive_equals_query``  equal after normalization (case, whitespace, punctuation)
``positive_equals_negative``
``instruction_leak``       the normalized instruction (>= 20 chars) inside the query or positive, or a
                           query whose tokens are (>= 90 %) the instruction's
``language_mismatch``      ``check_language``: py3langid confidently (>= ``LANGUAGE_MIN_PROB``) detects
                           another language than the placeholders asked for (``language``; bitext:
                           query ``src_lang``, positive ``tgt_lang``), on texts of at least
                           ``language_min_chars`` characters
=========================  ==================================================================

Kept rows keep the input schema and order. Cheap checks are vectorised with Arrow compute; the rest
run in Python only on the rows still alive.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ground.settings import CleanSettings
from storage.corpus import StageResult
from tasks.cleaning.dedup import dropped_table, normalize_array

STAGE = "validate"

#: task types whose examples must carry a negative
NEGATIVE_TYPES: tuple[str, ...] = ("retrieval", "classification", "sts", "bitext")
#: task types whose positive/negative are short labels, not documents
LABEL_TYPES: tuple[str, ...] = ("classification",)
#: task types whose query is a document
DOC_QUERY_TYPES: tuple[str, ...] = ("long_long",)
LABEL_MAX_CHARS = 100

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
    "english": "en", "chinese": "zh", "spanish": "es", "french": "fr", "german": "de", "japanese": "ja",
    "russian": "ru", "portuguese": "pt", "italian": "it", "korean": "ko", "arabic": "ar", "hindi": "hi",
    "dutch": "nl", "polish": "pl", "turkish": "tr", "vietnamese": "vi", "indonesian": "id", "swedish": "sv",
    "czech": "cs", "danish": "da", "finnish": "fi", "greek": "el", "hebrew": "he", "hungarian": "hu",
    "norwegian": "no", "persian": "fa", "romanian": "ro", "thai": "th", "ukrainian": "uk", "malay": "ms",
    "bengali": "bn", "urdu": "ur", "tamil": "ta", "catalan": "ca",
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
        ratio = len(raw) / len(zlib.compress(raw, 6))
        if ratio > MAX_ZLIB_RATIO:
            return f"compresses {ratio:.1f}x (repetition)"
    return None


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
    """Leak check on *normalized* texts (see :func:`tasks.cleaning.dedup.normalize_array`)."""
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


def language_mismatch_detail(text: str | None, requested: str | None, field: str,
                             min_chars: int) -> str | None:
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


# --------------------------------------------------------------------------- the stage


def _np(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False))


class _Verdicts:
    """The first failing reason (and its detail) per row."""

    def __init__(self, n: int):
        self.alive = np.ones(n, dtype=bool)
        self.reason: dict[int, str] = {}
        self.detail: dict[int, str] = {}

    def _drop(self, i: int, reason: str, detail: str) -> None:
        self.alive[i] = False
        self.reason[i] = reason
        self.detail[i] = detail

    def flag(self, mask: np.ndarray, reason: str, detail: Callable[[int], str]) -> None:
        """Drop the live rows where ``mask`` holds (a vectorised check)."""
        for i in np.flatnonzero(mask & self.alive):
            self._drop(int(i), reason, detail(int(i)))

    def check_each(self, reason: str, check: Callable[[int], str | None]) -> None:
        """Drop the live rows for which ``check`` returns a detail (a per-row check)."""
        for i in np.flatnonzero(self.alive):
            found = check(int(i))
            if found is not None:
                self._drop(int(i), reason, found)


def validate_examples(table: pa.Table, cfg: CleanSettings) -> StageResult:
    """Keep the rows that pass every check; drop the others with the first failing check's reason."""
    n = table.num_rows
    v = _Verdicts(n)
    task_type = table.column("task_type")
    types = task_type.to_pylist()
    is_neg_type = _np(pc.is_in(task_type, value_set=pa.array(NEGATIVE_TYPES)))
    is_label = _np(pc.is_in(task_type, value_set=pa.array(LABEL_TYPES)))
    is_doc_query = _np(pc.is_in(task_type, value_set=pa.array(DOC_QUERY_TYPES)))

    fields = {name: table.column(name) for name in ("query", "positive", "negative")}
    trimmed = {name: pc.utf8_trim_whitespace(col) for name, col in fields.items()}
    length = {name: _np(pc.fill_null(pc.utf8_length(col), 0)) for name, col in trimmed.items()}
    present = {name: length[name] > 0 for name in fields}

    # 1. presence
    v.flag(~present["query"], "empty_query", lambda i: "query is missing or blank")
    v.flag(~present["positive"], "empty_positive", lambda i: "positive is missing or blank")
    v.flag(is_neg_type & ~present["negative"], "missing_negative",
           lambda i: f"{types[i]} needs a negative")

    # 2. length bounds
    label_max = min(cfg.max_query_chars, LABEL_MAX_CHARS)
    bounds = {
        "query": (np.where(is_doc_query, cfg.min_doc_chars, cfg.min_query_chars),
                  np.where(is_doc_query, cfg.max_doc_chars, cfg.max_query_chars)),
        "positive": (np.where(is_label, 1, cfg.min_doc_chars), np.where(is_label, label_max, cfg.max_doc_chars)),
        "negative": (np.where(is_label, 1, cfg.min_doc_chars), np.where(is_label, label_max, cfg.max_doc_chars)),
    }
    for name, (lo, hi) in bounds.items():
        ln = length[name]
        v.flag(present[name] & (ln < lo), f"{name}_too_short",
               lambda i, name=name, ln=ln, lo=lo: f"{name} has {ln[i]} chars (min {lo[i]})")
        v.flag(present[name] & (ln > hi), f"{name}_too_long",
               lambda i, name=name, ln=ln, hi=hi: f"{name} has {ln[i]} chars (max {hi[i]})")

    # 3. degenerate text
    texts = {name: col.to_pylist() for name, col in fields.items()}
    ratios = {name: letter_ratios(col) for name, col in fields.items()}

    def degenerate(i: int) -> str | None:
        for name in ("query", "positive", "negative"):
            text = texts[name][i]
            if text is not None and text.strip():
                found = degenerate_detail(text, float(ratios[name][i]))
                if found:
                    return f"{name}: {found}"
        return None

    v.check_each("degenerate", degenerate)

    # 4. equal fields after normalization
    norm = {name: normalize_array(col) for name, col in fields.items()}
    same_qp = _np(pc.fill_null(pc.equal(norm["query"], norm["positive"]), False))
    v.flag(same_qp, "positive_equals_query", lambda i: "positive equals the query (normalized)")
    same_pn = _np(pc.fill_null(pc.equal(norm["positive"], norm["negative"]), False))
    v.flag(same_pn, "positive_equals_negative", lambda i: "positive equals the negative (normalized)")

    # 5. instruction leaking into the outputs
    instr_n = normalize_array(table.column("instruction")).to_pylist()
    query_n, positive_n = norm["query"].to_pylist(), norm["positive"].to_pylist()
    v.check_each("instruction_leak",
                 lambda i: instruction_leak_detail(instr_n[i], query_n[i] or "", positive_n[i] or ""))

    # 6. language
    if cfg.check_language:
        placeholders = table.column("placeholders").to_pylist()

        def mismatch(i: int) -> str | None:
            want_q, want_p = _requested_languages(placeholders[i], types[i])
            return (language_mismatch_detail(texts["query"][i], want_q, "query", cfg.language_min_chars)
                    or language_mismatch_detail(texts["positive"][i], want_p, "positive",
                                                cfg.language_min_chars))

        v.check_each("language_mismatch", mismatch)

    dropped_idx = np.flatnonzero(~v.alive)  # input order
    dropped = dropped_table(table, dropped_idx, STAGE, [v.reason[int(i)] for i in dropped_idx],
                            [v.detail[int(i)] for i in dropped_idx])
    return StageResult(kept=table.filter(pa.array(v.alive)), dropped=dropped)
