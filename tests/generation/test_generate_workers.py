"""One generation run over the worker processes of a real Dask ``LocalCluster``, against the stub LLM.

* the run on 2 workers writes what the single-process run of the same settings writes (every row and
  reject, content hashes without wall-clock columns; the manifest's counts), the cluster ran the example
  shards on both workers, and a clean over each gives byte-identical exports;
* a worker SIGKILLed in the middle of a shard commit (its rejects written, its data file not) loses and
  doubles nothing: the resumed run equals the single-process run;
* the base URLs are shared out over the workers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from storage.schemas import LEDGER_WALL_CLOCK_COLUMNS
from storage.shards import RunStore
from tasks.generation.workers import endpoint_share

RUN = "spread"
VOLATILE = {"created_at", "latency_s", *LEDGER_WALL_CLOCK_COLUMNS}


def snapshot(data: Path) -> dict[str, str]:
    """file → content hash of a generation run (wall-clock columns left out; manifest entries as their counts)."""
    root = data / "runs" / RUN
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or path.name.startswith(".") or rel.startswith("claims/"):
            continue
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            keep = [c for c in table.column_names if c not in VOLATILE]
            blob = json.dumps(table.select(keep).to_pylist(), default=str, sort_keys=True)
        elif rel.startswith("manifest.d/"):
            entry = json.loads(path.read_text())
            blob = json.dumps([entry["rows"], entry["rejects"]])
        else:
            blob = path.read_text()
        out[rel] = hashlib.sha256(blob.encode()).hexdigest()
    return out


@pytest.fixture
def tiny_run(stub_llm_env, prefect_api_url, monkeypatch):
    """Settings of a tiny run on the stub: 12 examples of 2 types, 2 per shard (6 example shards), text dedup."""
    for key, value in {
        "GENERATION__EXAMPLES": "12",
        "GENERATION__TASK_TYPES": '["retrieval", "sts"]',
        "GENERATION__SHARD_SIZE": "2",
        "GENERATION__SEED": "5",
        "GENERATION__MAX_TOPUP_ROUNDS": "0",
        "GENERATION__INTENT_THRESHOLD": "null",  # no embedding model to load: the subject is the shards
        "PERSONAS__LIMIT": "30",
        "LLM__MAX_RETRIES": "1",
        "CLEAN__CHECK_LANGUAGE": "false",
        "CLEAN__RANK_TOP_K": "10",
        "CLEAN__NEGATIVE_RANK_MIN": "1",
        "CLEAN__NEGATIVE_RANK_MAX": "10",
    }.items():
        monkeypatch.setenv(f"EMBED_FACTORY_{key}", value)
    return monkeypatch


def _generate(monkeypatch, data: Path, address: str | None = None) -> dict:
    from flows.generate import generate

    monkeypatch.setenv("EMBED_FACTORY_STORAGE__DATA_DIR", str(data))
    if address:
        monkeypatch.setenv("EMBED_FACTORY_GENERATION__TASK_RUNNER", "dask")
        monkeypatch.setenv("EMBED_FACTORY_GENERATION__DASK_ADDRESS", address)
    else:
        monkeypatch.delenv("EMBED_FACTORY_GENERATION__TASK_RUNNER", raising=False)
    return asyncio.run(generate(run_id=RUN))


def _export(monkeypatch, data: Path) -> dict[str, str]:
    from flows.clean import clean

    monkeypatch.setenv("EMBED_FACTORY_STORAGE__DATA_DIR", str(data))
    monkeypatch.delenv("EMBED_FACTORY_GENERATION__TASK_RUNNER", raising=False)
    clean(clean_id="c")
    export = data / "clean" / "c" / "export"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(export.glob("*.jsonl"))}


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.run(__import__, "tasks.generation.workers")  # the workers' imports, once per module, not per test
        yield cluster, client


def test_a_run_on_two_worker_processes_equals_the_single_process_run(tiny_run, cluster, tmp_path):
    import distributed
    from dask.utils import key_split

    local, client = cluster
    single = _generate(tiny_run, tmp_path / "single")
    with distributed.get_task_stream(client=client) as stream:
        spread = _generate(tiny_run, tmp_path / "spread", local.scheduler_address)
    ran = [(key_split(t["key"]), t["worker"]) for t in stream.data if t["status"] == "OK"]
    shards = [k for k in snapshot(tmp_path / "single") if k.startswith("examples/")]
    assert len(shards) == 6 and sorted(n for n, _ in ran) == ["run_example_shard_on_worker"] * len(shards), ran
    assert len({worker for _, worker in ran}) == 2, "both workers ran example shards"

    assert spread.examples_by_type == single.examples_by_type and spread.rejects == single.rejects
    assert single.rejects > 0, "the stub's invalid answers end in the rejects"
    assert spread.llm_calls == single.llm_calls, "the workers' client counters are added up"
    assert snapshot(tmp_path / "spread") == snapshot(tmp_path / "single")
    assert _export(tiny_run, tmp_path / "spread") == _export(tiny_run, tmp_path / "single")


def test_a_worker_killed_mid_shard_loses_and_doubles_nothing(tiny_run, cluster, tmp_path):
    from ground import faults

    local, client = cluster
    _generate(tiny_run, tmp_path / "single")
    victim = sorted(client.scheduler_info()["workers"])[0]
    # that worker process (only it) SIGKILLs itself at its first shard commit: rejects written, data file not
    client.run(faults.arm, "shard.rejects:1", workers=[victim])
    pids = client.run(lambda: __import__("os").getpid())
    try:
        _generate(tiny_run, tmp_path / "spread", local.scheduler_address)
    except Exception as exc:  # noqa: BLE001 - the flow may fail with its worker: then the run is resumed
        print(f"first session failed: {exc!r}")
        _generate(tiny_run, tmp_path / "spread", local.scheduler_address)
    client.wait_for_workers(2, timeout=60)
    now = client.run(lambda: __import__("os").getpid())
    assert pids[victim] not in now.values(), "the armed worker was killed (and replaced)"
    store = RunStore(tmp_path / "spread", RUN)
    ids = store.read_kind("examples")["example_id"].to_pylist()
    generate_rejects = [r["example_id"] for r in store.read_kind("rejects").to_pylist() if r["stage"] == "generate"]
    assert len(ids + generate_rejects) == len(set(ids + generate_rejects)), "no example recorded twice"
    assert snapshot(tmp_path / "spread") == snapshot(tmp_path / "single")


def test_each_worker_gets_its_share_of_the_base_urls():
    urls = [f"http://vllm-{i}:8000/v1" for i in range(7)]
    shares = [endpoint_share(urls, i, 3) for i in range(3)]
    assert sorted(u for share in shares for u in share) == sorted(urls)
    assert [len(s) for s in shares] == [3, 2, 2]
    assert endpoint_share(urls, 4, 3) == shares[1], "shard 4 of 3 workers is in share 1"
    few = [endpoint_share(urls[:2], i, 3) for i in range(3)]  # more workers than endpoints: one each, round-robin
    assert few == [[urls[0]], [urls[1]], [urls[0]]]
