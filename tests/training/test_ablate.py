"""The ablation harness (``flows/ablate.py``, ``tasks/training/ablation.py``) on a small clean run built
without an LLM: the real cleaning code (MiniLM embeddings, exact search, rank filter, mining, export)
over hand-written rows, 8 of which have an off-topic positive that the rank filter drops.

* the variants differ as intended: row counts, negatives, held-out rows left out, the judge variant;
* the whole flow (every variant, 2 seeds, 1 step, STS en on 40 pairs): a table of every variant x dim,
  different seeds give different numbers, re-training one seed gives the same numbers, the files and
  the Prefect artifact (read back from the real server);
* the CLI: a bad --clean-id or --variants is one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ground.settings import CleanSettings, FinetuneSettings
from storage.corpus import CleanStore
from storage.shards import now_utc
from support.rows import tiny_pairs

CLEAN_ID = "c-abl"
N_ROWS, N_OFF_TOPIC = 56, 8
CLEAN_ENV = {"RANK_TOP_K": "5", "NEGATIVE_RANK_MIN": "5", "NEGATIVE_RANK_MAX": "40", "NEGATIVES_PER_QUERY": "2"}
FINETUNE_ENV = {
    "STS_LANGUAGES": '["en"]',
    "STS_MAX_PAIRS": "40",
    "BATCH_SIZE": "8",
    "MAX_SEQ_LENGTH": "64",
    "EVAL_BATCH_SIZE": "32",
    "HARD_NEGATIVES": "2",
    "MATRYOSHKA_DIMS": "[256, 64]",
    "MATRYOSHKA_WEIGHTS": "[1.0, 0.3]",
    # one step must move the model: no warmup (a first warmup step has learning rate 0), a larger rate
    "WARMUP_RATIO": "0",
    "LEARNING_RATE": "1e-4",
}
OFF_TOPIC = "A slow-cooked bean stew needs {n} hours, smoked paprika and a bay leaf; serve it with rye bread."


def deduped_rows() -> list[dict]:
    """EXAMPLE_SCHEMA rows of two task types; the last N_OFF_TOPIC have a positive about something else."""
    rows = []
    for i, (query, positive, negative) in enumerate(tiny_pairs(N_ROWS, seed=23)):
        task_type = "retrieval" if i % 2 else "short_short"
        rows.append(
            {
                "example_id": f"run-a:g00-{task_type}-{i:06d}",
                "run_id": "run-a",
                "shard_id": "g00-00000",
                "task_type": task_type,
                "instruction": "Given a question about looking after an object, retrieve a helpful passage.",
                "query": query,
                "positive": OFF_TOPIC.format(n=i) if i >= N_ROWS - N_OFF_TOPIC else positive,
                "negative": negative,
                "created_at": now_utc(),
            }
        )
    return rows


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """A clean run's stage tables and export, made by the clean stages' own functions."""
    from storage.schemas import EXAMPLE_SCHEMA
    from tasks.cleaning.embed import embed_for_ranking
    from tasks.cleaning.export import export_corpus
    from tasks.cleaning.negatives import filter_and_mine

    data_dir = tmp_path_factory.mktemp("ablate") / "data"
    cfg = CleanSettings(**{k.lower(): int(v) for k, v in CLEAN_ENV.items()}, heldout_fraction=0.1)
    store = CleanStore(data_dir, CLEAN_ID)
    deduped = pa.Table.from_pylist(deduped_rows(), schema=EXAMPLE_SCHEMA)
    store.write_table("deduped", deduped)
    decontaminated = deduped.slice(1)  # the first row matched an eval text: the rank filter never sees it
    store.write_table("decontaminated", decontaminated)
    filtered, mined = filter_and_mine(decontaminated, embed_for_ranking(decontaminated, cfg, store), cfg)
    store.write_table("filtered", filtered.kept)
    store.write_table("mined", mined.kept)
    export_corpus(mined.kept, store.export_dir, cfg)
    return {"data_dir": data_dir, "store": store, "cfg": cfg, "rank_dropped": filtered.dropped.num_rows}


@pytest.fixture
def ablation_env(clean_run, monkeypatch):
    monkeypatch.setenv("EMBED_FACTORY_STORAGE__DATA_DIR", str(clean_run["data_dir"]))
    for section, values in (("CLEAN", CLEAN_ENV), ("FINETUNE", FINETUNE_ENV)):
        for key, value in values.items():
            monkeypatch.setenv(f"EMBED_FACTORY_{section}__{key}", value)
    return clean_run


def _ids(table: pa.Table) -> list[str]:
    return table.column("example_id").to_pylist()


# --- the variants -----------------------------------------------------------------------------------
def test_variants_differ_as_intended(ablation_env, tmp_path):
    from flows.ablate import export_variant, mine_unfiltered, row_sources
    from storage.ablation import example_ids
    from tasks.training.ablation import VARIANTS, AblationError, parse_variants, run_key, variant_rows, variant_settings
    from tasks.training.train import load_training_rows

    store, cfg = ablation_env["store"], ablation_env["cfg"]
    assert ablation_env["rank_dropped"] >= N_OFF_TOPIC // 2, "the rank filter dropped the off-topic rows"
    sources, skipped = row_sources(store, parse_variants(None), cfg)
    assert skipped == {"filtered+judge": "skipped: no judge results"}
    mined, unfiltered = store.read_stage("mined"), sources["unfiltered"]
    assert _ids(sources["filtered"]) == _ids(mined)
    # unfiltered: every row the rank filter read that mining keeps, the rank-dropped ones included; never
    # a contaminated one (in deduped, not in decontaminated)
    assert set(_ids(mined)) < set(_ids(unfiltered)) <= set(_ids(store.read_stage("decontaminated")))
    assert unfiltered.num_rows - mined.num_rows >= ablation_env["rank_dropped"] - 1
    # mined the same way: a row the filter kept has the very negatives it has in mined
    negatives = dict(zip(_ids(unfiltered), unfiltered.column("hard_negatives").to_pylist(), strict=True))
    for eid, negs in zip(_ids(mined), mined.column("hard_negatives").to_pylist(), strict=True):
        assert negatives[eid] == negs
    assert _ids(mine_unfiltered(store.read_stage("decontaminated"), cfg, store)) == _ids(unfiltered), "deterministic"

    heldout = example_ids(store.export_dir / "heldout.parquet")
    assert heldout, "the export holds rows out"
    rows = {
        name: variant_rows(v, sources, heldout)
        for name, v in VARIANTS.items()
        if name in sources or v.source != "judged"
    }
    for name, table in rows.items():
        assert not heldout & set(_ids(table)), f"{name} trains on held-out rows"
    assert rows["unfiltered"].num_rows == unfiltered.num_rows - len(heldout & set(_ids(unfiltered)))

    # filtered = the export as is: the same training records
    filtered_path = export_variant.fn(VARIANTS["filtered"], rows["filtered"], tmp_path / "filtered", cfg)
    assert pq.read_table(filtered_path).to_pylist() == pq.read_table(store.export_dir / "train.parquet").to_pylist()
    # without hard negatives: no negative left, and training sees none
    bare_path = export_variant.fn(VARIANTS["no-hard-negatives"], rows["no-hard-negatives"], tmp_path / "bare", cfg)
    assert all(neg == [] for neg in pq.read_table(bare_path).column("neg").to_pylist())
    finetune = FinetuneSettings(hard_negatives=2)
    assert load_training_rows(filtered_path, finetune.hard_negatives).hard_negatives == 2
    bare_cfg = variant_settings(VARIANTS["no-hard-negatives"], finetune, 1)
    assert bare_cfg.hard_negatives == 0 and load_training_rows(bare_path, bare_cfg.hard_negatives).hard_negatives == 0

    # homogeneous ratio 0 vs 1; with the configured ratio 1, homogeneous-1 is the filtered run itself
    ratio = {name: variant_settings(VARIANTS[name], finetune, 7).homogeneous_ratio for name in VARIANTS}
    assert (ratio["homogeneous-0"], ratio["homogeneous-1"], ratio["filtered"]) == (0.0, 1.0, finetune.homogeneous_ratio)
    same = [run_key(VARIANTS[n], variant_settings(VARIANTS[n], finetune, 7)) for n in ("filtered", "homogeneous-1")]
    assert same[0] == same[1] and run_key(VARIANTS["homogeneous-0"], finetune) != same[0]

    # judge results present: filtered + judge trains on them
    verified = mined.slice(0, mined.num_rows - 3)
    store.write_table("verified", verified)
    try:
        sources, skipped = row_sources(store, parse_variants(["filtered+judge"]), cfg)
        assert skipped == {} and _ids(sources["judged"]) == _ids(verified)
    finally:
        store.stage_path("verified").unlink()
    with pytest.raises(AblationError, match="unknown variant"):
        parse_variants(["filtered", "nope"])


def test_table_has_every_variant_and_dim_with_the_seed_spread():
    from statistics import mean, stdev

    from tasks.training.ablation import BASE, VARIANTS, RunResult, runs_table, summary_table, to_html, to_markdown

    dims = [384, 256, 128, 64]

    def scores(seed: int, k: int) -> dict[int, tuple[float, float]]:
        return {d: (0.5 + 0.01 * k + 0.001 * seed + d / 1e5, 0.3 + 0.02 * k - 0.002 * seed) for d in dims}

    runs = [RunResult(BASE, None, scores(0, 0))]
    runs += [
        RunResult(name, seed, scores(seed, k), train_rows=10 + k)
        for k, name in enumerate(VARIANTS, start=1)
        for seed in (1, 2, 3)
    ]
    table = summary_table(runs_table(runs)).to_pylist()
    assert [(r["variant"], r["dim"]) for r in table] == [(v, d) for v in [BASE, *VARIANTS] for d in dims]
    for row in table:
        k = ([BASE, *VARIANTS]).index(row["variant"])
        seeds = (0,) if row["variant"] == BASE else (1, 2, 3)
        sts = [scores(s, k)[row["dim"]][0] for s in seeds]
        ndcg = [scores(s, k)[row["dim"]][1] for s in seeds]
        assert row["sts_spearman_mean"] == pytest.approx(mean(sts)) and row["heldout_ndcg10_mean"] == pytest.approx(
            mean(ndcg)
        )
        if row["variant"] == BASE:
            assert row["seeds"] == 0 and row["sts_spearman_std"] is None
        else:
            assert row["seeds"] == 3 and row["sts_spearman_std"] == pytest.approx(stdev(sts))
            assert row["heldout_ndcg10_std"] == pytest.approx(stdev(ndcg))
    summary = summary_table(runs_table(runs))
    markdown = to_markdown(summary, "t", ["a note"])
    assert markdown.count("\n| ") == 1 + len(table) and "± " in markdown and "- a note" in markdown
    assert "<script>" not in to_html(summary, "<script>", [])


# --- the flow -----------------------------------------------------------------------------------------
def test_ablate_flow_table_seeds_and_artifact(prefect_api_url, ablation_env, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.ablate import ablate, export_variant, row_sources, train_and_evaluate
    from ground.settings import load_settings
    from storage.ablation import AblationStore, example_ids
    from tasks.training.ablation import VARIANTS, parse_variants, variant_rows, variant_settings

    # every variant x dim is checked on the pure table below; here the variants cheap enough for a test
    # (2 trainings each): homogeneous-1 reuses the filtered runs (the configured ratio is 1), the judge is skipped
    asked = ["filtered", "filtered+judge", "no-hard-negatives", "homogeneous-1"]
    summary = ablate(clean_id=CLEAN_ID, max_steps=1, seeds=2, variants=asked, languages=["en"])
    print(f"ablation: {len(summary.variants)} variants x 2 seeds in {summary.seconds}s")
    trained = ["filtered", "no-hard-negatives", "homogeneous-1"]
    assert summary.variants == trained and summary.skipped == {"filtered+judge": "skipped: no judge results"}
    dims = [384, 256, 64]
    table = summary.table
    assert [(r["variant"], r["dim"]) for r in table] == [(v, d) for v in ["base", *trained] for d in dims]
    for row in table:
        assert row["sts_spearman_mean"] is not None and row["heldout_ndcg10_mean"] is not None
        if row["variant"] != "base":
            assert row["seeds"] == 2 and row["sts_spearman_std"] is not None and row["steps"] == 1
    by_variant = {r["variant"]: r for r in table if r["dim"] == 384}
    assert by_variant["no-hard-negatives"]["negatives"] == 0 and by_variant["filtered"]["negatives"] == 2
    assert by_variant["base"]["sts_spearman_mean"] != by_variant["filtered"]["sts_spearman_mean"], "training moved it"

    # the files, and every seed's numbers
    store = AblationStore.from_settings(load_settings(), CLEAN_ID)
    assert pq.read_table(store.results_path.as_posix()).to_pylist() == table
    assert json.loads(Path(store.summary_path.as_posix()).read_text())["table"] == table
    assert "no-hard-negatives" in Path(store.html_path.as_posix()).read_text()
    runs = pq.read_table(store.runs_path.as_posix()).to_pylist()
    seeds = {(r["variant"], r["seed"]): r for r in runs if r["dim"] == 384}
    for variant in ("filtered", "no-hard-negatives"):
        assert seeds[(variant, 42)]["sts_spearman"] != seeds[(variant, 43)]["sts_spearman"], f"{variant}: seeds"
    assert seeds[("homogeneous-1", 42)]["same_as"] == "filtered"

    # the same seed again: the same numbers
    settings = load_settings()
    cfg = settings.finetune.model_copy(update={"max_steps": 1, "sts_languages": ["en"]})
    sources, _ = row_sources(store.clean, parse_variants(["filtered"]), settings.clean)
    heldout = store.clean.export_dir / "heldout.parquet"
    rows = variant_rows(VARIANTS["filtered"], sources, example_ids(heldout))
    path = export_variant.fn(VARIANTS["filtered"], rows, tmp_path / "filtered", settings.clean)
    again = train_and_evaluate.fn(
        "filtered", path, tmp_path / "model", variant_settings(VARIANTS["filtered"], cfg, 42), cfg, heldout
    )
    first = {
        r["dim"]: (r["sts_spearman"], r["heldout_ndcg10"])
        for r in runs
        if r["variant"] == "filtered" and r["seed"] == 42
    }
    assert set(again.scores) == set(first)
    for dim, scores in first.items():
        assert again.scores[dim] == pytest.approx(scores, abs=1e-9), f"seed 42 again, dim {dim}"

    # the flow artifact, read back from the Prefect server
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ablation-c-abl"])))
    assert found and found[0].type == "table"
    records = json.loads(found[0].data)
    assert [(r["variant"], r["dim"]) for r in records] == [(r["variant"], str(r["dim"])) for r in table]


# --- the CLI ------------------------------------------------------------------------------------------
def test_cli_user_errors_are_one_line(clean_run, tmp_path):
    def cli(*args, data_dir=clean_run["data_dir"]):
        env = {
            **os.environ,
            "EMBED_FACTORY_STORAGE__DATA_DIR": str(data_dir),
            "EMBED_FACTORY_PREFECT__API_URL": "http://127.0.0.1:9/api",  # nothing answers: errors come first
        }
        return subprocess.run(
            [sys.executable, "-m", "embed_factory.cli", "ablate", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )

    for args, message in (
        (["--clean-id", "c-nope"], f"no clean run 'c-nope' under {clean_run['data_dir']}/clean (clean runs: "),
        (["--clean-id", CLEAN_ID, "--variants", "filtered,bogus"], "unknown variant(s) bogus"),
    ):
        result = cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr
        assert lines[0].startswith("error:") and "Traceback" not in result.stdout + result.stderr
