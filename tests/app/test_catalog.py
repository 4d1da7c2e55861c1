"""The DuckDB catalog: views on a fresh project, counts over real-schema fixtures, safe parameters,
file outputs, SQL errors and the single-writer lock."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.catalog import VIEWS, Catalog, CatalogError, CatalogLocked
from storage.schemas import (
    BRAINSTORM_SCHEMA,
    DROPPED_SCHEMA,
    EXAMPLE_SCHEMA,
    INSTRUCTION_SCHEMA,
    LINEAGE_SCHEMA,
    PASSAGE_SCHEMA,
    REJECT_SCHEMA,
)
from support.catalog_store import (
    FILTERED,
    MINED,
    check_readme_queries,
    row_for,
    write_small_store,
)


def write(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def build_project(data: Path) -> None:
    """Two runs and one clean run, with the real schemas."""

    def ex(run, i, t="retrieval"):
        return row_for(EXAMPLE_SCHEMA, example_id=f"{run}:g-{i}", run_id=run, task_type=t)

    write(data / "runs/r1/examples/g00.parquet", [ex("r1", 0), ex("r1", 1, "sts")], EXAMPLE_SCHEMA)
    write(data / "runs/r1/examples/g01.parquet", [ex("r1", 2)], EXAMPLE_SCHEMA)
    write(data / "runs/r2/examples/g00.parquet", [ex("r2", 0)], EXAMPLE_SCHEMA)
    write(data / "runs/r1/rejects/g00.parquet", [row_for(REJECT_SCHEMA, run_id="r1", reason="bad_json")], REJECT_SCHEMA)
    write(data / "runs/r1/rejects/g01.parquet", [], REJECT_SCHEMA)
    write(data / "runs/r1/brainstorm/b00.parquet", [row_for(BRAINSTORM_SCHEMA, run_id="r1")] * 2, BRAINSTORM_SCHEMA)
    write(
        data / "runs/r1/instructions.parquet",
        [row_for(INSTRUCTION_SCHEMA, instruction_id=f"i{i}") for i in range(2)],
        INSTRUCTION_SCHEMA,
    )
    write(data / "runs/r2/instructions.parquet", [row_for(INSTRUCTION_SCHEMA)], INSTRUCTION_SCHEMA)
    write(data / "runs/r3/lineage/imp-00000.parquet", [row_for(LINEAGE_SCHEMA, run_id="r3")] * 2, LINEAGE_SCHEMA)
    write(
        data / "runs/r4/passages.parquet",
        [row_for(PASSAGE_SCHEMA, passage_id=f"p-{i}") for i in range(3)],
        PASSAGE_SCHEMA,
    )
    clean = data / "clean/c1"
    write(clean / "valid.parquet", [ex("r1", 0), ex("r1", 1, "sts"), ex("r1", 2)], EXAMPLE_SCHEMA)
    write(clean / "deduped.parquet", [ex("r1", 0), ex("r1", 1, "sts")], EXAMPLE_SCHEMA)
    write(clean / "filtered.parquet", [row_for(FILTERED, **ex("r1", 0))], FILTERED)
    write(clean / "mined.parquet", [row_for(MINED, **ex("r1", 0), hard_negatives=["n1", "n2"])], MINED)
    write(clean / "dropped/validate.parquet", [], DROPPED_SCHEMA)
    write(clean / "dropped/dedup.parquet", [row_for(DROPPED_SCHEMA, stage="dedup_exact")], DROPPED_SCHEMA)
    (clean / "inputs.json").write_text(json.dumps({"runs": ["r1", "r2"]}))


def counts(catalog: Catalog) -> dict[str, int]:
    with catalog.session():  # one connection; the views are checked for freshness when it opens
        return {v: catalog.query(f"SELECT count(*) AS n FROM {v}").column("n")[0].as_py() for v in VIEWS}


def describe(catalog: Catalog, view: str) -> list[tuple[str, str]]:
    t = catalog.query(f"DESCRIBE {view}")
    return list(zip(t.column("column_name").to_pylist(), t.column("column_type").to_pylist(), strict=True))


def test_every_view_exists_and_is_empty_on_a_fresh_project(tmp_path):
    catalog = Catalog(tmp_path / "data")
    assert catalog.refresh() == {v: False for v in VIEWS}
    assert catalog.path.exists()
    assert counts(catalog) == {v: 0 for v in VIEWS}
    columns = dict(describe(catalog, "mined"))
    assert columns["hard_negatives"] == "VARCHAR[]"
    assert columns["clean_id"] == "VARCHAR"
    assert "run_id" in dict(describe(catalog, "instructions"))


def test_counts_match_the_files_and_ids_come_from_paths(tmp_path):
    data = tmp_path / "data"
    catalog = Catalog(data)
    with catalog.session():
        empty_columns = {v: describe(catalog, v) for v in VIEWS}  # fresh project first
    build_project(data)
    # no explicit refresh: the catalog notices that files appeared
    assert counts(catalog) == {
        "raw": 4,
        "rejects": 1,
        "brainstorm": 2,
        "instructions": 3,
        "valid": 3,
        "deduped": 2,
        "decontaminated": 0,
        "filtered": 1,
        "mined": 1,
        "verified": 0,
        "judged": 0,
        "dropped": 1,
        "clean_inputs": 2,
        "ledger": 0,
        "lineage": 2,
        "passages": 3,
    }
    # the empty views had the very columns and types that the file-backed views have
    with catalog.session():
        for view in VIEWS:
            assert describe(catalog, view) == empty_columns[view], view
    by_run = catalog.query("SELECT run_id, count(*) AS n FROM instructions GROUP BY 1 ORDER BY 1").to_pylist()
    assert by_run == [{"run_id": "r1", "n": 2}, {"run_id": "r2", "n": 1}]
    assert catalog.query("SELECT DISTINCT clean_id FROM mined").column(0).to_pylist() == ["c1"]
    assert catalog.query("SELECT clean_id, run_id FROM clean_inputs ORDER BY 2").to_pylist() == [
        {"clean_id": "c1", "run_id": "r1"},
        {"clean_id": "c1", "run_id": "r2"},
    ]
    assert catalog.query("SELECT hard_negatives FROM mined").column(0).to_pylist() == [["n1", "n2"]]
    # the file works from plain DuckDB too (what a user does with the CLI)
    with duckdb.connect(str(catalog.path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM raw").fetchone()[0] == 4


def test_parameters_bind_values_and_cannot_inject(tmp_path):
    data = tmp_path / "data"
    build_project(data)
    catalog = Catalog(data)
    q = "SELECT count(*) AS n FROM raw WHERE run_id = ?"
    assert catalog.query(q, ["r1"]).column("n")[0].as_py() == 3
    assert catalog.query("SELECT count(*) AS n FROM raw WHERE run_id = $run", {"run": "r2"}).column("n")[0].as_py() == 1
    for evil in ["r1' OR '1'='1", "r1'; DROP VIEW raw; --", "'); SELECT 1; --"]:
        assert catalog.query(q, [evil]).column("n")[0].as_py() == 0
    assert counts(catalog)["raw"] == 4
    # queries run read-only: user SQL cannot drop the views
    with pytest.raises(CatalogError):
        catalog.query("DROP VIEW raw")
    assert counts(catalog)["raw"] == 4


def test_to_file_writes_csv_and_parquet(tmp_path):
    data = tmp_path / "data"
    build_project(data)
    catalog = Catalog(data)
    sql = "SELECT example_id, task_type FROM raw WHERE run_id = ? ORDER BY example_id"
    csv_path = catalog.to_file(sql, tmp_path / "out" / "it's.csv", ["r1"])  # a quote in the path
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "example_id,task_type" and len(lines) == 4
    pq_path = catalog.to_file(sql, tmp_path / "out" / "r2.parquet", ["r2"])
    assert pq.read_table(pq_path).to_pylist() == [{"example_id": "r2:g-0", "task_type": "retrieval"}]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["it's.csv", "r2.parquet"]  # no temp files
    with pytest.raises(CatalogError, match="csv"):
        catalog.to_file(sql, tmp_path / "out.xlsx", ["r1"])
    with catalog.session():  # several statements on one connection, a COPY among them
        catalog.to_file("SELECT * FROM mined WHERE clean_id = $c", tmp_path / "m.parquet", {"c": "c1"})
        assert catalog.query("SELECT count(*) AS n FROM valid").column("n")[0].as_py() == 3
    assert pq.read_table(tmp_path / "m.parquet").column("hard_negatives").to_pylist() == [["n1", "n2"]]


def test_bad_sql_raises_catalog_error_with_duckdb_message(tmp_path):
    catalog = Catalog(tmp_path / "data")
    with pytest.raises(CatalogError, match="(?i)syntax error"):
        catalog.query("SELEC count(*) FROM raw")
    with pytest.raises(CatalogError, match="no_such_view"):
        catalog.query("SELECT * FROM no_such_view")
    with pytest.raises(CatalogError):
        catalog.to_file("SELECT * FROM no_such_view", tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


def test_a_writer_elsewhere_gives_a_clear_error_but_queries_still_answer(tmp_path):
    data = tmp_path / "data"
    build_project(data)
    catalog = Catalog(data, lock_timeout_s=0.3)
    catalog.refresh()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import duckdb, sys, time
            con = duckdb.connect({str(catalog.path)!r})
            print("locked", flush=True)
            sys.stdin.read()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CatalogLocked, match="another process"):
            catalog.refresh()
        assert catalog.query("SELECT count(*) AS n FROM raw").column("n")[0].as_py() == 4
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    assert catalog.refresh()["raw"] is True


# --- the README's five queries, against a small store written by the real writers ------------------


def test_readme_queries_run_on_a_small_real_store(tmp_path):
    write_small_store(tmp_path / "data")
    check_readme_queries(Catalog(tmp_path / "data"))
