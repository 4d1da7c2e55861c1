"""The store on S3: shards, manifest, run lock, clean-stage tables, export, catalog and the CLI's
``query``, against a real S3 API (moto's server mode on 127.0.0.1, as s3fs's own tests use; see
``s3_server.py``). The flows on S3 are in ``test_s3_flows.py``."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from ground.settings import load_settings  # noqa: E402
from storage.catalog import Catalog  # noqa: E402
from storage.corpus import CleanStore, StageResult, text_hash  # noqa: E402
from storage.location import data_root, is_remote  # noqa: E402
from storage.schemas import BRAINSTORM_SCHEMA, EXAMPLE_SCHEMA, INSTRUCTION_SCHEMA, REJECT_SCHEMA  # noqa: E402
from storage.shards import RemoteLock, RunLocked, RunStore, StorageError, list_runs  # noqa: E402
from support.catalog_store import check_readme_queries, row_for, write_small_store
from support.cli_process import cli  # noqa: E402
from support.s3_server import AWS_ENV, BUCKET, keys  # noqa: E402


def example_rows(shard: str, n: int) -> list[dict]:
    return [
        row_for(EXAMPLE_SCHEMA, example_id=f"r:{shard}-{i}", run_id="r", shard_id=shard, query=f"q{i}")
        for i in range(n)
    ]


# --- run store ---------------------------------------------------------------------------------


def test_run_store_round_trip_on_s3(s3_root):
    assert is_remote(s3_root)
    store = RunStore(s3_root, "r")
    assert not store.is_complete("examples", "g00")
    reject = row_for(REJECT_SCHEMA, run_id="r", shard_id="g00", reason="invalid_json")
    rec = store.write_shard("examples", "g00", example_rows("g00", 3), [reject])
    store.write_shard("examples", "g01", example_rows("g01", 2), [])
    store.write_shard("brainstorm", "b00", [row_for(BRAINSTORM_SCHEMA)], [])
    assert store.is_complete("examples", "g00") and store.is_complete("examples", "g01")
    assert not store.is_complete("brainstorm", "g00")

    # the manifest records what S3 holds, byte for byte
    body = store.shard_path("examples", "g00").read_bytes()
    manifest = store.manifest()
    assert manifest["examples/g00"] == {
        "kind": "examples",
        "shard_id": "g00",
        "rows": 3,
        "rejects": 1,
        "bytes": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    assert rec.sha256 == hashlib.sha256(body).hexdigest()
    assert set(manifest) == {"examples/g00", "examples/g01", "brainstorm/b00"}

    examples = store.read_kind("examples")
    assert examples.column("example_id").to_pylist() == [f"r:g00-{i}" for i in range(3)] + ["r:g01-0", "r:g01-1"]
    assert store.read_kind("rejects").column("reason").to_pylist() == ["invalid_json"]

    store.write_run_info({"fingerprint": "abc"})
    assert store.read_run_info()["fingerprint"] == "abc"
    store.write_instructions(pa.Table.from_pylist([row_for(INSTRUCTION_SCHEMA)], schema=INSTRUCTION_SCHEMA))
    assert store.read_instructions().num_rows == 1
    store.write_personas([("p1", "a chemist"), ("p2", "a sailor")])
    from personas.sources import read_persona_jsonl

    assert [p.text for p in read_persona_jsonl(store.personas_path)] == ["a chemist", "a sailor"]
    assert list_runs(s3_root) == ["r"]
    # final keys only: nothing temporary was ever written to the bucket
    assert keys(s3_root) == sorted(
        [
            "runs/r/brainstorm/b00.parquet",
            "runs/r/examples/g00.parquet",
            "runs/r/examples/g01.parquet",
            "runs/r/instructions.parquet",
            "runs/r/manifest.d/brainstorm/b00.json",
            "runs/r/manifest.d/examples/g00.json",
            "runs/r/manifest.d/examples/g01.json",
            "runs/r/personas.jsonl",
            "runs/r/rejects/b00.parquet",
            "runs/r/rejects/g00.parquet",
            "runs/r/rejects/g01.parquet",
            "runs/r/run.json",
        ]
    )


def test_a_failed_shard_write_commits_nothing_on_s3(s3_root):
    store = RunStore(s3_root, "r")
    bad = example_rows("g00", 2)
    del bad[1]["query"]
    with pytest.raises(KeyError):
        store.write_shard("examples", "g00", bad, [])
    assert not store.is_complete("examples", "g00")
    assert "runs/r/examples/g00.parquet" not in keys(s3_root) and store.manifest() == {}


def test_manifest_lost_after_the_data_object_is_recovered_on_s3(s3_root):
    store = RunStore(s3_root, "r")
    store.write_shard("examples", "g00", example_rows("g00", 4), [])
    store.entries.entry_path("examples/g00").unlink()  # as if the process died between the data and entry PUTs
    fresh = RunStore(s3_root, "r")
    assert fresh.is_complete("examples", "g00")
    assert fresh.manifest()["examples/g00"]["rows"] == 4


def test_corrupt_shard_on_s3_is_a_storage_error_naming_it(s3_root):
    store = RunStore(s3_root, "r")
    store.shard_path("examples", "g00").write_bytes(b"not parquet")
    with pytest.raises(StorageError, match=r"s3://.*g00\.parquet: unreadable Parquet"):
        store.read_kind("examples")


# --- the run lock on S3 --------------------------------------------------------------------------


def test_second_writer_of_a_run_is_refused_on_s3(s3_root):
    first, second = RunStore(s3_root, "r"), RunStore(s3_root, "r")
    with first.exclusive():
        with pytest.raises(RunLocked, match="is being written by"):
            with second.exclusive():
                pass
        assert "runs/r/.lock" in keys(s3_root)
    assert "runs/r/.lock" not in keys(s3_root)  # released
    with second.exclusive():  # and free again
        pass


def test_second_writer_of_a_clean_run_is_refused_on_s3(s3_root):
    from storage.corpus import CleanLocked

    with CleanStore(s3_root, "c1").exclusive():
        with pytest.raises(CleanLocked, match="clean run 'c1' is being written by .*--clean-id"):
            with CleanStore(s3_root, "c1").exclusive():
                pass
    with CleanStore(s3_root, "c1").exclusive():  # released
        pass


def test_heartbeat_keeps_the_lock_and_a_stale_lock_is_taken_over(s3_root):
    path = s3_root / "runs" / "r" / ".lock"
    with RemoteLock(path, "r", ttl_s=0.6) as lock:
        time.sleep(1.5)  # > ttl: only the heartbeat keeps it alive
        holder = json.loads(path.fs.cat_file(path.path))  # one GET: the heartbeat may rewrite it any moment
        assert holder["owner"] == lock.owner and holder["expires_at"] > time.time()
        with pytest.raises(RunLocked):
            RemoteLock(path, "r", ttl_s=0.6).acquire()
    # a crashed writer elsewhere: its lock has expired, so the next writer takes it over
    path.write_bytes(
        json.dumps({"owner": "gone", "host": "elsewhere", "pid": 1, "expires_at": time.time() - 1}).encode()
    )
    with RemoteLock(path, "r") as lock:
        assert json.loads(path.fs.cat_file(path.path))["owner"] == lock.owner
    # a live writer on another host is respected
    path.write_bytes(json.dumps({"owner": "x", "host": "elsewhere", "pid": 1, "expires_at": time.time() + 60}).encode())
    with pytest.raises(RunLocked, match="elsewhere pid 1"):
        RunStore(s3_root, "r").exclusive().__enter__()
    # a dead process on this host is not waited for
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_bytes(
        json.dumps(
            {"owner": "y", "host": socket.gethostname(), "pid": int(dead.stdout), "expires_at": time.time() + 60}
        ).encode()
    )
    with RunStore(s3_root, "r").exclusive():
        pass


# --- clean store, embedding cache, export, report -------------------------------------------------


def test_clean_store_on_s3(s3_root, tmp_path):
    from tasks.cleaning.embed import EmbeddingCache

    store = CleanStore(s3_root, "c1")
    assert not store.has("valid")
    store.write_inputs(["r"])
    kept = pa.Table.from_pylist(example_rows("g00", 3), schema=EXAMPLE_SCHEMA)
    store.write_stage("valid", StageResult.keep_all(kept))
    assert store.has("valid") and store.count(store.stage_path("valid")) == 3
    assert store.read_stage("valid", EXAMPLE_SCHEMA).equals(kept)
    assert store.read_stage("valid").num_rows == 3
    assert [p.stem for p in (store.root / "dropped").glob("*.parquet")] == ["validate"]

    cache = EmbeddingCache(store.embeddings_dir("model/x"))
    cache.add([text_hash("1"), text_hash("2")], np.eye(2, dtype=np.float32))
    assert [p.suffix for p in store.embeddings_dir("model/x").iterdir()] == [".vec"]  # one object on S3
    shutil.rmtree(cache.local)  # a fresh machine: the segments are mirrored again and memory-mapped
    again = EmbeddingCache(store.embeddings_dir("model/x"))
    assert len(again) == 2 and text_hash("2") in again
    np.testing.assert_array_equal(again.get([text_hash("2"), text_hash("1")]), np.eye(2, dtype=np.float32)[::-1])

    # the export is staged locally (the exporters stream into files), then uploaded card last
    staged = store.export_dir
    assert not is_remote(staged)
    staged.mkdir(parents=True, exist_ok=True)
    (staged / "train.jsonl").write_text('{"query": "q"}\n')
    (staged / "README.md").write_text("card")
    target = store.upload_export()
    assert str(target) == f"{s3_root}/clean/c1/export"
    assert (target / "train.jsonl").read_text() == '{"query": "q"}\n' and (target / "README.md").exists()
    assert not list(staged.iterdir())

    # fine-tuning reads local files: the complete export is mirrored, once
    from flows.finetune import resolve_export
    from storage.corpus import mirror_exports

    local = tmp_path / "local"
    assert mirror_exports(s3_root, local) == ["c1"]
    assert (local / "clean/c1/export/train.jsonl").read_text() == '{"query": "q"}\n'
    with pytest.raises(Exception, match="train.parquet"):  # this tiny export has no train.parquet
        resolve_export(local, "c1")
    (target / "train.parquet").write_bytes((s3_root / "clean/c1/valid.parquet").read_bytes())
    mirror_exports(s3_root, local)
    assert resolve_export(local, None)[0] == "c1"
    assert mirror_exports(tmp_path / "plain-folder", local) == []  # local storage: nothing to mirror

    from tasks.cleaning.report import write_report

    write_report(Catalog(s3_root), "c1", store.report_path)
    assert b"<html" in store.report_path.read_bytes()[:200].lower()


# --- catalog and CLI over S3 ------------------------------------------------------------------------


def test_catalog_and_readme_queries_on_s3(s3_root):
    catalog = Catalog(s3_root)
    assert catalog.path is None  # no catalog file on S3
    assert catalog.query("SELECT count(*) AS n FROM raw").column("n")[0].as_py() == 0  # empty views
    write_small_store(s3_root)
    assert catalog.refresh()["raw"] is True
    assert catalog.run_ids() == ["r1"] and catalog.clean_ids() == ["c1"]
    assert catalog.query("SELECT DISTINCT clean_id FROM mined").column(0).to_pylist() == ["c1"]
    assert catalog.query("SELECT run_id, count(*) AS n FROM instructions GROUP BY 1").to_pylist() == [
        {"run_id": "r1", "n": 3}
    ]
    check_readme_queries(catalog)


def test_cli_query_over_s3_shards(s3_endpoint, tmp_path):
    prefix = uuid.uuid4().hex[:10]
    settings = load_settings(storage={"data_dir": f"s3://{BUCKET}/{prefix}", "endpoint_url": s3_endpoint})
    write_small_store(data_root(settings.storage))
    env = {
        **AWS_ENV,
        "EMBED_FACTORY_STORAGE__DATA_DIR": f"s3://{BUCKET}/{prefix}",
        "EMBED_FACTORY_STORAGE__ENDPOINT_URL": s3_endpoint,
    }
    out = tmp_path / "by_task.csv"
    sql = "SELECT task_type, count(*) AS n FROM raw GROUP BY ALL ORDER BY n DESC, task_type"
    for args in ([sql], [sql, "--out", str(out)]):
        proc = cli("query", *args, env=env, cwd=tmp_path, timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert "retrieval" in proc.stdout or out.exists()
    assert out.read_text().splitlines() == ["task_type,n", "retrieval,3", "classification,1", "sts,1"]
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "data").exists()  # nothing written locally
    # wrong credentials: one clear line, no traceback
    bad = {**env, "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_ACCESS_KEY_ID": "wrong"}
    bad["EMBED_FACTORY_STORAGE__DATA_DIR"] = "s3://no-such-bucket-here/x"
    proc = cli("query", sql, env=bad, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr


# --- settings ---------------------------------------------------------------------------------------


def test_s3_settings_keep_credentials_secret(monkeypatch, s3_endpoint):
    monkeypatch.setenv("EMBED_FACTORY_STORAGE__DATA_DIR", f"s3://{BUCKET}/p/")
    monkeypatch.setenv("EMBED_FACTORY_STORAGE__ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("EMBED_FACTORY_STORAGE__ACCESS_KEY_ID", "AKIA-visible-nowhere")
    monkeypatch.setenv("EMBED_FACTORY_STORAGE__SECRET_ACCESS_KEY", "very-secret-value")
    settings = load_settings()
    assert settings.storage.data_dir == f"s3://{BUCKET}/p"
    for text in (
        settings.model_dump_json(),
        repr(settings),
        str(settings.model_dump()),
        repr(data_root(settings.storage)),
        str(data_root(settings.storage)),
    ):
        assert "very-secret-value" not in text and "AKIA-visible-nowhere" not in text
    assert settings.storage.storage_options()["secret"] == "very-secret-value"  # in memory, for s3fs
    assert str(data_root(settings.storage)) == f"s3://{BUCKET}/p"
    with pytest.raises(ValueError, match="unsupported storage URL"):
        load_settings(storage={"data_dir": "gs://bucket/x"})
    with pytest.raises(ValueError, match="names no bucket"):
        load_settings(storage={"data_dir": "s3://"})
    assert data_root(load_settings(storage={"data_dir": "data"}).storage) == Path("data")
