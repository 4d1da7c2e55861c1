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
* :func:`near_dedup` (MinHash LSH, :mod:`tasks.cleaning.dedup_near`): character shingles of the
  normalized text; LSH candidates are verified by their estimated Jaccard similarity
  (>= ``near_dup_threshold``) and joined into clusters (connected components). Queries of at
  least :data:`NEAR_MIN_CHARS` characters within each task type (``near_duplicate_query``), then
  positive documents of :data:`NEAR_POSITIVE_TYPES` (``near_duplicate_positive``) among the rows left.

"Earlier" is the order of ``example_id`` (ties: input position), so each cluster keeps its smallest
``example_id`` whatever the input order, and every dropped row names that representative in its
``detail``. Both passes compare within one task type only: the same text in two task types serves
two different tasks. Kept tables keep the input schema and the input row order. :func:`near_duplicates` decides near
dedup from four columns alone and returns positions, for callers that stream the other columns.
:func:`instruction_clusters` applies the same rule to the instruction table for reporting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ground.settings import CleanSettings
from storage.corpus import Drops, StageResult
from tasks.cleaning.dedup_near import join, near_clusters

#: task types whose positive is a document, so an equal positive is a duplicate (not classification)
DOC_POSITIVE_TYPES: tuple[str, ...] = ("retrieval", "long_long", "short_short", "sts", "bitext")
#: task types whose positive documents are near-deduplicated (long documents)
NEAR_POSITIVE_TYPES: tuple[str, ...] = ("retrieval", "long_long")
#: normalized texts shorter than this are left to exact dedup (a few shingles say nothing)
NEAR_MIN_CHARS = 20
#: texts case-folded per batch in :func:`dedup_keys`
KEY_BATCH = 8192

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
    folded = pa.concat_arrays([pa.array([], pa.string()), *_casefolded(nfkc)])
    spaced = pc.replace_substring_regex(folded, pattern=r"[\p{P}\p{S}\s]+", replacement=" ")
    return pc.utf8_trim_whitespace(spaced)


def _casefolded(values: pa.Array):
    """``str.casefold`` (full Unicode case folding, ß -> ss, which Arrow's utf8_lower is not) of the
    values, :data:`KEY_BATCH` at a time, so the Python strings of a whole column never exist at once."""
    for start in range(0, len(values), KEY_BATCH):
        texts = values.slice(start, KEY_BATCH).to_pylist()
        yield pa.array([None if s is None else s.casefold() for s in texts], pa.string())


def dedup_key(text: str | None) -> str | None:
    """:func:`dedup_keys` of one string."""
    return dedup_keys([text])[0].as_py()


# --------------------------------------------------------------------------- helpers


def _split(
    table: pa.Table, drop_rows: np.ndarray, stage: str, reasons: Sequence[str], details: Sequence[str]
) -> StageResult:
    """Kept rows (input order) and the dropped rows, ordered by input position."""
    return StageResult.split(table, stage, Drops(drop_rows, reasons, details))


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


class NearDrops(NamedTuple):
    """What near dedup decides, as positions in its input: the dropped rows (ascending), whether each
    went for its positive (else its query), and the row it near-duplicates (its cluster's representative)."""

    rows: np.ndarray
    positive: np.ndarray
    reps: np.ndarray


def _earlier_ranks(example_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Each row's rank in the "earlier" order: example_id ascending (nulls last), ties by position."""
    n = len(example_ids)
    keyed = pa.table({"id": example_ids, "pos": pa.array(np.arange(n, dtype=np.int64))})
    order = pc.sort_indices(keyed, sort_keys=[("id", "ascending"), ("pos", "ascending")])  # nulls at the end
    ranks = np.empty(n, dtype=np.int64)
    ranks[order.to_numpy()] = np.arange(n, dtype=np.int64)
    return ranks


def _type_codes(task_types: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """One integer per task type (null is a type of its own), for grouping rows by type."""
    if isinstance(task_types, pa.ChunkedArray):
        task_types = task_types.combine_chunks()
    codes = pc.dictionary_encode(task_types).indices
    return pc.fill_null(codes, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _near_pass(
    codes: np.ndarray, ranks: np.ndarray, keys: pa.Array, eligible: np.ndarray, cfg: CleanSettings
) -> np.ndarray:
    """Each row's representative row (-1 where it is its own or not ``eligible``), per task type."""
    reps = np.full(len(codes), -1, dtype=np.int64)
    for code in np.unique(codes[eligible]):
        rows = np.flatnonzero(eligible & (codes == code))
        rows = rows[np.argsort(ranks[rows], kind="stable")]
        labels = near_clusters(
            keys.take(pa.array(rows)), cfg.minhash_num_perm, cfg.shingle_size, cfg.near_dup_threshold
        )
        moved = labels != np.arange(len(rows))
        reps[rows[moved]] = rows[labels[moved]]
    return reps


def near_duplicates(
    example_ids: pa.Array | pa.ChunkedArray,
    task_types: pa.Array | pa.ChunkedArray,
    queries: pa.Array | pa.ChunkedArray,
    positives: pa.Array | pa.ChunkedArray,
    cfg: CleanSettings,
) -> NearDrops:
    """Near dedup decided from four columns alone: near-duplicate queries (per task type), then
    near-duplicate positive documents (retrieval, long_long) among the rows left; each cluster keeps
    its smallest example_id. Texts are normalized and sketched in batches; the rest are numpy arrays."""
    codes, ranks = _type_codes(task_types), _earlier_ranks(example_ids)
    qn = dedup_keys(queries)
    q_len = pc.fill_null(pc.utf8_length(qn), 0).to_numpy(zero_copy_only=False)
    q_reps = _near_pass(codes, ranks, qn, q_len >= NEAR_MIN_CHARS, cfg)
    del qn
    pn = dedup_keys(positives)
    p_len = pc.fill_null(pc.utf8_length(pn), 0).to_numpy(zero_copy_only=False)
    is_doc = np.asarray(pc.is_in(task_types, pa.array(NEAR_POSITIVE_TYPES)).to_numpy(zero_copy_only=False), bool)
    p_reps = _near_pass(codes, ranks, pn, (q_reps < 0) & is_doc & (p_len >= NEAR_MIN_CHARS), cfg)
    reps = np.where(q_reps >= 0, q_reps, p_reps)
    rows = np.flatnonzero(reps >= 0)
    return NearDrops(rows, p_reps[rows] >= 0, reps[rows])


def _near_result(table: pa.Table, cfg: CleanSettings) -> tuple[StageResult, np.ndarray]:
    """:func:`near_dedup` and its dropped positions (ascending)."""
    ids = table.column("example_id")
    found = near_duplicates(ids, table.column("task_type"), table.column("query"), table.column("positive"), cfg)
    rep_ids = ids.take(pa.array(found.reps, type=pa.int64())).to_pylist()
    reasons = np.where(found.positive, "near_duplicate_positive", "near_duplicate_query").tolist()
    fields = np.where(found.positive, "positive", "query").tolist()
    thr = cfg.near_dup_threshold
    details = [f"{f} near-duplicate of {rep} (Jaccard >= {thr:g})" for f, rep in zip(fields, rep_ids, strict=True)]
    return _split(table, found.rows, STAGE_NEAR, reasons, details), found.rows


def near_dedup(table: pa.Table, cfg: CleanSettings) -> StageResult:
    """Drop near-duplicate queries (per task type), then near-duplicate positive documents
    (retrieval, long_long) among the rows left; each cluster keeps its smallest example_id."""
    return _near_result(table, cfg)[0]


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
    result, rows = _near_result(part, cfg)
    # dropped rows come in input order, as ``rows`` do
    dropped_rows = part.column(_ROW).take(pa.array(rows, type=pa.int64()))
    return StageResult(kept=result.kept, dropped=result.dropped.append_column(_ROW, dropped_rows))


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
    ids = instructions.column("instruction_id")
    keys = pc.fill_null(dedup_keys(instructions.column("instruction")), "")
    codes, ranks = _type_codes(instructions.column("task_type")), _earlier_ranks(ids)
    long_text = pc.utf8_length(keys).to_numpy(zero_copy_only=False) >= NEAR_MIN_CHARS
    reps = np.arange(len(codes), dtype=np.int64)
    for code in np.unique(codes):
        rows = np.flatnonzero(codes == code)
        rows = rows[np.argsort(ranks[rows], kind="stable")]  # local positions: the earlier order
        texts = keys.take(pa.array(rows))
        local = np.arange(len(rows), dtype=np.int64)
        # equal texts join the first row with that text; near-duplicates join their cluster's first row
        text_code = pc.dictionary_encode(texts).indices.to_numpy()
        first = np.full(len(rows), len(rows), dtype=np.int64)
        np.minimum.at(first, text_code, local)
        long_pos = np.flatnonzero(long_text[rows])
        near = near_clusters(
            texts.take(pa.array(long_pos)), cfg.minhash_num_perm, cfg.shingle_size, cfg.near_dup_threshold
        )
        left = np.concatenate([local, long_pos])
        right = np.concatenate([first[text_code], long_pos[near]])
        reps[rows] = rows[join(len(rows), left, right)]
    rep_ids = ids.take(pa.array(reps)).to_pylist()
    return dict(zip(ids.to_pylist(), rep_ids, strict=True))
