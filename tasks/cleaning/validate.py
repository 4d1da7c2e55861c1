"""Validation: the first cleaning stage, which drops generated examples that cannot be training pairs.

Generation already checks the *shape* of every output (JSON schema); this stage checks the
*content* of the mapped ``query`` / ``positive`` / ``negative`` fields and drops a row at the first
check it fails (the check's code is the ``reason``, with a human ``detail``):

=========================  ==================================================================
``empty_query``            query missing or blank
``empty_positive``         positive missing or blank
``missing_negative``       no negative for a type that has one (retrieval, classification, sts, bitext)
``query_too_short/long``, ``positive_too_short/long``, ``negative_too_short/long``
                           outside the field's limits in ``ground/task_types.py`` (the table the
                           JSON schemas are built from: a query, a document, a label, ...)
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

Kept rows keep the input schema and order. What each check means on one text is defined in
:mod:`tasks.cleaning.text_checks`. Here presence and lengths are Arrow compute; degenerate text and
instruction leaks are first *screened* for whole columns with polars, and the per-text function runs
only on the flagged rows, where it confirms the verdict and writes the detail. A screen may flag too
much, never too little, so the verdicts are the per-text functions' own. The screens split and strip
text with Python's own whitespace, letter/digit and case-folding tables (:func:`python_text_classes`),
not the regex engine's, whose Unicode version differs. zlib and py3langid run per row, on live rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ground.settings import CleanSettings
from ground.task_types import FIELD_KINDS, field_limit
from storage.corpus import Drops, StageResult
from tasks.cleaning.dedup import dedup_keys
from tasks.cleaning.stage import Filter
from tasks.cleaning.text_checks import (
    DEGENERATE_MIN_CHARS,
    LEAK_MIN_CHARS,
    LEAK_MIN_TOKENS,
    LEAK_TOKEN_OVERLAP,
    MAX_TOP_TOKEN_SHARE,
    MAX_ZLIB_RATIO,
    MIN_DISTINCT_CHARS,
    MIN_LETTER_RATIO,
    REPEAT_MIN_TOKENS,
    ZLIB_MIN_BYTES,
    _np,
    _requested_languages,
    degenerate_detail,
    instruction_leak_detail,
    language_mismatch_detail,
    letter_ratios,
    zlib_ratio,
)

STAGE = "validate"

#: task types whose examples must carry a negative
NEGATIVE_TYPES: tuple[str, ...] = ("retrieval", "classification", "sts", "bitext")

FIELDS = ("query", "positive", "negative")
#: the distinct-character screen looks at this many leading characters (a prefix has no more)
DISTINCT_PREFIX_CHARS = 64
#: what degenerate_detail does not count as a distinct character
DISTINCT_IGNORED = " \t\n\r\f\v"


# --------------------------------------------------------------------------- Python's text tables for polars


@dataclass(frozen=True)
class PythonTextClasses:
    """Python's str.isspace / str.isalnum / str.casefold, as polars arguments (exact, any Unicode version)."""

    whitespace: str  # every character str.strip() and str.split() treat as space
    whitespace_run: str  # regex: one or more of them
    other_whitespace: str  # regex: one of them that is not " "
    alnum: str  # regex: one character for which str.isalnum() holds
    fold_from: list[str]  # characters that str.casefold() changes ...
    fold_to: list[str]  # ... and what it changes them to


def _regex_class(ranges: list[tuple[int, int]]) -> str:
    return "[" + "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges) + "]"


@lru_cache(maxsize=1)
def python_text_classes() -> PythonTextClasses:
    """Built once per process (~0.3 s) from Python's own Unicode database, which ``re`` shares with str."""
    codepoints = np.arange(0x110000, dtype="<u4")
    every = codepoints[(codepoints < 0xD800) | (codepoints >= 0xE000)].tobytes().decode("utf-32-le")
    whitespace = "".join(re.findall(r"\s", every))  # sre's \s is str.isspace, its \w is isalnum + "_"
    alnum = [(ord(every[m.start()]), ord(every[m.end() - 1])) for m in re.finditer(r"[^\W_]+", every)]
    # case folding ends at plane 1 (the tests check all planes); it is per character
    folds = {c: c.casefold() for c in map(chr, range(0x20000)) if c.casefold() != c}
    return PythonTextClasses(
        whitespace=whitespace,
        whitespace_run=_regex_class([(ord(c), ord(c)) for c in whitespace]) + "+",
        other_whitespace=_regex_class([(ord(c), ord(c)) for c in whitespace if c != " "]),
        alnum=_regex_class(alnum),
        fold_from=list(folds),
        fold_to=list(folds.values()),
    )


def python_tokens(text: pl.Expr) -> pl.Expr:
    """``text.split()`` as a polars list (an empty text gives ``[""]``)."""
    classes = python_text_classes()
    return text.str.strip_chars(classes.whitespace).str.replace_all(classes.whitespace_run, " ").str.split(" ")


# --------------------------------------------------------------------------- screens (superset of each check)


def degenerate_screen(texts: pa.ChunkedArray, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Live rows whose text :func:`degenerate_detail` may call degenerate (it returns None for the others),
    and the letter ratio per row that degenerate_detail reads (computed where it reads it: live texts of
    at least DEGENERATE_MIN_CHARS characters with a letter or digit; 1.0 elsewhere)."""
    classes = python_text_classes()
    text = pl.col("text").str.strip_chars(classes.whitespace)
    frame = (
        pl.from_arrow(pa.table({"text": texts}))
        .select(
            length=text.str.len_chars().fill_null(0),
            n_bytes=text.str.len_bytes().fill_null(0),
            alnum=text.str.contains(classes.alnum).fill_null(False),
            # distinct characters of a prefix: as many as the whole text has, at most
            distinct=text.str.slice(0, DISTINCT_PREFIX_CHARS)
            .str.split("")
            .list.set_difference(pl.lit(list(DISTINCT_IGNORED)))
            .list.len()
            .fill_null(0),
            tokens=python_tokens(text.str.replace_many(classes.fold_from, classes.fold_to)),
        )
        .with_columns(
            n_tokens=pl.col("tokens").list.len().fill_null(0),
            top_token=pl.col("tokens").list.eval(pl.element().unique_counts().max()).list.first(),
        )
    )
    length, alnum = frame["length"].to_numpy(), frame["alnum"].to_numpy()
    present = live & (length > 0)
    long = present & alnum & (length >= DEGENERATE_MIN_CHARS)
    ratio = np.ones(len(length))
    ratio[long] = letter_ratios(texts.filter(pa.array(long)))
    n_tokens, top_token = frame["n_tokens"].to_numpy(), frame["top_token"].fill_null(0).to_numpy()
    flagged = present & ~alnum
    flagged |= long & (frame["distinct"].to_numpy() < MIN_DISTINCT_CHARS)
    flagged |= long & (ratio < MIN_LETTER_RATIO)
    flagged |= long & (n_tokens >= REPEAT_MIN_TOKENS) & (top_token >= MAX_TOP_TOKEN_SHARE * n_tokens)
    # zlib has no vectorised form: compress the live long texts that nothing else flagged
    rows = np.flatnonzero(long & ~flagged & (frame["n_bytes"].to_numpy() >= ZLIB_MIN_BYTES))
    flagged[rows] = [
        zlib_ratio(text.strip().encode("utf-8")) > MAX_ZLIB_RATIO
        for text in texts.take(pa.array(rows, type=pa.int64())).to_pylist()
    ]
    return flagged, ratio


def instruction_leak_screen(instruction_n: pa.Array, query_n: pa.Array, positive_n: pa.Array) -> np.ndarray:
    """Rows (of normalized texts) where :func:`instruction_leak_detail` may find a leak.

    Tokens are split on " " alone (empty ones dropped): that is ``split()`` unless a text holds another of
    Python's whitespace characters (normalization leaves few: U+1680, U+2028...), and such rows are flagged.
    """
    other_whitespace = python_text_classes().other_whitespace
    padded = {name: pl.lit(" ") + pl.col(name).fill_null("") + pl.lit(" ") for name in ("i", "q", "p")}
    frame = (
        pl.from_arrow(pa.table({"i": instruction_n, "q": query_n, "p": positive_n}))
        .select(
            inside=(pl.col("i").str.len_chars() >= LEAK_MIN_CHARS)
            & (
                padded["q"].str.contains(padded["i"], literal=True)
                | padded["p"].str.contains(padded["i"], literal=True)
            ),
            odd_space=pl.col("q").str.contains(other_whitespace) | pl.col("i").str.contains(other_whitespace),
            q_tokens=pl.col("q").fill_null("").str.split(" ").list.set_difference(pl.lit([""])),
            i_tokens=pl.col("i").fill_null("").str.split(" ").list.set_difference(pl.lit([""])),
        )
        .select(
            pl.col("inside").fill_null(False) | pl.col("odd_space").fill_null(False),
            shared=pl.col("q_tokens").list.set_intersection(pl.col("i_tokens")).list.len(),
            q_count=pl.col("q_tokens").list.len(),
        )
    )
    shared, q_count = frame["shared"].to_numpy(), frame["q_count"].to_numpy()
    share = np.divide(shared, q_count, out=np.zeros(len(q_count)), where=q_count > 0)  # as Python divides
    overlap = (q_count >= LEAK_MIN_TOKENS) & (share >= LEAK_TOKEN_OVERLAP)
    return frame["inside"].to_numpy() | overlap


# --------------------------------------------------------------------------- the stage


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

    def check_each(self, reason: str, check: Callable[[int], str | None], screened: np.ndarray | None = None) -> None:
        """Drop the live rows (those ``screened`` in, if given) for which ``check`` returns a detail."""
        for i in np.flatnonzero(self.alive if screened is None else self.alive & screened):
            found = check(int(i))
            if found is not None:
                self._drop(int(i), reason, found)


def _normalized(column: pa.ChunkedArray, rows: np.ndarray) -> pa.Array:
    """dedup_keys of ``column``'s ``rows``, normalizing each distinct value once."""
    values = column.take(pa.array(rows, type=pa.int64()))
    distinct = pc.unique(values)
    return dedup_keys(distinct).take(pc.index_in(values, value_set=distinct))


def _values_at(column: pa.ChunkedArray, rows: np.ndarray) -> dict[int, object]:
    """{row: Python value} for ``rows`` of ``column``."""
    return dict(zip(rows.tolist(), column.take(pa.array(rows, type=pa.int64())).to_pylist(), strict=True))


class Validate(Filter):
    """Keep the rows that pass every check; drop the others with the first failing check's reason."""

    name = STAGE

    def __init__(self, cfg: CleanSettings):
        self.cfg = cfg

    def drops(self, rows: pa.Table) -> Drops:
        return validation_drops(rows, self.cfg)


def validate_examples(table: pa.Table, cfg: CleanSettings) -> StageResult:
    return Validate(cfg).run(table)


def validation_drops(table: pa.Table, cfg: CleanSettings) -> Drops:
    """The rows that fail a check, each with the first failing check's reason and detail."""
    n = table.num_rows
    v = _Verdicts(n)
    task_type = table.column("task_type")
    types = task_type.to_pylist()
    is_neg_type = _np(pc.is_in(task_type, value_set=pa.array(NEGATIVE_TYPES)))

    fields = {name: table.column(name) for name in FIELDS}
    trimmed = {name: pc.utf8_trim_whitespace(col) for name, col in fields.items()}
    length = {name: _np(pc.fill_null(pc.utf8_length(col), 0)) for name, col in trimmed.items()}
    present = {name: length[name] > 0 for name in fields}

    # 1. presence
    v.flag(~present["query"], "empty_query", lambda i: "query is missing or blank")
    v.flag(~present["positive"], "empty_positive", lambda i: "positive is missing or blank")
    v.flag(is_neg_type & ~present["negative"], "missing_negative", lambda i: f"{types[i]} needs a negative")

    # 2. length bounds: ground/task_types.py's table, the one the JSON schemas were built from
    for name in FIELDS:
        lo, hi = (np.zeros(n, dtype=np.int64) for _ in range(2))
        for task in set(types):
            limit = field_limit(task, name) if task in FIELD_KINDS else None
            rows = _np(pc.fill_null(pc.equal(task_type, task), False))
            lo[rows], hi[rows] = limit if limit is not None else (0, np.iinfo(np.int64).max)
        ln = length[name]
        v.flag(
            present[name] & (ln < lo),
            f"{name}_too_short",
            lambda i, name=name, ln=ln, lo=lo: f"{name} has {ln[i]} chars (min {lo[i]})",
        )
        v.flag(
            present[name] & (ln > hi),
            f"{name}_too_long",
            lambda i, name=name, ln=ln, hi=hi: f"{name} has {ln[i]} chars (max {hi[i]})",
        )

    # 3. degenerate text: screened per column, confirmed (and described) per flagged row, fields in order
    maybe_degenerate = np.zeros(n, dtype=bool)
    ratios = {}
    for name, col in fields.items():
        flagged, ratios[name] = degenerate_screen(col, v.alive)
        maybe_degenerate |= flagged

    def degenerate(i: int) -> str | None:
        for name in FIELDS:
            text = fields[name][i].as_py()
            if text is not None and text.strip():
                found = degenerate_detail(text, float(ratios[name][i]))
                if found:
                    return f"{name}: {found}"
        return None

    v.check_each("degenerate", degenerate, screened=maybe_degenerate)

    # 4. equal fields after normalization (live rows only)
    live = np.flatnonzero(v.alive)
    norm = {name: _normalized(col, live) for name, col in fields.items()}
    for reason, a, b in (
        ("positive_equals_query", "positive", "query"),
        ("positive_equals_negative", "positive", "negative"),
    ):
        same = np.zeros(n, dtype=bool)
        same[live] = _np(pc.fill_null(pc.equal(norm[a], norm[b]), False))
        v.flag(same, reason, lambda i, a=a, b=b: f"{a} equals the {b} (normalized)")

    # 5. instruction leaking into the outputs: screened, then confirmed per flagged row
    instruction_n = _normalized(table.column("instruction"), live)
    maybe_leak = np.zeros(n, dtype=bool)
    maybe_leak[live] = instruction_leak_screen(instruction_n, norm["query"], norm["positive"])
    position = np.full(n, -1)
    position[live] = np.arange(len(live))
    v.check_each(
        "instruction_leak",
        lambda i: instruction_leak_detail(
            instruction_n[position[i]].as_py(),
            norm["query"][position[i]].as_py() or "",
            norm["positive"][position[i]].as_py() or "",
        ),
        screened=maybe_leak,
    )

    # 6. language (py3langid, per live row)
    if cfg.check_language:
        placeholders = table.column("placeholders")
        live = np.flatnonzero(v.alive)
        texts = {name: _values_at(fields[name], live) for name in ("query", "positive")}

        def mismatch(i: int) -> str | None:
            want_q, want_p = _requested_languages(placeholders[i].as_py(), types[i])
            return language_mismatch_detail(
                texts["query"][i], want_q, "query", cfg.language_min_chars
            ) or language_mismatch_detail(texts["positive"][i], want_p, "positive", cfg.language_min_chars)

        v.check_each("language_mismatch", mismatch)

    dropped_idx = np.flatnonzero(~v.alive)  # input order
    return Drops(dropped_idx, [v.reason[int(i)] for i in dropped_idx], [v.detail[int(i)] for i in dropped_idx])
