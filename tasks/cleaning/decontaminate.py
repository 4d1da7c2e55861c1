"""Decontamination: drop rows whose query or positive is a near duplicate of an evaluation text.

Input: the deduped rows and the evaluation texts as ``EvalText(source, row, text)`` (where they come
from is the caller's business: ``flows/eval_texts.py`` gathers the STS Benchmark test splits and the
files and Hub datasets listed in ``clean.decontaminate_*``). A match needs evidence, not a common phrase:

1. **candidates**: an eval text is a candidate for a row's text when they share a word bigram or
   ``clean.decontaminate_ngram``-gram that at most :data:`MAX_POSTINGS` eval texts contain (common
   phrases such as "a man is" find no candidates on their own); one hash-set lookup per n-gram.
2. **n-gram evidence**, by the eval text's length in words (m):

   * m < :data:`MIN_EVAL_WORDS` (e.g. "Yes, it is."): only a row text of the same words matches;
   * fewer than :data:`MIN_SHARED_NGRAMS` n-grams (m <= n + 2, e.g. "There is no maximum."): the row must
     contain the whole eval text, word for word in order (containment), not just some of its n-grams;
   * otherwise at least ``clean.decontaminate_overlap`` of the eval text's n-grams and at least
     :data:`MIN_SHARED_NGRAMS` of them, all within one window of :data:`WINDOW_FACTOR` x m words of the
     row: the eval text in one place, not its common trigrams scattered over a 400-word document.
     Long eval texts (m >= :data:`LONG_EVAL_WORDS`) compare :data:`LONG_NGRAM`-grams, the 13-gram rule
     of the large-model reports (GPT-3, PaLM), where one shared n-gram is already rare by chance.
3. **embedding similarity**: otherwise, the cosine of the two texts (``encode``: the clean run's
   embedder with its cache) at or above ``clean.decontaminate_similarity``; only the texts of
   candidate pairs are embedded (each distinct text once; ``encode`` may return a memory-mapped
   matrix), and the pairs, int32 index arrays, are scored in blocks of :data:`PAIR_BLOCK`.

A paraphrase that shares no bigram with the eval text is not caught (the price of not embedding every
eval text). Dropped rows get stage ``decontaminate``, reason ``contaminated`` and the matched source
and row in the detail.
"""

from __future__ import annotations

import math
import re
from array import array
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
#: an eval text of fewer words matches only a row text of the same words
MIN_EVAL_WORDS = 4
#: a match shares at least this many n-grams; an eval text with fewer must be contained whole
MIN_SHARED_NGRAMS = 4
#: the shared n-grams lie within this many times the eval text's words of the row
WINDOW_FACTOR = 2
#: eval texts of at least this many words compare LONG_NGRAM-grams
LONG_EVAL_WORDS = 40
LONG_NGRAM = 13
#: candidate pairs scored at a time (two gathered blocks of PAIR_BLOCK x dim floats)
PAIR_BLOCK = 8192

Encode = Callable[[list[str]], np.ndarray]
_WORD = re.compile(r"\w+")


class EvalText(NamedTuple):
    """One evaluation text: where it comes from (e.g. ``stsb-en-test``), its row there, the text."""

    source: str
    row: int
    text: str


def words_of(text: str) -> list[str]:
    """Casefolded words."""
    return _WORD.findall(text.casefold())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Casefolded word n-grams; a text of fewer than ``n`` words is one gram of all its words."""
    return grams_of(words_of(text), n)


def grams_of(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def gram_positions(words: Sequence[str], n: int) -> dict[tuple[str, ...], list[int]]:
    """Where each n-gram of ``words`` starts."""
    found: dict[tuple[str, ...], list[int]] = {}
    for i in range(max(1, len(words) - n + 1)):
        found.setdefault(tuple(words[i : i + n]), []).append(i)
    return found


@dataclass(frozen=True)
class EvalEvidence:
    """How one eval text is matched: its words, the n of its n-grams, its n-grams, the rule."""

    words: tuple[str, ...]
    n: int
    grams: frozenset[tuple[str, ...]]

    @classmethod
    def of(cls, text: str, n: int) -> EvalEvidence:
        words = tuple(words_of(text))
        n = LONG_NGRAM if len(words) >= LONG_EVAL_WORDS else n
        return cls(words, n, frozenset(grams_of(words, n)))

    @property
    def rule(self) -> str:
        if len(self.words) < MIN_EVAL_WORDS:
            return "same words"
        return "contained" if len(self.grams) < MIN_SHARED_NGRAMS else "ngrams"

    def needed(self, overlap: float) -> int:
        """Shared n-grams a match needs (the ``ngrams`` rule)."""
        return max(MIN_SHARED_NGRAMS, math.ceil(overlap * len(self.grams) - 1e-9))


class RowText:
    """A row's text with its words and n-gram positions, computed once per n."""

    def __init__(self, text: str):
        self.words = words_of(text)
        self._positions: dict[int, dict[tuple[str, ...], list[int]]] = {}

    def positions(self, n: int) -> dict[tuple[str, ...], list[int]]:
        if n not in self._positions:
            self._positions[n] = gram_positions(self.words, n)
        return self._positions[n]

    def contains(self, words: Sequence[str]) -> bool:
        k = len(words)
        starts = self.positions(min(k, 3)).get(tuple(words[:3]), []) if k else []
        return any(tuple(self.words[i : i + k]) == tuple(words) for i in starts)


def evidence(row: RowText, ev: EvalEvidence, overlap: float) -> tuple[bool, float, int]:
    """(match, share of the eval text's n-grams in the row, shared n-grams) under ``ev``'s rule."""
    positions = row.positions(ev.n)
    shared = [g for g in ev.grams if g in positions]
    share = len(shared) / len(ev.grams) if ev.grams else 0.0
    if ev.rule == "same words":
        return tuple(row.words) == ev.words, share, len(shared)
    if ev.rule == "contained":
        return len(shared) == len(ev.grams) and row.contains(ev.words), share, len(shared)
    needed = ev.needed(overlap)
    if len(shared) < needed:
        return False, share, len(shared)
    # the needed shared n-grams within one window of the row
    starts = sorted(p for g in shared for p in positions[g][:1])
    window = WINDOW_FACTOR * len(ev.words)
    local = any(starts[i + needed - 1] - starts[i] <= window for i in range(len(starts) - needed + 1))
    return local, share, len(shared)


@dataclass
class EvalIndex:
    """The eval texts' n-grams: per text its set, per n-gram (and bigram) the texts that contain it."""

    texts: list[EvalText]
    evidence: list[EvalEvidence]
    postings: dict[tuple[str, ...], list[int]]
    n: int

    @classmethod
    def build(cls, texts: Sequence[EvalText], n: int) -> EvalIndex:
        first: dict[str, EvalText] = {}
        for t in texts:
            if t.text and t.text.strip():
                first.setdefault(t.text, t)  # a text in several places is reported where it comes first
        unique = list(first.values())
        evidence = [EvalEvidence.of(t.text, n) for t in unique]
        postings: dict[tuple[str, ...], list[int]] = {}
        for i, ev in enumerate(evidence):
            keys = grams_of(ev.words, n) | (grams_of(ev.words, 2) if n != 2 else set())
            for gram in keys:
                postings.setdefault(gram, []).append(i)
        return cls(unique, evidence, postings, n)

    def candidates(self, row: RowText) -> set[int]:
        found: set[int] = set()
        keys = set(row.positions(self.n)) | (set(row.positions(2)) if self.n != 2 else set())
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


class Pending:
    """Candidate pairs for the embedding check: int32 columns of row, field and eval id, and the row text."""

    def __init__(self):
        self.rows, self.fields, self.evals = array("i"), array("i"), array("i")
        self.texts: list[str] = []  # references to the table's strings

    def add(self, row: int, field: int, text: str, eval_id: int) -> None:
        self.rows.append(row)
        self.fields.append(field)
        self.evals.append(eval_id)
        self.texts.append(text)

    def pairs(self, index: EvalIndex, done: set[int]) -> tuple[list[str], *tuple[np.ndarray, ...]]:
        """(distinct texts to embed, rows, fields, eval ids, left and right text ids) of the pairs whose row
        is not in ``done``; the texts: the row texts, then the eval texts, each once."""
        rows = np.frombuffer(self.rows, dtype=np.int32)
        keep = np.flatnonzero(~np.isin(rows, np.fromiter(done, np.int64, len(done))))
        evals = np.frombuffer(self.evals, dtype=np.int32)[keep]
        text_id: dict[str, int] = {}
        left = [text_id.setdefault(self.texts[i], len(text_id)) for i in keep.tolist()]
        right = [text_id.setdefault(index.texts[e].text, len(text_id)) for e in evals.tolist()]
        fields = np.frombuffer(self.fields, dtype=np.int32)[keep]
        ids = np.array(left, np.int32), np.array(right, np.int32)
        return list(text_id), rows[keep], fields, evals, *ids


def find_matches(table: pa.Table, index: EvalIndex, cfg: CleanSettings, encode: Encode | None) -> dict[int, Match]:
    """Row position → its first match (query before positive; n-gram overlap before embedding)."""
    found: dict[int, Match] = {}
    pending = Pending()
    for field_id, field in enumerate(FIELDS):
        for row, text in enumerate(table[field].to_pylist()):
            if row in found or not text:
                continue
            row_text = RowText(text)
            scored = []  # (match, overlap, shared n-grams, eval id): matches first, the best overlap first
            for eval_id in index.candidates(row_text):
                match, share, shared = evidence(row_text, index.evidence[eval_id], cfg.decontaminate_overlap)
                scored.append((match, share, shared, -eval_id))
            scored.sort(reverse=True)
            if scored and scored[0][0]:
                ev = index.evidence[-scored[0][3]]
                how = f"ngram overlap {scored[0][1]:.2f}, {scored[0][2]} {ev.n}-grams"
                found[row] = Match(field, -scored[0][3], how if ev.rule == "ngrams" else f"{ev.rule}, {how}")
                continue
            for _match, _overlap, _shared, neg_id in sorted(scored, key=lambda s: (-s[2], -s[3]))[:EMBED_CANDIDATES]:
                pending.add(row, field_id, text, -neg_id)
    if encode is None or cfg.decontaminate_similarity is None:
        return found
    texts, rows, fields, eval_ids, left, right = pending.pairs(index, set(found))
    if not texts:
        return found
    vectors = np.asarray(encode(texts), dtype=np.float32)  # may be memory-mapped
    cosines = pair_cosines(vectors, left, right)
    for i in np.flatnonzero(cosines.astype(np.float64) >= cfg.decontaminate_similarity).tolist():
        row = int(rows[i])
        if row not in found:
            found[row] = Match(FIELDS[fields[i]], int(eval_ids[i]), f"cosine {float(cosines[i]):.2f}")
    return found


def pair_cosines(vectors: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``vectors[left[i]] · vectors[right[i]]`` for each pair, gathered and multiplied in blocks of pairs."""
    out, block = np.empty(len(left), dtype=np.float32), PAIR_BLOCK
    for start in range(0, len(left), block):
        end = start + block
        out[start:end] = np.einsum("ij,ij->i", vectors[left[start:end]], vectors[right[start:end]])
    return out


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
