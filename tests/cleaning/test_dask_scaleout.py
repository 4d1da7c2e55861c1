"""Scale-out of the clean flow's CPU-heavy stages on Dask (prefect-dask): same output as threads.

* near-dedup split per task type and merged equals near-dedup of the whole table (no cluster);
* the runner settings build the DaskTaskRunner they name (no cluster);
* the clean flow on a two-worker ``LocalCluster`` (processes, one thread each) writes exactly what the
  thread runner writes (row counts and content hashes of every stage table, dropped file and export),
  and the cluster really ran the mapped tasks, on both workers.
"""

from __future__ import annotations

import hashlib
import json
import random

import pyarrow.parquet as pq
import pytest

from ground.settings import CleanSettings
from storage.corpus import CleanStore
from storage.schemas import LEDGER_WALL_CLOCK_COLUMNS
from storage.shards import RunStore
from support.dedup_rows import make_example, near_rows, one_word_changed, table_of, text_of
from support.rows import TOPICS, example
from tasks.cleaning.dedup import merge_near_parts, near_dedup, near_dedup_part, split_by_task_type


def test_near_dedup_per_task_type_merges_to_the_global_result():
    cfg = CleanSettings()
    rows = near_rows() + [
        make_example("l1", "long_long", query=text_of(40, seed=40), positive=text_of(60, seed=41)),
        make_example(
            "l0",
            "long_long",
            query=one_word_changed(text_of(40, seed=40), 5, "telescope"),
            positive=one_word_changed(text_of(60, seed=41), 7, "telescope"),
        ),
        make_example("c1", "classification", query=text_of(30, seed=50), positive="positive"),
    ]
    for seed in range(3):
        random.Random(seed).shuffle(rows)
        table = table_of(rows)
        whole = near_dedup(table, cfg)
        parts = split_by_task_type(table)
        assert list(parts) == sorted(parts) and len(parts) == 4
        merged = merge_near_parts(table, [near_dedup_part(p, cfg) for p in parts.values()])
        assert whole.dropped.num_rows >= 3, "the data has near-duplicates in several task types"
        assert merged.kept.equals(whole.kept) and merged.dropped.equals(whole.dropped)
        assert merged.kept.schema == table.schema
    empty = table_of([])
    assert (
        merge_near_parts(empty, [near_dedup_part(p, cfg) for p in split_by_task_type(empty).values()]).kept.num_rows
        == 0
    )


def test_runner_settings_build_the_named_dask_runner():
    from prefect_dask import DaskTaskRunner

    from flows.runners import stage_runner

    with stage_runner(CleanSettings(task_runner="dask", dask_workers=3)) as runner:  # the cluster starts lazily
        assert isinstance(runner, DaskTaskRunner) and runner.address is None
        assert runner.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 1, "processes": True}
    with stage_runner(CleanSettings(task_runner="dask", dask_address="tcp://10.0.0.5:8786")) as runner:
        assert runner.address == "tcp://10.0.0.5:8786"
    with pytest.raises(ValueError):
        CleanSettings(task_runner="ray")


# --- the clean flow on threads vs a two-worker LocalCluster ---------------------------------------
def make_runs(data_dir) -> None:
    """Two runs, four shards, retrieval and long_long rows, with invalid rows, exact and near duplicates."""
    n = len(TOPICS)
    for run_id, shards in (("run-a", 3), ("run-b", 1)):
        for s in range(shards):
            rows = []
            for i, (query, positive) in enumerate(TOPICS):
                k = 10 * s + i
                task_type = "retrieval" if (i + s) % 2 else "long_long"
                q = query if s == 0 else f"{query} (variant {k} about {text_of(4, seed=k)})"
                rows.append(
                    example(
                        run_id, k, q, positive + f" Note {k}.", negative=TOPICS[(i + 1) % n][1], task_type=task_type
                    )
                )
            rows.append(example(run_id, 90 + s, "", "An empty query is dropped by validation."))
            if run_id == "run-b":  # a cross-run exact duplicate and a near-duplicate query
                rows.append(
                    example(
                        run_id, 95, TOPICS[1][0].upper(), TOPICS[1][1] + " Note 1.", TOPICS[2][1], task_type="retrieval"
                    )
                )
                rows.append(
                    example(
                        run_id, 96, f"{TOPICS[5][0]} {TOPICS[5][0]}", TOPICS[4][1] + " Note 96.", task_type="retrieval"
                    )
                )
            RunStore(data_dir, run_id).write_shard("examples", f"g00-{s:05d}", rows, [])


def fingerprint(store: CleanStore) -> dict[str, tuple[int, str]]:
    """(rows, sha256 of the content) of every stage table, dropped file and export file."""
    out = {}
    for path in sorted(list(store.root.glob("*.parquet")) + list((store.root / "dropped").glob("*.parquet"))):
        table = pq.read_table(path)
        if path.name == "ledger.parquet":  # the cost ledger: its clock columns and own id differ by nature
            table = table.drop_columns([*LEDGER_WALL_CLOCK_COLUMNS, "created_at", "clean_id"])
        blob = json.dumps(table.to_pylist(), default=str, sort_keys=True).encode()
        out[path.relative_to(store.root).as_posix()] = (table.num_rows, hashlib.sha256(blob).hexdigest())
    for name in ("train.jsonl", "heldout.jsonl"):
        data = (store.export_dir / name).read_bytes()
        out[f"export/{name}"] = (data.count(b"\n"), hashlib.sha256(data).hexdigest())
    return out


def test_clean_flow_on_dask_equals_threads(prefect_api_url, data_dir, monkeypatch):
    distributed = pytest.importorskip("distributed")
    from dask.utils import key_split

    from flows.clean import clean

    make_runs(data_dir)
    for key, value in {
        "NEGATIVES_PER_QUERY": "2",
        "NEGATIVE_RANK_MIN": "1",
        "NEGATIVE_RANK_MAX": "10",
        "RANK_TOP_K": "3",
    }.items():
        monkeypatch.setenv(f"EMBED_FACTORY_CLEAN__{key}", value)

    threads = clean(clean_id="c-thread")

    with (
        distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        monkeypatch.setenv("EMBED_FACTORY_CLEAN__TASK_RUNNER", "dask")
        monkeypatch.setenv("EMBED_FACTORY_CLEAN__DASK_ADDRESS", cluster.scheduler_address)
        monkeypatch.setenv("EMBED_FACTORY_CLEAN__SEARCH_BLOCKS", "2")  # the search on the workers too
        with distributed.get_task_stream(client=client) as stream:  # every task the scheduler ran meanwhile
            on_dask = clean(clean_id="c-dask")

    # the cluster ran every mapped task: 4 shard validations, dedup facts of the one batch and the search's one
    # query block (30 queries are one block: blocks are whole search batches), on both workers
    ran = [(key_split(t["key"]), t["worker"]) for t in stream.data if t["status"] == "OK"]
    expected = ["dedup_facts"] + ["search_query_block"] + ["validate_shard"] * 4
    assert sorted(name for name, _ in ran) == expected, ran
    assert len({worker for _, worker in ran}) == 2, ran

    assert on_dask.counts == threads.counts and on_dask.dropped == threads.dropped
    assert threads.counts["raw"] == 30
    assert all(threads.dropped.get(stage) for stage in ("validate", "dedup_exact", "dedup_near")), threads.dropped
    a, b = fingerprint(CleanStore(data_dir, "c-thread")), fingerprint(CleanStore(data_dir, "c-dask"))
    assert a == b
    assert {"valid.parquet", "deduped.parquet", "mined.parquet", "export/train.jsonl"} <= set(a)
