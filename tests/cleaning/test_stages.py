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


def _writer(tmp_path, name: str = "odd"):
    from storage.stage_io import StageWriter

    return StageWriter(name, tmp_path / "out.parquet", {name: tmp_path / "dropped.parquet"})


def test_a_streamed_stage_reads_parquet_in_its_batches_and_commits_what_run_returns(tmp_path):
    """Fed from a Parquet file whose row groups (2 rows) do not match its batches (3), a Filter sees no batch
    over its ``batch_rows``; the committed files equal ``run`` over the whole table, and appear only at commit."""
    from flows.clean import streamed
    from storage.stage_io import iter_table

    queries = ["ab", "abc", "abcd", "a", "xy", "xyz", "pq"]
    source = tmp_path / "in.parquet"
    pq.write_table(table_in_chunks(queries, chunk=7), source, row_group_size=2)
    seen: list[int] = []

    class Recording(OddLengths):
        def run_batch(self, batch):
            seen.append(batch.num_rows)
            return super().run_batch(batch)

    stage = Recording()
    with _writer(tmp_path) as writer:
        for part in streamed(stage, "out", iter_table(source, batch_rows=stage.batch_rows)):
            writer.append(part["out"].kept, part["out"].dropped)
        assert not (tmp_path / "out.parquet").exists() and not (tmp_path / "dropped.parquet").exists()
        writer.commit()
    assert seen == [3, 3, 1]
    whole = OddLengths().run(pq.read_table(source))
    assert pq.read_table(tmp_path / "out.parquet").equals(whole.kept)
    assert pq.read_table(tmp_path / "dropped.parquet").equals(whole.dropped)
    assert not list(tmp_path.glob(".*.tmp-*")), "no temp file left"


def test_a_full_disk_mid_stream_is_one_line_naming_the_stage_and_the_file(tmp_path):
    """/dev/full answers every write with ENOSPC: the writer fails with one line, and commits nothing."""
    from storage.atomic import StorageError, temp_path

    if not __import__("os").path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    writer = _writer(tmp_path)
    temp_path(tmp_path / "out.parquet").symlink_to("/dev/full")
    batch = table_in_chunks(["ab"] * 50_000, chunk=50_000)
    with pytest.raises(StorageError) as failure:
        with writer:
            for _ in range(20):  # enough rows that the writer flushes before its commit
                writer.append(batch, DROPPED_SCHEMA.empty_table())
            writer.commit()
    message = str(failure.value)
    assert message == f"odd: cannot write {tmp_path / 'out.parquet'}: No space left on device", message
    assert not (tmp_path / "out.parquet").exists() and not (tmp_path / "dropped.parquet").exists()
