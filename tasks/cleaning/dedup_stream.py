"""Exact and near dedup decided from record batches, in memory that holds no text: the clean flow's dedup.

:func:`dedup_decisions` reads the rows once, batch by batch, and keeps per row only fixed-size facts:
its ids (``example_id``, ``run_id``, ``task_type``), the 16-byte digests of its normalized query and
positive (:func:`tasks.cleaning.dedup.dedup_keys`, the keys exact dedup groups on) and, for the rows near
dedup may compare, the MinHash signatures of those keys (:mod:`tasks.cleaning.dedup_minhash`). The
decisions are then those of :func:`~tasks.cleaning.dedup.exact_dedup` followed by
:func:`~tasks.cleaning.dedup.near_dedup` on the rows it kept (the same SQL, grouping on digests instead
of ``md5`` of the text; the same per-type passes on the same signatures), so the drops, their reasons and
details are theirs (a test compares them). Memory per row: ~100 bytes of ids, 2 digests, and
``minhash_num_perm`` uint32 values per long query and per long positive document.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from hashlib import blake2b

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ground.settings import CleanSettings
from storage.corpus import Drops, dropped_table
from tasks.cleaning.dedup import (
    _EXACT_SQL,
    DOC_POSITIVE_TYPES,
    NEAR_MIN_CHARS,
    NEAR_POSITIVE_TYPES,
    STAGE_EXACT,
    STAGE_NEAR,
    _earlier_ranks,
    _type_codes,
    dedup_keys,
)
from tasks.cleaning.dedup_minhash import signatures
from tasks.cleaning.dedup_near import clusters_of_signatures

#: the columns dedup reads (the ids its dropped rows carry, and the two texts it compares)
ID_COLUMNS = ("example_id", "run_id", "task_type")
DEDUP_COLUMNS = (*ID_COLUMNS, "query", "positive")


@dataclass
class _Signatures:
    """MinHash signatures of some rows: ``rows`` (positions, ascending) -> ``matrix`` rows."""

    rows: np.ndarray
    matrix: np.ndarray

    def of(self, rows: np.ndarray) -> np.ndarray:
        return self.matrix[np.searchsorted(self.rows, rows)]


def key_digests(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The 16-byte BLAKE2b of each key (``S16``; a null key: 16 zero bytes), for grouping equal keys."""
    texts = keys.to_pylist()
    return np.array([b"" if t is None else blake2b(t.encode(), digest_size=16).digest() for t in texts], "S16")


def _digests(keys: pa.Array, has: np.ndarray) -> pa.Array:
    """16-byte BLAKE2b of each key where ``has`` (else null): exact dedup's grouping key."""
    texts = keys.to_pylist()
    digests = [blake2b(t.encode(), digest_size=16).digest() if h else None for t, h in zip(texts, has, strict=True)]
    return pa.array(digests, pa.binary(16))


@dataclass
class DedupFacts:
    """What dedup decides from, for every row read (in order), without the texts."""

    ids: pa.Table  # ID_COLUMNS
    query_digest: pa.Array  # binary(16), null: empty normalized query
    positive_digest: pa.Array  # binary(16), null: empty normalized positive or not a document type
    query_long: np.ndarray  # bool: normalized query of >= NEAR_MIN_CHARS characters
    positive_long: np.ndarray  # bool: ... positive, and a NEAR_POSITIVE_TYPES row
    query_sigs: _Signatures
    positive_sigs: _Signatures

    @classmethod
    def of_batch(cls, batch: pa.Table, cfg: CleanSettings) -> DedupFacts:
        """The facts of one batch of rows (DEDUP_COLUMNS): independent of the other batches, so batches
        may be read on the flow's task runner, a few at a time, and :meth:`join`-ed in order."""
        schema = pa.schema([pa.field(n, pa.string()) for n in ID_COLUMNS])
        types = batch.column("task_type")
        found = {}
        for name, typed in (("query", None), ("positive", (DOC_POSITIVE_TYPES, NEAR_POSITIVE_TYPES))):
            keys = dedup_keys(batch.column(name))
            length = pc.fill_null(pc.utf8_length(keys), 0).to_numpy(zero_copy_only=False)
            has, long = length > 0, length >= NEAR_MIN_CHARS
            if typed is not None:
                has &= np.asarray(pc.is_in(types, pa.array(typed[0])).to_numpy(zero_copy_only=False), bool)
                long &= np.asarray(pc.is_in(types, pa.array(typed[1])).to_numpy(zero_copy_only=False), bool)
            rows = np.flatnonzero(long)
            matrix = signatures(keys.take(pa.array(rows)), cfg.minhash_num_perm, cfg.shingle_size)
            found[name] = (_digests(keys, has), long, _Signatures(rows, matrix))
        (q_digest, q_long, q_sigs), (p_digest, p_long, p_sigs) = found["query"], found["positive"]
        ids = batch.select(list(ID_COLUMNS)).cast(schema)
        return cls(ids, q_digest, p_digest, q_long, p_long, q_sigs, p_sigs)

    @classmethod
    def join(cls, parts: Iterable[DedupFacts], cfg: CleanSettings) -> DedupFacts:
        """The facts of consecutive batches as one (an empty iterable: no rows)."""
        parts = list(parts)
        if not parts:
            schema = pa.schema([pa.field(n, pa.string()) for n in ID_COLUMNS])
            nothing = _Signatures(np.zeros(0, np.int64), np.zeros((0, cfg.minhash_num_perm), np.uint32))
            empty = pa.array([], pa.binary(16))
            return cls(schema.empty_table(), empty, empty, np.zeros(0, bool), np.zeros(0, bool), nothing, nothing)
        offsets = np.cumsum([0] + [p.ids.num_rows for p in parts[:-1]])

        def sigs(name: str) -> _Signatures:
            """The parts' signatures in one matrix, each part's freed once copied (memory: the matrix once)."""
            got = [getattr(p, name) for p in parts]
            rows = np.concatenate([g.rows + o for g, o in zip(got, offsets, strict=True)])
            matrix = np.empty((len(rows), cfg.minhash_num_perm), np.uint32)
            at = 0
            for g in got:
                matrix[at : at + len(g.matrix)] = g.matrix
                at += len(g.matrix)
                g.matrix = g.matrix[:0]
            return _Signatures(rows, matrix)

        return cls(
            ids=pa.concat_tables([p.ids for p in parts]),
            query_digest=pa.concat_arrays([p.query_digest for p in parts]),
            positive_digest=pa.concat_arrays([p.positive_digest for p in parts]),
            query_long=np.concatenate([p.query_long for p in parts]),
            positive_long=np.concatenate([p.positive_long for p in parts]),
            query_sigs=sigs("query_sigs"),
            positive_sigs=sigs("positive_sigs"),
        )


def exact_drops(facts: DedupFacts) -> Drops:
    """:func:`tasks.cleaning.dedup.exact_dedup`'s drops, from the digests."""
    n = facts.ids.num_rows
    keys = pa.table(
        {
            "row_idx": pa.array(np.arange(n, dtype=np.int64)),
            "example_id": facts.ids.column("example_id"),
            "task_type": facts.ids.column("task_type"),
            "qh": facts.query_digest,
            "ph": facts.positive_digest,
        }
    )
    # the digests are null where the SQL's CASE gives null: the CASE sees them as they are
    sql = _EXACT_SQL.replace("CASE WHEN qn <> '' THEN md5(qn) END", "qh").replace(
        "CASE WHEN pn <> '' AND task_type IN ({doc_types}) THEN md5(pn) END", "ph"
    )
    con = duckdb.connect()
    try:
        con.register("rows", keys)
        found = con.sql(sql).to_arrow_table()
    finally:
        con.close()
    field = {"duplicate_query": "query", "duplicate_positive": "positive"}
    reasons = found.column("reason").to_pylist()
    reps = found.column("rep").to_pylist()
    details = [f"same normalized {field[r]} as {rep}" for r, rep in zip(reasons, reps, strict=True)]
    return Drops(np.asarray(found.column("row_idx").to_numpy(), dtype=np.int64), reasons, details)


def _near_pass(
    rows: np.ndarray, codes: np.ndarray, ranks: np.ndarray, eligible: np.ndarray, sigs: _Signatures, threshold: float
) -> np.ndarray:
    """Each of ``rows``' representative (a position in ``rows``; -1: its own or not eligible), per task type."""
    reps = np.full(len(rows), -1, dtype=np.int64)
    for code in np.unique(codes[eligible]):
        local = np.flatnonzero(eligible & (codes == code))
        local = local[np.argsort(ranks[local], kind="stable")]
        if len(local) < 2:
            continue
        labels = clusters_of_signatures(sigs.of(rows[local]), threshold)
        moved = labels != np.arange(len(local))
        reps[local[moved]] = local[labels[moved]]
    return reps


def near_drops(facts: DedupFacts, alive: np.ndarray, cfg: CleanSettings) -> Drops:
    """:func:`tasks.cleaning.dedup.near_dedup`'s drops among the ``alive`` rows (global positions, ascending)."""
    ids = facts.ids.take(pa.array(alive, type=pa.int64()))
    codes, ranks = _type_codes(ids.column("task_type")), _earlier_ranks(ids.column("example_id"))
    threshold = cfg.near_dup_threshold
    q_reps = _near_pass(alive, codes, ranks, facts.query_long[alive], facts.query_sigs, threshold)
    p_eligible = (q_reps < 0) & facts.positive_long[alive]
    p_reps = _near_pass(alive, codes, ranks, p_eligible, facts.positive_sigs, threshold)
    reps = np.where(q_reps >= 0, q_reps, p_reps)
    local = np.flatnonzero(reps >= 0)
    positive = p_reps[local] >= 0
    rep_ids = ids.column("example_id").take(pa.array(reps[local], type=pa.int64())).to_pylist()
    reasons = np.where(positive, "near_duplicate_positive", "near_duplicate_query").tolist()
    fields = np.where(positive, "positive", "query").tolist()
    details = [
        f"{f} near-duplicate of {rep} (Jaccard >= {threshold:g})" for f, rep in zip(fields, rep_ids, strict=True)
    ]
    return Drops(alive[local], reasons, details)


def dedup_facts(batch: pa.Table, cfg: CleanSettings) -> DedupFacts:
    """:meth:`DedupFacts.of_batch` (what the clean flow maps over its batches)."""
    return DedupFacts.of_batch(batch, cfg)


def dedup_decisions(facts: DedupFacts, cfg: CleanSettings) -> tuple[np.ndarray, pa.Table]:
    """The keep mask of the rows ``facts`` describe and the dropped rows (DROPPED_SCHEMA: the exact ones,
    then the near ones, each in input order)."""
    n = facts.ids.num_rows
    exact = exact_drops(facts)
    keep = np.ones(n, dtype=bool)
    keep[exact.rows] = False
    near = near_drops(facts, np.flatnonzero(keep), cfg)
    keep[near.rows] = False
    dropped = pa.concat_tables(
        [dropped_table(facts.ids, STAGE_EXACT, exact), dropped_table(facts.ids, STAGE_NEAR, near)]
    )
    return keep, dropped


def dedup_batches(batches: Iterable[pa.Table], cfg: CleanSettings) -> tuple[np.ndarray, pa.Table]:
    """:func:`dedup_decisions` of rows read batch by batch (DEDUP_COLUMNS, in order), in this process."""
    return dedup_decisions(DedupFacts.join((dedup_facts(b, cfg) for b in batches), cfg), cfg)
