"""A run's end-of-run summaries read only the columns they count (``RunStore.read_kind(kind, columns)``): the
same counts as from the whole tables, without loading the texts; optional and missing columns as a full read."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.artifacts import GENERATION_COLUMNS, generation_rows
from storage.atomic import StorageError
from storage.schemas import INSTRUCTION_SCHEMA
from storage.shards import RunStore, read_parquet_checked
from tasks.generation.usage import USAGE_COLUMNS, usage_by_type
from tests.support.rows import example


def _run(tmp_path) -> RunStore:
    store = RunStore(tmp_path, "r")
    rows = [
        example("r", i, f"query {i}", "a long positive " * 200, task_type=t)
        for i, t in enumerate(["retrieval", "sts"] * 5)
    ]
    for i, row in enumerate(rows):
        row["model"] = "m1" if i % 3 else "m2"
        row["attempts"], row["completion_tokens"] = 1 + i % 2, 10 * i
    store.write_shard("examples", "g00-00000", rows[:6], [])
    store.write_shard("examples", "g00-00001", rows[6:], [])
    return store


def test_projected_read_holds_only_the_columns_and_equals_the_full_read(tmp_path):
    store = _run(tmp_path)
    columns = USAGE_COLUMNS["examples"]
    projected, full = store.read_kind("examples", columns), store.read_kind("examples")
    assert projected.column_names == list(columns)
    assert projected.equals(full.select(list(columns)))
    assert projected.nbytes * 20 < full.nbytes  # the positives' texts were not read
    assert store.read_kind("rejects", ("task_type", "reason")).column_names == ["task_type", "reason"]  # none yet


def test_summaries_from_projected_reads_equal_the_whole_tables(tmp_path):
    store = _run(tmp_path)
    whole = {kind: store.read_kind(kind) for kind in USAGE_COLUMNS}
    assert usage_by_type(**{k: store.read_kind(k, c) for k, c in USAGE_COLUMNS.items()}) == usage_by_type(**whole)
    projected = generation_rows(**{k: store.read_kind(k, c) for k, c in GENERATION_COLUMNS.items()})
    assert projected == generation_rows(whole["examples"], whole["rejects"])
    assert [r["examples"] for r in projected] == [5, 5, 10]


def test_projection_reads_an_optional_column_absent_from_an_older_file_as_nulls(tmp_path):
    path = tmp_path / "instructions.parquet"
    older = pa.table({"instruction_id": ["i1"], "task_type": ["retrieval"], "instruction": ["Find it."]})
    pq.write_table(older, path)
    table = read_parquet_checked(path, INSTRUCTION_SCHEMA, ("instruction_id", "intent_id"))
    assert table.column_names == ["instruction_id", "intent_id"] and table["intent_id"].to_pylist() == [None]
    with pytest.raises(StorageError, match=r"instructions.parquet: missing column\(s\) persona_id"):
        read_parquet_checked(path, INSTRUCTION_SCHEMA, ("instruction_id", "persona_id"))
