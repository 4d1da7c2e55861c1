"""The Prefect UI in a real browser: the four deployments and a completed pipeline run, with screenshots.

About 2-3 min on 2 busy cores. It starts what a user starts:

1. the local Prefect server of the CLI (``LocalPrefectServer``: ``prefect server start``, SQLite,
   127.0.0.1, a free port, ``PREFECT_HOME`` in this test's data folder) — it serves the UI;
2. ``embed-factory deploy`` (registers generate, clean, finetune, pipeline; runs a process worker);
3. ``embed-factory trigger pipeline`` with a tiny run: 8 examples of 2 task types from the stub LLM
   server (the UI is the subject, not the model), clean tuned for a tiny corpus, a 2-step fine-tune
   evaluated on 40 English STS pairs;

then drives Debian's chromium (``/usr/bin/chromium``; Playwright, headless, no browser download):
the deployments page lists the four deployments; the pipeline deployment's run form has a field with
its description per flow parameter; the pipeline's run page (Subflow Runs tab) shows it
Completed with its run graph and three subflow runs, each with its number of task runs; the clean
subflow's page (Task Runs tab) lists its task runs by name, as the API has them. The UI is the one
``prefect server start`` serves by default (Prefect's Vue UI in 3.9). Screenshots go to
``$EMBED_FACTORY_TEST_ARTIFACTS`` or ``tests/artifacts/`` (gitignored); the test prints the folder.
Skipped only when chromium is absent, and then failed under CI=true (``require_tool`` in conftest.py; .ci/run
installs it); chromium is looked for before any server starts.

``test_ui_shows_a_clean_runs_funnel_artifact`` (no LLM, ~2-3 min on 2 busy cores): a ``clean`` run on
hand-made shards against the same kind of server; the run page's Artifacts tab lists the clean artifacts
and the ``clean-funnel`` table shows the counts of the run's stage tables; its screenshot is also copied
to ``docs/ui-clean-artifacts.png`` (the README's) when ``EMBED_FACTORY_UPDATE_DOCS`` is set.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ground.settings import load_settings
from support.deployments import TINY, wait_for_worker
from support.processes import start_deploy, stop

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("EMBED_FACTORY_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")
DEPLOYMENTS = ("generate", "clean", "finetune", "pipeline")


@pytest.fixture(scope="session")
def chromium(require_tool) -> str:
    """Debian's chromium; session-scoped so that, first in the test's arguments, it is looked for before the
    session's vLLM server starts."""
    return require_tool("chromium", "Debian: apt-get install chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ui_server(tmp_path, monkeypatch):
    """The CLI's local Prefect server (UI + API) on a free port, data and PREFECT_HOME under tmp_path."""
    from embed_factory.prefect_server import LocalPrefectServer

    monkeypatch.setenv("EMBED_FACTORY_STORAGE__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("EMBED_FACTORY_PREFECT__PORT", str(free_port()))
    monkeypatch.delenv("EMBED_FACTORY_PREFECT__API_URL", raising=False)
    server = LocalPrefectServer(load_settings(), say=lambda m: print(f"[prefect] {m}", flush=True))
    started = time.monotonic()
    server.start()
    print(f"[prefect] UI {server.ui_url} up in {time.monotonic() - started:.1f}s")
    monkeypatch.setenv("PREFECT_API_URL", server.api_url)  # every subprocess
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:  # this process too, over any Prefect test server of the session (its settings context wins over env)
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server
    finally:
        server.stop()


def _flow_runs(**filters):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(**filters)


def subflow_runs(parent_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return _flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))


def task_run_names(flow_run_id) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(r.name for r in runs)


def open_tab(page, name: str):
    """Click the run page's ``name`` tab until its panel shows, and return the panel. A click that lands
    before the page has hydrated is lost (the Logs tab stays open), so one click is not enough."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    panel = page.get_by_role("tabpanel", name=name)
    for _ in range(10):
        page.locator("[role=tablist]").get_by_text(name, exact=True).click()
        try:
            panel.wait_for(state="visible", timeout=3_000)
            return panel
        except PlaywrightTimeout:
            continue
    raise AssertionError(f"the {name!r} tab never opened")


def test_ui_shows_deployments_and_a_completed_pipeline_run(chromium, stub_llm_env, ui_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from tasks.training.evaluate import bundled_sts_dir

    if not (bundled_sts_dir() / "stsb-en-test.csv").exists():
        pytest.fail(f"the bundled STS Benchmark is missing: {bundled_sts_dir()}/stsb-en-test.csv")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"screenshots: {ARTIFACTS}")
    env = {**os.environ, **TINY, "PREFECT_WORKER_QUERY_SECONDS": "2"}
    project = tmp_path / "project"
    project.mkdir()
    log = tmp_path / "deploy.log"

    t0 = time.monotonic()
    worker = start_deploy(project, env, log)
    try:
        wait_for_worker("local-pool", worker, log)
        t_ready = time.monotonic()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "embed_factory.cli",
                "trigger",
                "pipeline",
                "-p",
                "run_id=run-ui",
                "-p",
                "examples=8",
                "-p",
                "task_types=retrieval,sts",
                "-p",
                "max_steps=2",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        t_done = time.monotonic()
        assert result.returncode == 0, result.stdout + result.stderr + log.read_text()[-6000:]
        assert "pipeline/pipeline: flow run pipeline-run-ui Completed" in result.stdout
        print(f"deploy + worker ready {t_ready - t0:.1f}s, pipeline run {t_done - t_ready:.1f}s")
    finally:
        stop(worker)

    pipeline_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", result.stdout).group(1)
    children = {run.name: run for run in subflow_runs(pipeline_id)}
    assert set(children) == {
        "generate-run-ui (pipeline)",
        "clean-clean-ui (pipeline)",
        "finetune-clean-ui (pipeline)",
    }, children
    assert all(run.state.is_completed() for run in children.values())
    clean_run = children["clean-clean-ui (pipeline)"]
    clean_tasks = task_run_names(clean_run.id)  # e.g. validate-run-ui-g00-00000, dedup-near-sts, embed-707
    for stage in ("validate-", "dedup-", "embed-", "rank-filter-and-mine-"):
        assert any(name.startswith(stage) for name in clean_tasks), (stage, clean_tasks)
    # the pipeline run's one-page summary artifact, with the cost ledger of both runs
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[pipeline_id]))
        )
    summary = next(a for a in found if a.key == "pipeline-summary")
    assert "Pipeline run-ui → clean-ui" in summary.data and "Cost ledger" in summary.data, summary.data
    assert "| generate | run-ui |" in summary.data and "| clean | clean-ui |" in summary.data, summary.data

    ui = ui_server.ui_url
    shots = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(60_000)

        # 1. the deployments page lists the four deployments (each links to its own page)
        from prefect import get_client

        with get_client(sync_client=True) as client:
            ids = {name: client.read_deployment_by_name(f"{name}/{name}").id for name in DEPLOYMENTS}
        page.goto(f"{ui}/deployments")
        for name, deployment_id in ids.items():
            link = page.locator(f'a[href*="/deployments/deployment/{deployment_id}"]').first
            expect(link).to_be_visible()
            expect(link).to_contain_text(name)
        shots["deployments"] = ARTIFACTS / "ui-deployments.png"
        page.screenshot(path=shots["deployments"], full_page=True)

        # 2. the pipeline deployment's run form: a field per flow parameter, with its description
        page.goto(f"{ui}/deployments/deployment/{ids['pipeline']}/run")
        for text in (
            "examples (Optional)",
            "Target number of parsed examples over all task types",
            "task_types (Optional)",
            "max_steps (Optional)",
            "Fine-tune on the clean run's export",
        ):
            expect(page.get_by_text(text).first).to_be_visible()
        page.wait_for_timeout(1000)  # let the page finish fading in
        shots["form"] = ARTIFACTS / "ui-pipeline-run-form.png"
        page.screenshot(path=shots["form"], full_page=True)

        # 3. the pipeline's run page: Completed, its graph, and its three subflow runs with their task runs
        page.goto(f"{ui}/runs/flow-run/{pipeline_id}")
        panel = open_tab(page, "Subflow Runs")
        expect(page.get_by_text("pipeline-run-ui", exact=True).first).to_be_visible()
        expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
        expect(panel.get_by_text("3 Flow runs", exact=True)).to_be_visible()
        for name, run in children.items():
            row = panel.locator("div", has=page.get_by_text(name, exact=True)).filter(has_text="Task runs").last
            expect(row).to_contain_text(f"{len(task_run_names(run.id))} Task runs")
            expect(row).to_contain_text("Completed")
        page.wait_for_timeout(1500)  # the run graph (a canvas) draws its nodes
        shots["pipeline"] = ARTIFACTS / "ui-pipeline-run.png"
        page.screenshot(path=shots["pipeline"], full_page=True)

        # 4. the clean subflow's run page: its task runs
        page.goto(f"{ui}/runs/flow-run/{clean_run.id}")
        panel = open_tab(page, "Task Runs")
        expect(panel.get_by_text(f"{len(clean_tasks)} Task runs", exact=True)).to_be_visible()
        for name in clean_tasks:  # the UI lists exactly the task runs the API has
            expect(panel.get_by_text(name, exact=True).first).to_be_visible()
        page.wait_for_timeout(1500)
        shots["clean"] = ARTIFACTS / "ui-clean-task-runs.png"
        page.screenshot(path=shots["clean"], full_page=True)
        browser.close()

    for name, path in shots.items():
        assert path.stat().st_size > 10_000, f"{path} looks empty"
        print(f"screenshot {name}: {path}")


def test_ui_shows_a_clean_runs_funnel_artifact(chromium, ui_server, tmp_path, monkeypatch):
    """A finished ``clean`` run (hand-made shards, no LLM) in the UI: its Artifacts tab lists the clean
    artifacts, and the ``clean-funnel`` table shows, row by row, the counts of the run's own stage tables."""
    import shutil

    from playwright.sync_api import expect, sync_playwright

    from flows.artifacts import KEYS
    from flows.clean import clean
    from storage.corpus import CleanStore
    from storage.shards import RunStore
    from support.rows import TOPICS, example, write_run

    data_dir = tmp_path / "data"  # ui_server pointed the factory's storage here
    for key, value in {"NEGATIVES_PER_QUERY": "2", "NEGATIVE_RANK_MIN": "1", "NEGATIVE_RANK_MAX": "10"}.items():
        monkeypatch.setenv(f"EMBED_FACTORY_CLEAN__{key}", value)
    monkeypatch.setenv("EMBED_FACTORY_CLEAN__RANK_TOP_K", "3")
    rows = [example("run-a", i, q, p, negative=TOPICS[(i + 1) % len(TOPICS)][1]) for i, (q, p) in enumerate(TOPICS)]
    rows.append(example("run-a", 90, "", "An empty query must be dropped by validation."))
    rows += [
        example("run-a", 100 + i, q, p, TOPICS[i + 2][1], task_type="short_short")
        for i, (q, p) in enumerate(TOPICS[:3])
    ]
    write_run(data_dir, "run-a", rows)
    state = clean(clean_id="c-ui", return_state=True)
    assert state.is_completed()
    flow_run_id = state.state_details.flow_run_id

    # what the funnel must show, counted here from the run's own tables
    store = CleanStore(data_dir, "c-ui")
    tables = {"generated": RunStore(data_dir, "run-a").read_kind("examples")}
    tables |= {stage: store.read_stage(stage) for stage in ("valid", "deduped", "decontaminated", "filtered", "mined")}
    expected = {t: [tables[s]["task_type"].to_pylist().count(t) for s in tables] for t in ("retrieval", "short_short")}
    expected["total"] = [tables[s].num_rows for s in tables]

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "ui-clean-artifacts.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        # the flow run's Artifacts tab lists the clean run's artifacts by key
        page.goto(f"{ui_server.ui_url}/runs/flow-run/{flow_run_id}")
        panel = open_tab(page, "Artifacts")
        for key in ("clean_funnel", "clean_drop_reasons", "clean_samples", "clean_report", "clean_export"):
            expect(panel.get_by_text(KEYS[key], exact=True).first).to_be_visible()
        # the funnel artifact's page: one table row per task type with its count per stage
        panel.get_by_text(KEYS["clean_funnel"], exact=True).first.click()
        for name, counts in expected.items():
            row = page.locator("tr", has=page.get_by_text(name, exact=True))
            expect(row).to_have_count(1)
            cells = row.locator("td")
            for i, count in enumerate(counts):
                expect(cells.nth(i + 1)).to_have_text(str(count))
        page.wait_for_timeout(500)
        page.screenshot(path=shot, full_page=True)
        browser.close()
    assert 10_000 < shot.stat().st_size < 300_000, f"{shot}: {shot.stat().st_size} bytes"
    print(f"screenshot: {shot}")
    if os.environ.get("EMBED_FACTORY_UPDATE_DOCS"):  # refresh the README's walk-through screenshot on request
        docs = ROOT / "docs" / "ui-clean-artifacts.png"
        shutil.copyfile(shot, docs)
        print(f"copied to {docs}")
