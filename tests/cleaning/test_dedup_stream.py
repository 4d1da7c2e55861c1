"""The clean flow's streamed dedup decides what exact_dedup then near_dedup decide, whatever the batch size."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from ground.settings import CleanSettings
from storage.schemas import DROPPED_SCHEMA, EXAMPLE_SCHEMA
from support.dedup_rows import make_example, near_rows, table_of, text_of
from tasks.cleaning.dedup import exact_dedup, near_dedup
from tasks.cleaning.dedup_stream import DEDUP_COLUMNS, dedup_batches


def whole_table_dedup(table: pa.Table, cfg: CleanSettings) -> tuple[list[str], pa.Table]:
    """The reference: exact dedup of the table, near dedup of what it kept (the flow's order before streaming)."""
    exact = exact_dedup(table)
    near = near_dedup(exact.kept, cfg)
    return near.kept.column("example_id").to_pylist(), pa.concat_tables([exact.dropped, near.dropped])


def batches_of(table: pa.Table, rows: int) -> list[pa.Table]:
    columns = table.select(list(DEDUP_COLUMNS))
    return [columns.slice(start, rows) for start in range(0, max(table.num_rows, 1), rows)]


def mixed_rows() -> list[dict]:
    """Exact duplicates (query and positive), near duplicates, nulls, types with and without documents."""
    rows = near_rows()
    base = text_of(50, seed=9)
    rows += [
        make_example("x1", query="What is MinHash?", positive=base),
        make_example("x0", query="  what is   minhash ", positive="doc b"),
        make_example("x2", query="an unrelated question about rivers", positive=base + "!"),
        make_example("x3", "sts", query="What is MinHash?", positive="sts doc"),
        make_example("x4", "classification", query="The food was cold.", positive="negative"),
        make_example("x5", "classification", query="Great staff!", positive="negative"),
        make_example("x6", query=None, positive=None),
        make_example("x7", query="", positive=""),
        make_example("x8", "long_long", query=text_of(30, seed=4), positive=text_of(80, seed=5)),
        make_example("x9", "long_long", query=text_of(30, seed=6), positive=text_of(80, seed=5) + " end"),
    ]
    return rows


@pytest.mark.parametrize("batch_rows", [1, 3, 1000])
@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_dedup_equals_exact_then_near(batch_rows, seed):
    cfg = CleanSettings()
    rows = mixed_rows()
    random.Random(seed).shuffle(rows)
    table = table_of(rows)
    kept_ids, dropped = whole_table_dedup(table, cfg)
    assert dropped.num_rows >= 4  # exact and near drops both present
    assert {"dedup_exact", "dedup_near"} <= set(dropped.column("stage").to_pylist())

    keep, streamed = dedup_batches(batches_of(table, batch_rows), cfg)
    assert streamed.cast(DROPPED_SCHEMA).equals(dropped.cast(DROPPED_SCHEMA))
    assert table.column("example_id").filter(pa.array(keep)).to_pylist() == kept_ids


def test_streamed_dedup_on_growth_rows():
    """On the growth bench's synthetic rows (exact and near duplicates, shared templates), batch edges anywhere."""
    from growth_rows import synthetic_rows

    cfg = CleanSettings()
    table = pa.Table.from_pylist(synthetic_rows(3000, "bench-run", 3), schema=EXAMPLE_SCHEMA)
    kept_ids, dropped = whole_table_dedup(table, cfg)
    assert dropped.num_rows > 50
    keep, streamed = dedup_batches(batches_of(table, 777), cfg)
    assert streamed.cast(DROPPED_SCHEMA).equals(dropped.cast(DROPPED_SCHEMA))
    assert table.column("example_id").filter(pa.array(keep)).to_pylist() == kept_ids


def test_no_rows():
    keep, dropped = dedup_batches([table_of([]).select(list(DEDUP_COLUMNS))], CleanSettings())
    assert len(keep) == 0 and dropped.num_rows == 0
    keep, dropped = dedup_batches([], CleanSettings())
    assert isinstance(keep, np.ndarray) and dropped.num_rows == 0
