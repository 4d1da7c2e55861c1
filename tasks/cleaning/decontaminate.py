"""Decontamination: drop rows whose query or positive is a near duplicate of an evaluation text.

Input: the deduped rows and the evaluation texts as ``EvalText(source, row, text)`` (where they come
from is the caller's business: ``flows/eval_texts.py`` gathers the STS Benchmark test splits and the
files and Hub datasets listed in ``clean.decontaminate_*``). Two checks, both on candidate pairs only:

1. **candidates**: an eval text is a candidate for a row's text when they share a word bigram or
   ``clean.decontaminate_ngram``-gram that at most :data:`MAX_POSTINGS` eval texts contain (common
   phrases such as "a man is" find no candidates on their own); one hash-set lookup per n-gram.
2. **n-gram overlap**: the share of the eval text's word n-grams found in the row's text; at or above
   ``clean.decontaminate_overlap`` the row is contaminated (a verbatim copy scores 1.0).
3. **embedding similarity**: otherwise, the cosine of the two texts (``encode``: the clean run's
   embedder with its cache) at or above ``clean.decontaminate_similarity``; only the texts of
   candidate pairs are embedded, and the cosines are one row-wise product.

A paraphrase that shares no bigram with the eval text is not caught (the price of not embedding every
eval text). Dropped rows get stage ``decontaminate``, reason ``contaminated`` and the matched source
and row in the detail.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from ground.settings import CleanSettings
from storage.corpus import Drops, StageResult
from tasks.cleaning.stage import Filter

STAGE = "decontaminate"
REASON = "contaminated"
#: an n-gram in more eval texts than this finds no candidates by itself (it still counts for the overlap)
MAX_POSTINGS = 20
#: per row text, the candidates with the most shared n-grams that go to the embedding check
EMBED_CANDIDATES = 5
#: the row fields that are checked, in order
FIELDS = ("query", "positive")

Encode = Callable[[list[str]], np.ndarray]
_WORD = re.compile(r"\w+")


class EvalText(NamedTuple):
    """One evaluation text: where it comes from (e.g. ``stsb-en-test``), its row there, the text."""

    source: str
    row: int
    text: str


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Casefolded word n-grams; a text of fewer than ``n`` words is one gram of all its words."""
    words = _WORD.findall(text.casefold())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@dataclass
class EvalIndex:
    """The eval texts' n-grams: per text its set, per n-gram (and bigram) the texts that contain it."""

    texts: list[EvalText]
    grams: list[set[tuple[str, ...]]]
    postings: dict[tuple[str, ...], list[int]]
    n: int

    @classmethod
    def build(cls, texts: Sequence[EvalText], n: int) -> EvalIndex:
        first: dict[str, EvalText] = {}
        for t in texts:
            if t.text and t.text.strip():
                first.setdefault(t.text, t)  # a text in several places is reported where it comes first
        unique = list(first.values())
        grams = [ngrams(t.text, n) for t in unique]
        postings: dict[tuple[str, ...], list[int]] = {}
        for i, t in enumerate(unique):
            keys = grams[i] | (ngrams(t.text, 2) if n != 2 else set())
            for gram in keys:
                postings.setdefault(gram, []).append(i)
        return cls(unique, grams, postings, n)

    def candidates(self, text: str) -> set[int]:
        found: set[int] = set()
        keys = ngrams(text, self.n) | (ngrams(text, 2) if self.n != 2 else set())
        for gram in keys:
            hits = self.postings.get(gram)
            if hits is not None and len(hits) <= MAX_POSTINGS:
                found.update(hits)
        return found


@dataclass(frozen=True)
class Match:
    field: str
    eval_id: int
    how: str  # "ngram overlap 0.83" or "cosine 0.93"


def find_matches(table: pa.Table, index: EvalIndex, cfg: CleanSettings, encode: Encode | None) -> dict[int, Match]:
    """Row position → its first match (query before positive; n-gram overlap before embedding)."""
    found: dict[int, Match] = {}
    pending: list[tuple[int, str, str, int]] = []  # (row, field, text, eval id) for the embedding check
    for field in FIELDS:
        for row, text in enumerate(table[field].to_pylist()):
            if row in found or not text:
                continue
            grams = ngrams(text, index.n)
            scored = []  # (overlap, shared n-grams, eval id): the best first, the longest eval text on ties
            for eval_id in index.candidates(text):
                eval_grams = index.grams[eval_id]
                shared = len(eval_grams & grams)
                scored.append((shared / len(eval_grams) if eval_grams else 0.0, shared, -eval_id))
            scored.sort(reverse=True)
            if scored and scored[0][0] >= cfg.decontaminate_overlap:
                found[row] = Match(field, -scored[0][2], f"ngram overlap {scored[0][0]:.2f}")
                continue
            by_shared = sorted(scored, key=lambda s: (-s[1], -s[2]))[:EMBED_CANDIDATES]
            pending += [(row, field, text, -neg_id) for _overlap, _shared, neg_id in by_shared]
    if encode is None or cfg.decontaminate_similarity is None:
        return found
    pending = [p for p in pending if p[0] not in found]
    if not pending:
        return found
    texts = list(dict.fromkeys([p[2] for p in pending] + [index.texts[p[3]].text for p in pending]))
    position = {text: i for i, text in enumerate(texts)}
    vectors = np.asarray(encode(texts), dtype=np.float32)
    left = vectors[[position[p[2]] for p in pending]]
    right = vectors[[position[index.texts[p[3]].text] for p in pending]]
    cosines = np.einsum("ij,ij->i", left, right)
    for (row, field, _text, eval_id), cosine in zip(pending, cosines.tolist(), strict=True):
        if row not in found and cosine >= cfg.decontaminate_similarity:
            found[row] = Match(field, eval_id, f"cosine {cosine:.2f}")
    return found


class Decontaminate(Filter):
    """Drop rows whose query or positive nears an eval text (reason ``contaminated``)."""

    name = STAGE

    def __init__(self, eval_texts: Sequence[EvalText], cfg: CleanSettings, encode: Encode | None = None):
        self.cfg, self.encode = cfg, encode
        self.index = EvalIndex.build(eval_texts, cfg.decontaminate_ngram) if eval_texts else None

    def drops(self, rows: pa.Table) -> Drops:
        found = find_matches(rows, self.index, self.cfg, self.encode) if self.index and rows.num_rows else {}
        details = []
        for row in sorted(found):
            match, source = found[row], self.index.texts[found[row].eval_id]
            details.append(f"{match.field} matches {source.source} row {source.row} ({match.how})")
        return Drops(sorted(found), REASON, details)


def decontaminate(
    table: pa.Table, eval_texts: Sequence[EvalText], cfg: CleanSettings, encode: Encode | None = None
) -> StageResult:
    """Rows kept, and rows whose query or positive nears an eval text (reason ``contaminated``)."""
    return Decontaminate(eval_texts, cfg, encode).run(table)
