"""The store on S3: shards, manifest, run lock, clean-stage tables, export, catalog and the CLI's
``query``, against a real S3 API (moto's server mode on 127.0.0.1, as s3fs's own tests use)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
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
moto_server = pytest.importorskip("moto.server")

from ground.settings import load_settings  # noqa: E402
from storage.catalog import Catalog  # noqa: E402
from storage.corpus import CleanStore, StageResult  # noqa: E402
from storage.location import as_store_path, data_root, is_remote  # noqa: E402
from storage.schemas import BRAINSTORM_SCHEMA, EXAMPLE_SCHEMA, INSTRUCTION_SCHEMA, REJECT_SCHEMA  # noqa: E402
from storage.shards import RemoteLock, RunLocked, RunStore, StorageError, list_runs  # noqa: E402
from test_catalog import check_readme_queries, row_for, write_small_store  # noqa: E402

BUCKET = "factory-test"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "test-key-id",
    "AWS_SECRET_ACCESS_KEY": "test-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def endpoint():
    """A moto S3 server on a free local port, with the test bucket; credentials from the environment."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in AWS_ENV.items():
            mp.setenv(key, value)
        for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
            mp.delenv(key, raising=False)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        import s3fs

        s3fs.S3FileSystem(endpoint_url=url, skip_instance_cache=True).mkdir(BUCKET)
        try:
            yield url
        finally:
            server.stop()


@pytest.fixture
def root(endpoint):
    """A fresh s3:// prefix for one test, as the stores get it from settings."""
    return as_store_path(f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}", {"endpoint_url": endpoint})


def keys(root) -> list[str]:
    """Every object under ``root``, relative to it."""
    prefix = root.path + "/"
    return sorted(k[len(prefix) :] for k in root.fs.find(root.path))


def example_rows(shard: str, n: int) -> list[dict]:
    return [
        row_for(EXAMPLE_SCHEMA, example_id=f"r:{shard}-{i}", run_id="r", shard_id=shard, query=f"q{i}")
        for i in range(n)
    ]


# --- run store ---------------------------------------------------------------------------------


def test_run_store_round_trip_on_s3(root):
    assert is_remote(root)
    store = RunStore(root, "r")
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
    assert list_runs(root) == ["r"]
    # final keys only: nothing temporary was ever written to the bucket
    assert keys(root) == sorted(
        [
            "runs/r/brainstorm/b00.parquet",
            "runs/r/examples/g00.parquet",
            "runs/r/examples/g01.parquet",
            "runs/r/instructions.parquet",
            "runs/r/manifest.json",
            "runs/r/personas.jsonl",
            "runs/r/rejects/b00.parquet",
            "runs/r/rejects/g00.parquet",
            "runs/r/rejects/g01.parquet",
            "runs/r/run.json",
        ]
    )


def test_a_failed_shard_write_commits_nothing_on_s3(root):
    store = RunStore(root, "r")
    bad = example_rows("g00", 2)
    del bad[1]["query"]
    with pytest.raises(KeyError):
        store.write_shard("examples", "g00", bad, [])
    assert not store.is_complete("examples", "g00")
    assert "runs/r/examples/g00.parquet" not in keys(root) and store.manifest() == {}


def test_manifest_lost_after_the_data_object_is_recovered_on_s3(root):
    store = RunStore(root, "r")
    store.write_shard("examples", "g00", example_rows("g00", 4), [])
    store.manifest_path.unlink()  # as if the process died between the data PUT and the manifest PUT
    fresh = RunStore(root, "r")
    assert fresh.is_complete("examples", "g00")
    assert fresh.manifest()["examples/g00"]["rows"] == 4


def test_corrupt_shard_on_s3_is_a_storage_error_naming_it(root):
    store = RunStore(root, "r")
    store.shard_path("examples", "g00").write_bytes(b"not parquet")
    with pytest.raises(StorageError, match=r"s3://.*g00\.parquet: unreadable Parquet"):
        store.read_kind("examples")


# --- the run lock on S3 --------------------------------------------------------------------------


def test_second_writer_of_a_run_is_refused_on_s3(root):
    first, second = RunStore(root, "r"), RunStore(root, "r")
    with first.exclusive():
        with pytest.raises(RunLocked, match="is being written by"):
            with second.exclusive():
                pass
        assert "runs/r/.lock" in keys(root)
    assert "runs/r/.lock" not in keys(root)  # released
    with second.exclusive():  # and free again
        pass


def test_second_writer_of_a_clean_run_is_refused_on_s3(root):
    from storage.corpus import CleanLocked

    with CleanStore(root, "c1").exclusive():
        with pytest.raises(CleanLocked, match="clean run 'c1' is being written by .*--clean-id"):
            with CleanStore(root, "c1").exclusive():
                pass
    with CleanStore(root, "c1").exclusive():  # released
        pass


def test_heartbeat_keeps_the_lock_and_a_stale_lock_is_taken_over(root):
    path = root / "runs" / "r" / ".lock"
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
        RunStore(root, "r").exclusive().__enter__()
    # a dead process on this host is not waited for
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_bytes(
        json.dumps(
            {"owner": "y", "host": socket.gethostname(), "pid": int(dead.stdout), "expires_at": time.time() + 60}
        ).encode()
    )
    with RunStore(root, "r").exclusive():
        pass


# --- clean store, embedding cache, export, report -------------------------------------------------


def test_clean_store_on_s3(root, tmp_path):
    from tasks.cleaning.embed import EmbeddingCache

    store = CleanStore(root, "c1")
    assert not store.has("valid")
    store.write_inputs(["r"])
    kept = pa.Table.from_pylist(example_rows("g00", 3), schema=EXAMPLE_SCHEMA)
    store.write_stage("valid", StageResult(kept, StageResult.dropped_rows([])), drop_stage="validate")
    assert store.has("valid") and store.count(store.stage_path("valid")) == 3
    assert store.read_stage("valid", EXAMPLE_SCHEMA).equals(kept)
    assert store.read_stage("valid").num_rows == 3
    assert [p.stem for p in (store.root / "dropped").glob("*.parquet")] == ["validate"]

    cache = EmbeddingCache(store.embeddings_dir("model/x"))
    cache.add(["h1", "h2"], np.eye(2, dtype=np.float32))
    again = EmbeddingCache(store.embeddings_dir("model/x"))
    assert len(again) == 2 and "h2" in again

    # the export is staged locally (the exporters stream into files), then uploaded card last
    staged = store.export_dir
    assert not is_remote(staged)
    staged.mkdir(parents=True, exist_ok=True)
    (staged / "train.jsonl").write_text('{"query": "q"}\n')
    (staged / "README.md").write_text("card")
    target = store.upload_export()
    assert str(target) == f"{root}/clean/c1/export"
    assert (target / "train.jsonl").read_text() == '{"query": "q"}\n' and (target / "README.md").exists()
    assert not list(staged.iterdir())

    # fine-tuning reads local files: the complete export is mirrored, once
    from flows.finetune import resolve_export
    from storage.corpus import mirror_exports

    local = tmp_path / "local"
    assert mirror_exports(root, local) == ["c1"]
    assert (local / "clean/c1/export/train.jsonl").read_text() == '{"query": "q"}\n'
    with pytest.raises(Exception, match="train.parquet"):  # this tiny export has no train.parquet
        resolve_export(local, "c1")
    (target / "train.parquet").write_bytes((root / "clean/c1/valid.parquet").read_bytes())
    mirror_exports(root, local)
    assert resolve_export(local, None)[0] == "c1"
    assert mirror_exports(tmp_path / "plain-folder", local) == []  # local storage: nothing to mirror

    from tasks.cleaning.report import write_report

    write_report(Catalog(root), "c1", store.report_path)
    assert b"<html" in store.report_path.read_bytes()[:200].lower()


# --- catalog and CLI over S3 ------------------------------------------------------------------------


def test_catalog_and_readme_queries_on_s3(root):
    catalog = Catalog(root)
    assert catalog.path is None  # no catalog file on S3
    assert catalog.query("SELECT count(*) AS n FROM raw").column("n")[0].as_py() == 0  # empty views
    write_small_store(root)
    assert catalog.refresh()["raw"] is True
    assert catalog.run_ids() == ["r1"] and catalog.clean_ids() == ["c1"]
    assert catalog.query("SELECT DISTINCT clean_id FROM mined").column(0).to_pylist() == ["c1"]
    assert catalog.query("SELECT run_id, count(*) AS n FROM instructions GROUP BY 1").to_pylist() == [
        {"run_id": "r1", "n": 3}
    ]
    check_readme_queries(catalog)


def test_cli_query_over_s3_shards(endpoint, tmp_path):
    prefix = uuid.uuid4().hex[:10]
    settings = load_settings(storage={"data_dir": f"s3://{BUCKET}/{prefix}", "endpoint_url": endpoint})
    write_small_store(data_root(settings.storage))
    env = {
        **os.environ,
        **AWS_ENV,
        "EMBED_FACTORY_STORAGE__DATA_DIR": f"s3://{BUCKET}/{prefix}",
        "EMBED_FACTORY_STORAGE__ENDPOINT_URL": endpoint,
    }
    out = tmp_path / "by_task.csv"
    sql = "SELECT task_type, count(*) AS n FROM raw GROUP BY ALL ORDER BY n DESC, task_type"
    for args in ([sql], [sql, "--out", str(out)]):
        proc = subprocess.run(
            [sys.executable, "-m", "embed_factory.cli", "query", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
    assert "retrieval" in proc.stdout or out.exists()
    assert out.read_text().splitlines() == ["task_type,n", "retrieval,3", "classification,1", "sts,1"]
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "data").exists()  # nothing written locally
    # wrong credentials: one clear line, no traceback
    bad = {**env, "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_ACCESS_KEY_ID": "wrong"}
    bad["EMBED_FACTORY_STORAGE__DATA_DIR"] = "s3://no-such-bucket-here/x"
    proc = subprocess.run(
        [sys.executable, "-m", "embed_factory.cli", "query", sql],
        env=bad,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr


# --- settings ---------------------------------------------------------------------------------------


def test_s3_settings_keep_credentials_secret(monkeypatch, endpoint):
    monkeypatch.setenv("EMBED_FACTORY_STORAGE__DATA_DIR", f"s3://{BUCKET}/p/")
    monkeypatch.setenv("EMBED_FACTORY_STORAGE__ENDPOINT_URL", endpoint)
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


# --- the clean flow end to end on S3 -----------------------------------------------------------------


def test_clean_flow_on_s3(prefect_api_url, endpoint, monkeypatch, tmp_path):
    """Shards written to S3 by RunStore are cleaned by the real flow; every output lands in the bucket."""
    from flows.clean import clean
    from test_clean_flow import TOPICS, example

    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}"
    for key, value in {
        "EMBED_FACTORY_STORAGE__DATA_DIR": url,
        "EMBED_FACTORY_STORAGE__ENDPOINT_URL": endpoint,
        "EMBED_FACTORY_CLEAN__NEGATIVES_PER_QUERY": "2",
        "EMBED_FACTORY_CLEAN__NEGATIVE_RANK_MIN": "1",
        "EMBED_FACTORY_CLEAN__NEGATIVE_RANK_MAX": "10",
        "EMBED_FACTORY_CLEAN__RANK_TOP_K": "3",
        **AWS_ENV,
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    root = data_root(load_settings().storage)
    rows = [example("run-a", i, q, p, negative=TOPICS[(i + 1) % len(TOPICS)][1]) for i, (q, p) in enumerate(TOPICS)]
    rows.append(example("run-a", 90, "", "An empty query must be dropped by validation."))
    RunStore(root, "run-a").write_shard("examples", "g00-00000", rows, [])

    summary = clean(clean_id="c-s3")
    assert summary["counts"]["raw"] == 7 and summary["counts"]["mined"] > 0
    assert summary["export_dir"] == f"{url}/clean/c-s3/export"
    store = CleanStore(root, "c-s3")
    names = set(keys(root))
    for stage in ("valid", "deduped", "filtered", "mined"):
        assert f"clean/c-s3/{stage}.parquet" in names
    assert {"clean/c-s3/export/train.parquet", "clean/c-s3/export/README.md", "clean/c-s3/report.html"} <= names
    assert any(name.startswith("embeddings/") for name in names)  # the vector cache is on S3 too
    assert store.count(store.stage_path("mined")) == summary["counts"]["mined"]
    catalog = Catalog(root)
    assert catalog.query("SELECT reason FROM dropped WHERE clean_id = 'c-s3' AND stage = 'validate'").column(
        0
    ).to_pylist() == ["empty_query"]
    assert not (tmp_path / "data").exists()  # nothing went to a local data folder
    # a second run resumes: every stage table is already in the bucket
    modified = store.stage_path("valid").stat().st_mtime
    assert clean(clean_id="c-s3")["counts"] == summary["counts"]
    assert store.stage_path("valid").stat().st_mtime == modified


@pytest.mark.llm
def test_generate_flow_writes_its_run_to_s3(llm_base_url, prefect_api_url, endpoint, monkeypatch, tmp_path):
    """The real generate flow (embedded vLLM) with an s3:// data dir: shards, manifest, lineage in the bucket."""
    import asyncio

    from flows.generate import generate

    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}"
    for key, value in {
        "EMBED_FACTORY_STORAGE__DATA_DIR": url,
        "EMBED_FACTORY_STORAGE__ENDPOINT_URL": endpoint,
        "EMBED_FACTORY_GENERATION__SHARD_SIZE": "3",
        **AWS_ENV,
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    summary = asyncio.run(generate(run_id="s3-run", examples=6, seed=11, task_types=["retrieval", "sts"]))
    root = data_root(load_settings().storage)
    store = RunStore(root, "s3-run")
    examples = store.read_kind("examples")
    assert examples.num_rows == sum(summary["examples_by_type"].values()) > 0
    manifest = store.manifest()
    names = set(keys(root))
    for entry in manifest.values():  # every manifest entry is an object of that size in the bucket
        key = f"runs/s3-run/{entry['kind']}/{entry['shard_id']}.parquet"
        assert key in names and (root / key).stat().st_size == entry["bytes"]
    assert {"runs/s3-run/run.json", "runs/s3-run/personas.jsonl", "runs/s3-run/instructions.parquet"} <= names
    assert "runs/s3-run/.lock" not in names  # released
    assert Catalog(root).query("SELECT count(*) AS n FROM raw").column("n")[0].as_py() == examples.num_rows
    assert not (tmp_path / "data" / "runs").exists()


def test_a_promoted_model_is_uploaded_next_to_the_export_summary_last(root, tmp_path, monkeypatch):
    from storage.models import SUMMARY_FILE, ModelStore

    final_dir = tmp_path / "models" / "all-MiniLM-L6-v2-clean-1"
    (final_dir / "1_Pooling").mkdir(parents=True)
    files = {"model.safetensors": b"weights", "1_Pooling/config.json": b"{}", "eval.json": b"{}", SUMMARY_FILE: b"{}"}
    for name, data in files.items():
        (final_dir / name).write_bytes(data)
    puts = []
    import storage.models as models

    real_put = models.put_bytes
    monkeypatch.setattr(models, "put_bytes", lambda path, data: puts.append(path.name) or real_put(path, data))

    assert ModelStore(tmp_path).publish(final_dir) is None  # local storage: nothing to upload
    store = ModelStore(tmp_path, remote_root=root)
    url = store.publish(final_dir)
    assert url == store.published_url(final_dir) == f"{root}/models/{final_dir.name}"
    assert keys(root) == sorted(f"models/{final_dir.name}/{name}" for name in files)
    assert puts[-1] == SUMMARY_FILE  # the commit point goes last
    assert (root / "models" / final_dir.name / "model.safetensors").read_bytes() == b"weights"
