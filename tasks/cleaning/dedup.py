"""Exact and near-duplicate removal for generated examples, and instruction clustering for reports.

Generated data repeats itself: a model asked many times for "a query about X" answers with the same
query, or with the same document under a reworded query. Duplicates waste training steps and, worse,
become false negatives in the in-batch softmax (two rows of one batch with the same positive). This
module removes them in two passes, both keyed on the *normalized* text (:func:`dedup_keys`:
NFKC, casefold, punctuation and symbols removed, whitespace collapsed):

* :func:`exact_dedup` (DuckDB over the Arrow table): a row whose normalized query equals an earlier
  row's within its task type goes (``duplicate_query``); then, among the rows left, a row whose
  normalized positive equals an earlier row's goes (``duplicate_positive``), for the task types whose
  positive is a document (:data:`DOC_POSITIVE_TYPES`; classification positives are labels that
  repeat by design).
* :func:`near_dedup` (MinHash LSH from ``rensa``): character shingles of the normalized text; LSH
  candidates are verified by their estimated Jaccard similarity (>= ``near_dup_threshold``) and joined
  into clusters (union-find). Queries of at least :data:`NEAR_MIN_CHARS` characters within each task
  type (``near_duplicate_query``), then positive documents of :data:`NEAR_POSITIVE_TYPES`
  (``near_duplicate_positive``) among the rows left.

"Earlier" is the order of ``example_id`` (ties: input position), so each cluster keeps its smallest
``example_id`` whatever the input order, and every dropped row names that representative in its
``detail``. Both passes compare within one task type only: the same text in two task types serves
two different tasks. Kept tables keep the input schema and the input row order.
:func:`instruction_clusters` applies the same rule to the instruction table for reporting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rensa import RMinHash, RMinHashLSH

from ground.settings import CleanSettings
from storage.corpus import Drops, StageResult

#: task types whose positive is a document, so an equal positive is a duplicate (not classification)
DOC_POSITIVE_TYPES: tuple[str, ...] = ("retrieval", "long_long", "short_short", "sts", "bitext")
#: task types whose positive documents are near-deduplicated (long documents)
NEAR_POSITIVE_TYPES: tuple[str, ...] = ("retrieval", "long_long")
#: normalized texts shorter than this are left to exact dedup (a few shingles say nothing)
NEAR_MIN_CHARS = 20
#: MinHash seed; fixed, so results do not depend on anything but the data and the settings
MINHASH_SEED = 20240501
#: texts shingled and sketched per batch (bounds the memory the shingle lists take)
SKETCH_BATCH = 2048
#: lower bound on the probability that a pair at the threshold becomes an LSH candidate
LSH_RECALL_AT_THRESHOLD = 0.99

STAGE_EXACT = "dedup_exact"
STAGE_NEAR = "dedup_near"


# --------------------------------------------------------------------------- normalization


def dedup_keys(values: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> pa.Array:
    """The key each text is deduplicated on: NFKC, casefold, every run of punctuation, symbols and
    whitespace -> one space, trimmed; nulls stay null. Exact dedup, near dedup and validate's equality
    and leak checks compare these.

    ``"Hello,   WORLD!"`` and ``"hello world"`` get the same key; so do full-width and ASCII letters.
    (Brainstormed instructions have their own, gentler key: ``tasks.generation.brainstorm.instruction_key``.)
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    elif not isinstance(values, pa.Array):
        values = pa.array(list(values), type=pa.string())
    values = values.cast(pa.string())
    nfkc = pc.utf8_normalize(values, form="NFKC")
    # str.casefold is full Unicode case folding (ß -> ss), which Arrow's utf8_lower is not
    folded = pa.array([None if s is None else s.casefold() for s in nfkc.to_pylist()], type=pa.string())
    spaced = pc.replace_substring_regex(folded, pattern=r"[\p{P}\p{S}\s]+", replacement=" ")
    return pc.utf8_trim_whitespace(spaced)


def dedup_key(text: str | None) -> str | None:
    """:func:`dedup_keys` of one string."""
    return dedup_keys([text])[0].as_py()


# --------------------------------------------------------------------------- helpers


def _split(
    table: pa.Table, drop_rows: np.ndarray, stage: str, reasons: Sequence[str], details: Sequence[str]
) -> StageResult:
    """Kept rows (input order) and the dropped rows, ordered by input position."""
    return StageResult.split(table, stage, Drops(drop_rows, reasons, details))


def _sort_order(example_ids: Sequence[Any]) -> np.ndarray:
    """Positions sorted by example_id (nulls last), ties by position: the "earlier" order."""
    keyed = [("\U0010ffff" * 2 if e is None else e, i) for i, e in enumerate(example_ids)]
    return np.array([i for _, i in sorted(keyed)], dtype=np.int64)


# --------------------------------------------------------------------------- exact


_EXACT_SQL = """
WITH k AS (
    SELECT row_idx, example_id, task_type,
           CASE WHEN qn <> '' THEN md5(qn) END AS qh,
           CASE WHEN pn <> '' AND task_type IN ({doc_types}) THEN md5(pn) END AS ph
    FROM rows
),
q AS (
    SELECT row_idx,
           first_value(example_id) OVER w AS rep,
           row_number() OVER w AS rn
    FROM k WHERE qh IS NOT NULL
    WINDOW w AS (PARTITION BY task_type, qh ORDER BY example_id NULLS LAST, row_idx)
),
q_dup AS (SELECT row_idx, rep FROM q WHERE rn > 1),
p AS (
    SELECT row_idx,
           first_value(example_id) OVER w AS rep,
           row_number() OVER w AS rn
    FROM k
    WHERE ph IS NOT NULL AND row_idx NOT IN (SELECT row_idx FROM q_dup)
    WINDOW w AS (PARTITION BY task_type, ph ORDER BY example_id NULLS LAST, row_idx)
)
SELECT row_idx, 'duplicate_query' AS reason, rep FROM q_dup
UNION ALL
SELECT row_idx, 'duplicate_positive' AS reason, rep FROM p WHERE rn > 1
ORDER BY row_idx
"""


def exact_dedup(table: pa.Table) -> StageResult:
    """Drop rows whose normalized query (any type) or positive (document types) repeats an earlier row's.

    Queries first; positives are compared among the rows the query pass kept, so a row is never
    dropped in favour of a row that is itself gone. Runs in DuckDB on the Arrow table.
    """
    keys = pa.table(
        {
            "row_idx": pa.array(np.arange(table.num_rows, dtype=np.int64)),
            "example_id": table.column("example_id"),
            "task_type": table.column("task_type"),
            "qn": dedup_keys(table.column("query")),
            "pn": dedup_keys(table.column("positive")),
        }
    )
    doc_types = ", ".join(f"'{t}'" for t in DOC_POSITIVE_TYPES)
    con = duckdb.connect()
    try:
        con.register("rows", keys)
        found = con.sql(_EXACT_SQL.format(doc_types=doc_types)).to_arrow_table()
    finally:
        con.close()
    rows = np.asarray(found.column("row_idx").to_numpy(), dtype=np.int64)
    reasons = found.column("reason").to_pylist()
    field = {"duplicate_query": "query", "duplicate_positive": "positive"}
    details = [
        f"same normalized {field[r]} as {rep}" for r, rep in zip(reasons, found.column("rep").to_pylist(), strict=True)
    ]
    return _split(table, rows, STAGE_EXACT, reasons, details)


# --------------------------------------------------------------------------- near


def lsh_bands(num_perm: int, threshold: float, recall: float = LSH_RECALL_AT_THRESHOLD) -> int:
    """The fewest LSH bands (a divisor of ``num_perm``) that make a pair at ``threshold`` a candidate
    with probability >= ``recall``: fewer bands mean fewer false candidates to verify."""
    divisors = [b for b in range(1, num_perm + 1) if num_perm % b == 0]
    for bands in divisors:
        rows = num_perm // bands
        if 1.0 - (1.0 - threshold**rows) ** bands >= recall:
            return bands
    return num_perm


class _UnionFind:
    """Union-find whose root is always the smallest member (members are positions in sorted order)."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


def _shingles(text: str, k: int) -> list[str]:
    if len(text) <= k:
        return [text]
    return [text[i : i + k] for i in range(len(text) - k + 1)]


def _sketches(texts: Sequence[str], cfg: CleanSettings) -> list[RMinHash]:
    out: list[RMinHash] = []
    for start in range(0, len(texts), SKETCH_BATCH):
        batch = [_shingles(t, cfg.shingle_size) for t in texts[start : start + SKETCH_BATCH]]
        out.extend(RMinHash.from_token_sets(batch, num_perm=cfg.minhash_num_perm, seed=MINHASH_SEED))
    return out


def near_clusters(texts: Sequence[str], cfg: CleanSettings) -> list[int]:
    """For texts already in "earlier first" order: each text's cluster representative (smallest position).

    MinHash over character shingles, LSH candidates, each candidate pair verified by its estimated
    Jaccard similarity >= ``cfg.near_dup_threshold``, verified pairs joined transitively.
    """
    n = len(texts)
    if n < 2:
        return list(range(n))
    sketches = _sketches(texts, cfg)
    bands = lsh_bands(cfg.minhash_num_perm, cfg.near_dup_threshold)
    lsh = RMinHashLSH(cfg.near_dup_threshold, cfg.minhash_num_perm, bands)
    lsh.insert_many(sketches)
    uf = _UnionFind(n)
    find, threshold = uf.find, cfg.near_dup_threshold
    for i, candidates in enumerate(lsh.query_all(sketches)):
        if len(candidates) < 2:
            continue
        sketch = sketches[i]
        for j in candidates:
            # pairs already joined need no verification (cost stays low inside big clusters)
            if j > i and find(i) != find(j) and sketch.jaccard(sketches[j]) >= threshold:
                uf.union(i, j)
    return [find(i) for i in range(n)]


def _near_pass(
    example_ids: list, task_types: list, texts: list, candidates: np.ndarray, cfg: CleanSettings
) -> dict[int, int]:
    """{dropped row: representative row} among ``candidates`` (positions), per task type."""
    dropped: dict[int, int] = {}
    by_type: dict[str, list[int]] = {}
    for i in candidates:
        by_type.setdefault(task_types[i], []).append(int(i))
    for task_type in sorted(by_type, key=str):
        rows = by_type[task_type]
        order = _sort_order([example_ids[i] for i in rows])
        rows = [rows[j] for j in order]
        reps = near_clusters([texts[i] for i in rows], cfg)
        for pos, rep in enumerate(reps):
            if rep != pos:
                dropped[rows[pos]] = rows[rep]
    return dropped


def near_dedup(table: pa.Table, cfg: CleanSettings) -> StageResult:
    """Drop near-duplicate queries (per task type), then near-duplicate positive documents
    (retrieval, long_long) among the rows left; each cluster keeps its smallest example_id."""
    n = table.num_rows
    example_ids = table.column("example_id").to_pylist()
    task_types = table.column("task_type").to_pylist()
    qn = dedup_keys(table.column("query"))
    pn = dedup_keys(table.column("positive"))
    q_len = pc.fill_null(pc.utf8_length(qn), 0).to_numpy(zero_copy_only=False)
    p_len = pc.fill_null(pc.utf8_length(pn), 0).to_numpy(zero_copy_only=False)

    q_texts = qn.to_pylist()
    q_dropped = _near_pass(example_ids, task_types, q_texts, np.flatnonzero(q_len >= NEAR_MIN_CHARS), cfg)

    alive = np.ones(n, dtype=bool)
    alive[list(q_dropped)] = False
    is_doc = pc.is_in(table.column("task_type"), value_set=pa.array(NEAR_POSITIVE_TYPES)).to_numpy(zero_copy_only=False)
    p_candidates = np.flatnonzero(alive & is_doc & (p_len >= NEAR_MIN_CHARS))
    p_texts = pn.to_pylist()
    p_dropped = _near_pass(example_ids, task_types, p_texts, p_candidates, cfg)

    rows, reasons, details = [], [], []
    for dropped, reason, field in (
        (q_dropped, "near_duplicate_query", "query"),
        (p_dropped, "near_duplicate_positive", "positive"),
    ):
        for row, rep in dropped.items():
            rows.append(row)
            reasons.append(reason)
            details.append(f"{field} near-duplicate of {example_ids[rep]} (Jaccard >= {cfg.near_dup_threshold:g})")
    return _split(table, np.array(rows, dtype=np.int64), STAGE_NEAR, reasons, details)


_ROW = "__row"  # input position, carried through the parts of a split


def split_by_task_type(table: pa.Table) -> dict[str, pa.Table]:
    """The rows of each task type (sorted), tagged with their input position. Both passes of
    :func:`near_dedup` compare within one task type only, so the parts can run in parallel
    (:func:`near_dedup_part`, mapped over the clean flow's task runner) and :func:`merge_near_parts`
    puts the results back together."""
    tagged = table.append_column(_ROW, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    types = sorted(set(table.column("task_type").to_pylist()), key=str)
    return {t: tagged.filter(pc.equal(tagged.column("task_type"), t)) for t in types}


def near_dedup_part(part: pa.Table, cfg: CleanSettings) -> StageResult:
    """:func:`near_dedup` of one part of :func:`split_by_task_type`; its dropped rows keep their position too."""
    result = near_dedup(part, cfg)
    kept_rows = set(result.kept.column(_ROW).to_pylist())
    # dropped rows come in input order, so their positions are the part's positions not kept, ascending
    dropped_rows = [r for r in part.column(_ROW).to_pylist() if r not in kept_rows]
    return StageResult(kept=result.kept, dropped=result.dropped.append_column(_ROW, pa.array(dropped_rows, pa.int64())))


def merge_near_parts(table: pa.Table, parts: Sequence[StageResult]) -> StageResult:
    """The :func:`near_dedup_part` results merged into exactly what ``near_dedup(table)`` returns."""
    if not parts:
        return StageResult.keep_all(table)
    kept = pa.concat_tables([p.kept for p in parts]).sort_by(_ROW).drop_columns([_ROW])
    dropped = pa.concat_tables([p.dropped for p in parts]).sort_by(_ROW).drop_columns([_ROW])
    return StageResult(kept=kept, dropped=dropped)


# --------------------------------------------------------------------------- instructions


def instruction_clusters(instructions: pa.Table, cfg: CleanSettings) -> dict[str, str]:
    """Map every ``instruction_id`` to its cluster representative (smallest instruction_id) within its
    task type: equal normalized text, or near-duplicates by the same MinHash rule as :func:`near_dedup`.
    The number of distinct values is the number of unique instructions."""
    ids = instructions.column("instruction_id").to_pylist()
    types = instructions.column("task_type").to_pylist()
    texts = dedup_keys(instructions.column("instruction")).to_pylist()
    result: dict[str, str] = {}
    by_type: dict[str, list[int]] = {}
    for i, t in enumerate(types):
        by_type.setdefault(t, []).append(i)
    for task_type in sorted(by_type, key=str):
        rows = by_type[task_type]
        rows = [rows[j] for j in _sort_order([ids[i] for i in rows])]
        uf = _UnionFind(len(rows))
        first_with_text: dict[str, int] = {}
        for pos, i in enumerate(rows):
            text = texts[i] or ""
            if text in first_with_text:
                uf.union(first_with_text[text], pos)
            else:
                first_with_text[text] = pos
        long_pos = [pos for pos, i in enumerate(rows) if len(texts[i] or "") >= NEAR_MIN_CHARS]
        reps = near_clusters([texts[rows[pos]] for pos in long_pos], cfg)
        for local, rep in enumerate(reps):
            uf.union(long_pos[local], long_pos[rep])
        for pos, i in enumerate(rows):
            result[ids[i]] = ids[rows[uf.find(pos)]]
    return result
