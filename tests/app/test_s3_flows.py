"""The flows on S3, against a real S3 API (``s3_server.py``): the clean flow end to end, the generate
flow's run (embedded vLLM), and a promoted model uploaded next to the export."""

from __future__ import annotations

import uuid

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from ground.settings import load_settings  # noqa: E402
from storage.catalog import Catalog  # noqa: E402
from storage.corpus import CleanStore  # noqa: E402
from storage.location import data_root  # noqa: E402
from storage.shards import RunStore  # noqa: E402
from support.s3_server import AWS_ENV, BUCKET, keys  # noqa: E402


def test_clean_flow_on_s3(prefect_api_url, s3_endpoint, monkeypatch, tmp_path):
    """Shards written to S3 by RunStore are cleaned by the real flow; every output lands in the bucket."""
    from flows.clean import clean
    from support.rows import TOPICS, example

    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}"
    for key, value in {
        "EMBED_FACTORY_STORAGE__DATA_DIR": url,
        "EMBED_FACTORY_STORAGE__ENDPOINT_URL": s3_endpoint,
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
    assert summary.counts["raw"] == 7 and summary.counts["mined"] > 0
    assert summary.export_dir == f"{url}/clean/c-s3/export"
    store = CleanStore(root, "c-s3")
    names = set(keys(root))
    for stage in ("valid", "deduped", "filtered", "mined"):
        assert f"clean/c-s3/{stage}.parquet" in names
    assert {"clean/c-s3/export/train.parquet", "clean/c-s3/export/README.md", "clean/c-s3/report.html"} <= names
    assert any(name.startswith("embeddings/") for name in names)  # the vector cache is on S3 too
    assert store.count(store.stage_path("mined")) == summary.counts["mined"]
    catalog = Catalog(root)
    assert catalog.query("SELECT reason FROM dropped WHERE clean_id = 'c-s3' AND stage = 'validate'").column(
        0
    ).to_pylist() == ["empty_query"]
    assert not (tmp_path / "data").exists()  # nothing went to a local data folder
    # a second run resumes: every stage table is already in the bucket
    modified = store.stage_path("valid").stat().st_mtime
    assert clean(clean_id="c-s3").counts == summary.counts
    assert store.stage_path("valid").stat().st_mtime == modified


def test_generate_flow_writes_its_run_to_s3(stub_llm_env, prefect_api_url, s3_endpoint, monkeypatch, tmp_path):
    """The real generate flow with an s3:// data dir: shards, manifest, lineage in the bucket (the stub LLM:
    storage is the subject here; real generation is covered by tests/generation/test_generate_flow.py)."""
    import asyncio

    from flows.generate import generate

    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}"
    for key, value in {
        "EMBED_FACTORY_STORAGE__DATA_DIR": url,
        "EMBED_FACTORY_STORAGE__ENDPOINT_URL": s3_endpoint,
        "EMBED_FACTORY_GENERATION__SHARD_SIZE": "3",
        **AWS_ENV,
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    summary = asyncio.run(generate(run_id="s3-run", examples=6, seed=11, task_types=["retrieval", "sts"]))
    root = data_root(load_settings().storage)
    store = RunStore(root, "s3-run")
    examples = store.read_kind("examples")
    assert examples.num_rows == sum(summary.examples_by_type.values()) > 0
    manifest = store.manifest()
    names = set(keys(root))
    for entry in manifest.values():  # every manifest entry is an object of that size in the bucket
        key = f"runs/s3-run/{entry['kind']}/{entry['shard_id']}.parquet"
        assert key in names and (root / key).stat().st_size == entry["bytes"]
    assert {"runs/s3-run/run.json", "runs/s3-run/personas.jsonl", "runs/s3-run/instructions.parquet"} <= names
    assert "runs/s3-run/.lock" not in names  # released
    assert Catalog(root).query("SELECT count(*) AS n FROM raw").column("n")[0].as_py() == examples.num_rows
    assert not (tmp_path / "data" / "runs").exists()


def test_a_promoted_model_is_uploaded_next_to_the_export_summary_last(s3_root, tmp_path, monkeypatch):
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
    store = ModelStore(tmp_path, remote_root=s3_root)
    url = store.publish(final_dir)
    assert url == store.published_url(final_dir) == f"{s3_root}/models/{final_dir.name}"
    assert keys(s3_root) == sorted(f"models/{final_dir.name}/{name}" for name in files)
    assert puts[-1] == SUMMARY_FILE  # the commit point goes last
    assert (s3_root / "models" / final_dir.name / "model.safetensors").read_bytes() == b"weights"
