"""The stage contract (tasks/cleaning/stage.py) and the one registry (storage/stages.py): a Filter decides rows
batch by batch and its base builds the dropped table; a stage table commits its drops into its declared files."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.corpus import CleanStore, Drops, StageResult, dropped_table
from storage.schemas import DROPPED_SCHEMA
from storage.stages import CLEAN_STAGES
from tasks.cleaning.stage import Filter, Stage


class OddLengths(Filter):
    """Drops rows whose query has an odd length; counts the batches it saw."""

    name = "odd"
    batch_rows = 3

    def __init__(self) -> None:
        self.batches = 0

    def drops(self, rows: pa.Table) -> Drops:
        self.batches += 1
        lengths = [len(q) for q in rows["query"].to_pylist()]
        odd = [i for i, n in enumerate(lengths) if n % 2]
        return Drops(odd, "odd_query", [f"length {lengths[i]}" for i in odd])


def table_in_chunks(queries: list[str], chunk: int) -> pa.Table:
    rows = [{"example_id": f"e{i}", "run_id": "r", "task_type": "t", "query": q} for i, q in enumerate(queries)]
    whole = pa.Table.from_pylist(rows)
    return pa.Table.from_batches(whole.to_batches(max_chunksize=chunk))


def test_a_filter_runs_batch_by_batch_and_its_base_builds_the_dropped_rows():
    queries = ["ab", "abc", "abcd", "a", "xy", "xyz", "pq"]
    stage = OddLengths()
    result = stage.run(table_in_chunks(queries, chunk=2))  # batches of 3 rows across chunks of 2
    assert stage.batches == 3, "one call per batch of batch_rows: a streamed stage"
    assert result.kept["query"].to_pylist() == ["ab", "abcd", "xy", "pq"]
    assert result.dropped.schema == DROPPED_SCHEMA
    assert result.dropped.to_pylist() == [
        {"example_id": f"e{i}", "run_id": "r", "task_type": "t", "stage": "odd", "reason": "odd_query", "detail": d}
        for i, d in ((1, "length 3"), (3, "length 1"), (5, "length 3"))
    ]


def test_a_global_stage_must_implement_run():
    class Whole(Stage):
        name = "whole"

    with pytest.raises(NotImplementedError, match="global stage"):
        Whole().run(table_in_chunks(["a"], 1))


def test_dropped_rows_come_in_input_order_with_null_ids_for_missing_columns():
    table = pa.table({"example_id": ["a", "b", "c"], "task_type": ["x", "y", "z"]})
    dropped = dropped_table(table, "s", Drops([2, 0], ["late", "early"], ["d2", "d0"]))
    assert dropped.to_pylist() == [
        {"example_id": "a", "run_id": None, "task_type": "x", "stage": "s", "reason": "early", "detail": "d0"},
        {"example_id": "c", "run_id": None, "task_type": "z", "stage": "s", "reason": "late", "detail": "d2"},
    ]


def test_a_stage_table_commits_its_drops_into_its_declared_files(tmp_path):
    dedup = next(s for s in CLEAN_STAGES if len(s.drops) > 1)  # one table, drops of two stages
    rows = pa.table({"example_id": ["a", "b", "c"], "run_id": ["r"] * 3, "task_type": ["t"] * 3})
    dropped = pa.concat_tables([dropped_table(rows, name, Drops([i], "why")) for i, name in enumerate(dedup.drops)])
    store = CleanStore(tmp_path, "c1")
    store.write_stage(dedup.table, StageResult(rows.slice(2), dropped))
    for i, name in enumerate(dedup.drops):
        assert pq.read_table(store.dropped_path(name))["example_id"].to_pylist() == [rows["example_id"][i].as_py()]
    stray = dropped_table(rows, "someone_else", Drops([0], "why"))
    with pytest.raises(ValueError, match="someone_else"):
        store.write_stage(CLEAN_STAGES[0].table, StageResult(rows, stray))
