"""Parquet shards of a run: atomic commit, manifest recovery, checked reads and the run lock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import atomic
from storage.atomic import AtomicFiles
from storage.catalog import Catalog
from storage.schemas import BRAINSTORM_SCHEMA, EXAMPLE_SCHEMA, INSTRUCTION_SCHEMA, REJECT_SCHEMA
from storage.shards import (
    RunLocked,
    RunStore,
    StorageError,
    file_sha256,
    list_runs,
    read_parquet_checked,
    rows_to_table,
)

RUN = "run-test_1"
CREATED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
REPO_ROOT = Path(__file__).resolve().parents[2]


def make_row(schema: pa.Schema, i: int, shard_id: str = "g00-00000", **overrides) -> dict:
    """One row for ``schema`` with a value of the right type in every column."""
    row = {}
    for field in schema:
        t = field.type
        if pa.types.is_string(t):
            value = f"{field.name}-{shard_id}-{i}"
        elif pa.types.is_integer(t):
            value = i + 1
        elif pa.types.is_floating(t):
            value = 0.5 * (i + 1)
        elif pa.types.is_timestamp(t):
            value = CREATED
        else:  # pragma: no cover - no other types are used
            raise AssertionError(field)
        row[field.name] = value
    row.update(run_id=RUN, shard_id=shard_id)
    row = {k: v for k, v in row.items() if k in schema.names}
    row.update(overrides)
    return row


def example_rows(n: int, shard_id: str = "g00-00000") -> list[dict]:
    return [make_row(EXAMPLE_SCHEMA, i, shard_id, example_id=f"{RUN}:{shard_id}-{i}") for i in range(n)]


def reject_rows(n: int, shard_id: str = "g00-00000") -> list[dict]:
    return [
        make_row(REJECT_SCHEMA, i, shard_id, example_id=f"{RUN}:{shard_id}-rej{i}", stage="generate") for i in range(n)
    ]


@pytest.fixture
def store(tmp_path) -> RunStore:
    return RunStore(tmp_path, RUN)


# --- writing and completeness --------------------------------------------------------------------


def test_write_shard_then_is_complete(store):
    assert not store.is_complete("examples", "g00-00000")
    record = store.write_shard("examples", "g00-00000", example_rows(5), reject_rows(2))
    assert (record.rows, record.rejects) == (5, 2)
    path = store.shard_path("examples", "g00-00000")
    assert path.exists() and record.bytes == path.stat().st_size
    assert record.sha256 == file_sha256(path)
    assert store.is_complete("examples", "g00-00000")
    assert not store.is_complete("examples", "g00-00001")
    assert not store.is_complete("brainstorm", "g00-00000")  # kinds are separate
    entry = store.manifest()["examples/g00-00000"]
    assert entry["rows"] == 5 and entry["rejects"] == 2
    # a fresh store object (another process) sees the same
    assert RunStore(store.root.parents[1], RUN).is_complete("examples", "g00-00000")


def test_written_rows_read_back(store):
    rows = example_rows(4)
    store.write_shard("examples", "g00-00000", rows, reject_rows(1))
    table = store.read_kind("examples")
    assert table.schema.names == EXAMPLE_SCHEMA.names
    assert table.column("example_id").to_pylist() == [r["example_id"] for r in rows]
    assert table.column("query").to_pylist() == [r["query"] for r in rows]
    assert table.column("created_at").to_pylist() == [CREATED] * 4
    rejects = store.read_kind("rejects")
    assert rejects.column("example_id").to_pylist() == [reject_rows(1)[0]["example_id"]]


def test_read_kind_concatenates_shards_and_empty_kinds(store):
    assert store.read_kind("examples").num_rows == 0
    assert store.read_kind("examples").schema.names == EXAMPLE_SCHEMA.names
    assert store.read_kind("rejects").num_rows == 0
    store.write_shard("examples", "g00-00001", example_rows(2, "g00-00001"), [])
    store.write_shard("examples", "g00-00000", example_rows(3, "g00-00000"), reject_rows(1))
    table = store.read_kind("examples")
    assert table.num_rows == 5
    assert len(set(table.column("example_id").to_pylist())) == 5
    assert store.read_kind("rejects").num_rows == 1


def test_rewriting_a_shard_replaces_it(store):
    store.write_shard("examples", "g00-00000", example_rows(5), reject_rows(3))
    store.write_shard("examples", "g00-00000", example_rows(2), reject_rows(1))
    assert store.read_kind("examples").num_rows == 2
    assert store.read_kind("rejects").num_rows == 1
    assert store.manifest()["examples/g00-00000"]["rows"] == 2


def test_brainstorm_shards(store):
    rows = [make_row(BRAINSTORM_SCHEMA, i, "b000-00000") for i in range(3)]
    store.write_shard("brainstorm", "b000-00000", rows, [])
    assert store.is_complete("brainstorm", "b000-00000")
    assert store.read_kind("brainstorm").num_rows == 3


def test_row_missing_a_column_is_refused_and_nothing_committed(store):
    rows = example_rows(2)
    del rows[1]["positive"]
    with pytest.raises(KeyError, match="positive"):
        store.write_shard("examples", "g00-00000", rows, [])
    assert not store.shard_path("examples", "g00-00000").exists()
    assert not store.is_complete("examples", "g00-00000")


def test_rows_to_table_checks_columns():
    with pytest.raises(KeyError, match="reason"):
        rows_to_table([{k: v for k, v in reject_rows(1)[0].items() if k != "reason"}], REJECT_SCHEMA)
    assert rows_to_table([], REJECT_SCHEMA).num_rows == 0


# --- crash recovery ------------------------------------------------------------------------------


def test_manifest_lost_after_data_write_is_recovered(tmp_path):
    store = RunStore(tmp_path, RUN)
    store.write_shard("examples", "g00-00000", example_rows(7), reject_rows(3))
    store.write_shard("examples", "g00-00001", example_rows(4, "g00-00001"), [])
    expected = store.manifest()
    shutil.rmtree(store.entries.entries_dir)  # crash after the data files, before their manifest entries

    fresh = RunStore(tmp_path, RUN)
    assert fresh.manifest() == {}
    assert fresh.is_complete("examples", "g00-00000")
    assert fresh.is_complete("examples", "g00-00001")
    recovered = fresh.manifest()
    assert recovered["examples/g00-00000"]["rows"] == 7
    assert recovered["examples/g00-00000"]["rejects"] == 3
    assert recovered["examples/g00-00001"]["rows"] == 4
    assert recovered["examples/g00-00001"]["rejects"] == 0
    assert recovered == expected
    assert json.loads(fresh.entries.entry_path("examples/g00-00001").read_text())["rows"] == 4


def test_rejects_written_but_no_data_file_is_not_complete(store):
    store.write_shard("examples", "g00-00000", example_rows(2), reject_rows(2))
    store.shard_path("examples", "g00-00000").unlink()  # crash between rejects and data file
    store.entries.entry_path("examples/g00-00000").unlink()
    assert not store.is_complete("examples", "g00-00000")
    assert "examples/g00-00000" not in store.manifest()


def test_manifest_entry_without_data_file_is_not_complete(store):
    store.write_shard("examples", "g00-00000", example_rows(2), [])
    store.shard_path("examples", "g00-00000").unlink()
    assert not store.is_complete("examples", "g00-00000")


def test_leftover_temp_file_does_not_count(store):
    path = store.shard_path("examples", "g00-00000")
    path.parent.mkdir(parents=True)
    # a complete table left under a temp name by a crash before os.replace
    tmp = path.with_name(f".{path.name}.tmp-12345-67890")
    pq.write_table(rows_to_table(example_rows(3), EXAMPLE_SCHEMA), tmp)
    assert not store.is_complete("examples", "g00-00000")
    assert store.manifest() == {}
    assert store.read_kind("examples").num_rows == 0
    store.write_shard("examples", "g00-00001", example_rows(2, "g00-00001"), [])
    assert store.read_kind("examples").num_rows == 2


def test_write_leaves_no_temp_files(store):
    store.write_shard("examples", "g00-00000", example_rows(3), reject_rows(1))
    store.write_run_info({"a": 1})
    leftovers = [p for p in store.root.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


# --- the atomic-write helper (storage/atomic.py) -------------------------------------------------


def test_atomic_files_rename_nothing_when_the_block_fails(tmp_path):
    old = tmp_path / "a.txt"
    old.write_text("old")
    with pytest.raises(RuntimeError), AtomicFiles() as files:
        files.temp_for(old).write_text("new")
        files.temp_for(tmp_path / "sub" / "b.txt").write_text("new")
        raise RuntimeError("writer failed")
    assert old.read_text() == "old"
    assert not (tmp_path / "sub" / "b.txt").exists()
    assert [p.name for p in tmp_path.rglob("*.tmp-*")] == []


def test_atomic_files_pass_the_fault_point_before_each_rename(tmp_path, monkeypatch):
    targets = [tmp_path / "one.txt", tmp_path / "two.txt"]
    seen = []  # (point, which targets exist) at each checkpoint
    monkeypatch.setattr(atomic, "checkpoint", lambda point: seen.append((point, [t.exists() for t in targets])))
    with AtomicFiles("export.part") as files:
        for target in targets:
            files.temp_for(target).write_text(target.name)
    assert seen == [("export.part", [False, False]), ("export.part", [True, False])]
    assert [t.read_text() for t in targets] == ["one.txt", "two.txt"]


def test_atomic_writers_use_their_fault_points(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(atomic, "checkpoint", seen.append)
    atomic.atomic_write_bytes(tmp_path / "x.json", b"{}")
    atomic.atomic_write_parquet(pa.table({"a": [1]}), tmp_path / "x.parquet")
    with atomic.atomic_path(tmp_path / "y.txt") as tmp:  # no point: no checkpoint
        tmp.write_text("y")
    assert seen == ["bytes.tmp", "parquet.tmp"]
    assert (tmp_path / "x.json").read_bytes() == b"{}" and (tmp_path / "y.txt").read_text() == "y"


def test_atomic_write_error_is_a_storage_error_naming_the_file(tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(StorageError, match=r"blocker/x\.json: cannot write"):
        atomic.atomic_write_bytes(tmp_path / "blocker" / "x.json", b"{}")
    with pytest.raises(StorageError, match=r"blocker/x\.parquet: cannot write"):
        atomic.atomic_write_parquet(pa.table({"a": [1]}), tmp_path / "blocker" / "x.parquet")


def test_remove_stale_temps_removes_only_those_of_dead_processes(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    stale = tmp_path / "a" / f".x.parquet.tmp-{dead_pid}-1"
    mine = tmp_path / f".y.parquet.tmp-{os.getpid()}-1"
    parent = tmp_path / f".z.json.tmp-{os.getppid()}-1"
    for path in (stale, mine, parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("partial")
    assert atomic.remove_stale_temps(tmp_path) == 1
    assert not stale.exists() and mine.exists() and parent.exists()


# --- checked reads -------------------------------------------------------------------------------


def test_corrupt_parquet_raises_storage_error_naming_file(store):
    store.write_shard("examples", "g00-00000", example_rows(2), [])
    bad = store.shard_path("examples", "g00-00001")
    bad.write_bytes(b"this is not parquet \x00\x01\x02" * 20)
    with pytest.raises(StorageError) as exc:
        store.read_kind("examples")
    assert bad.name in str(exc.value)


def test_truncated_parquet_raises_storage_error(store):
    store.write_shard("examples", "g00-00000", example_rows(20), [])
    path = store.shard_path("examples", "g00-00000")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StorageError, match=path.name):
        store.read_kind("examples")


def test_corrupt_data_file_without_manifest_entry_raises_storage_error(store):
    path = store.shard_path("examples", "g00-00000")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(StorageError, match=path.name):
        store.is_complete("examples", "g00-00000")


def test_corrupt_rejects_file_during_recovery_raises_storage_error(store):
    store.write_shard("examples", "g00-00000", example_rows(2), reject_rows(1))
    store.entries.entry_path("examples/g00-00000").unlink()
    rejects = store.rejects_path("g00-00000")
    rejects.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(StorageError, match=rejects.name):
        store.is_complete("examples", "g00-00000")


def test_shard_missing_a_column_raises_storage_error(store):
    table = rows_to_table(example_rows(3), EXAMPLE_SCHEMA).drop_columns(["positive"])
    path = store.shard_path("examples", "g00-00000")
    path.parent.mkdir(parents=True)
    pq.write_table(table, path)
    with pytest.raises(StorageError) as exc:
        store.read_kind("examples")
    message = str(exc.value)
    assert "positive" in message and path.name in message
    with pytest.raises(StorageError, match="positive"):
        read_parquet_checked(path, EXAMPLE_SCHEMA)


def test_read_checked_missing_file(tmp_path):
    with pytest.raises(StorageError, match="absent.parquet"):
        read_parquet_checked(tmp_path / "absent.parquet", EXAMPLE_SCHEMA)


def test_read_checked_puts_columns_in_schema_order_and_types(tmp_path):
    table = rows_to_table(example_rows(2), EXAMPLE_SCHEMA)
    shuffled = table.select(list(reversed(table.column_names))).append_column("extra", pa.array([1, 2]))
    path = tmp_path / "x.parquet"
    pq.write_table(shuffled, path)
    out = read_parquet_checked(path, EXAMPLE_SCHEMA)
    assert out.schema.names == EXAMPLE_SCHEMA.names
    assert out.column("attempts").type == pa.int32()


def test_corrupt_manifest_raises_storage_error(store):
    store.root.mkdir(parents=True)
    store.legacy_manifest_path.write_text("{not json")
    with pytest.raises(StorageError, match="manifest.json"):
        store.manifest()


def test_corrupt_manifest_entry_raises_storage_error_naming_it(store):
    store.write_shard("examples", "g00-00000", example_rows(2), [])
    store.entries.entry_path("examples/g00-00000").write_text("{not json")
    with pytest.raises(StorageError, match="g00-00000.json"):
        store.manifest()


# --- other files ---------------------------------------------------------------------------------


def test_run_info_round_trip(store):
    assert store.read_run_info() is None
    store.write_run_info({"seed": 42, "path": Path("/x")})
    info = store.read_run_info()
    assert info["run_id"] == RUN and info["seed"] == 42 and info["path"] == "/x"
    assert "schema_version" in info


def test_instructions_round_trip(store):
    assert store.read_instructions() is None
    rows = [make_row(INSTRUCTION_SCHEMA, i) for i in range(3)]
    store.write_instructions(pa.Table.from_pylist(rows, schema=INSTRUCTION_SCHEMA))
    assert store.read_instructions().to_pylist() == rows


def test_personas_file_is_persona_hub_jsonl(store):
    from personas.sources import read_persona_jsonl

    store.write_personas([("p1", "A baker in Oslo."), ("p2", "Ein Förster aus dem Harz.")])
    assert [p.text for p in read_persona_jsonl(store.personas_path)] == [
        "A baker in Oslo.",
        "Ein Förster aus dem Harz.",
    ]


def test_list_runs(tmp_path):
    assert list_runs(tmp_path) == []
    RunStore(tmp_path, "b-run").write_run_info({})
    RunStore(tmp_path, "a-run").write_run_info({})
    (tmp_path / "runs" / "not-a-run.txt").write_text("")
    assert list_runs(tmp_path) == ["a-run", "b-run"]
    assert Catalog(tmp_path).run_ids() == ["a-run", "b-run"]  # the catalog asks the same listing


# --- run ids and locking -------------------------------------------------------------------------


@pytest.mark.parametrize("run_id", ["", "a/b", "../escape", ".", "..", ".hidden", "/abs"])
def test_invalid_run_ids(tmp_path, run_id):
    with pytest.raises(ValueError):
        RunStore(tmp_path, run_id)


@pytest.mark.parametrize("run_id", ["run-1", "2024_05_01", "abc"])
def test_valid_run_ids_stay_under_runs(tmp_path, run_id):
    store = RunStore(tmp_path, run_id)
    assert store.root.parent == tmp_path / "runs"
    assert store.root.name == run_id


_CHILD = textwrap.dedent(
    """
    import sys
    from storage.shards import RunLocked, RunStore
    try:
        with RunStore(sys.argv[1], sys.argv[2]).exclusive():
            print("ACQUIRED")
    except RunLocked as exc:
        print("LOCKED", exc)
    """
)


def _try_lock_in_child(data_dir: Path, run_id: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(data_dir), run_id],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_exclusive_blocks_another_process(tmp_path):
    store = RunStore(tmp_path, RUN)
    with store.exclusive():
        out = _try_lock_in_child(tmp_path, RUN)
        assert out.startswith("LOCKED"), out
        assert RUN in out
        # another run id is not affected
        assert _try_lock_in_child(tmp_path, "other-run") == "ACQUIRED"
    # released on exit
    assert _try_lock_in_child(tmp_path, RUN) == "ACQUIRED"


def test_exclusive_twice_in_one_process_raises_run_locked(tmp_path):
    with RunStore(tmp_path, RUN).exclusive():
        with pytest.raises(RunLocked):
            with RunStore(tmp_path, RUN).exclusive():
                pass  # pragma: no cover
    with RunStore(tmp_path, RUN).exclusive():
        pass


def test_exclusive_released_after_an_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with RunStore(tmp_path, RUN).exclusive():
            raise RuntimeError("boom")
    with RunStore(tmp_path, RUN).exclusive():
        pass
