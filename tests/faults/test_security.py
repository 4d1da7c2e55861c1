"""Security: loopback-only servers, and secrets that never leave memory.

* Every server the project starts listens on 127.0.0.1 (the real listening sockets of the process
  trees, read with psutil): the embedded vLLM server, the local Prefect server, `embed-factory serve`
  and the worker of `embed-factory deploy`.
* Unique secrets planted in every secret setting and token variable (LLM API key, HF token, S3
  credentials, embedding API key) never appear in anything a generate + clean + report run leaves:
  every file of the data dir (raw bytes, and the decoded values of every Parquet file), the HTML
  report, the CLI's stdout/stderr, the vLLM log, and the Prefect API's flow runs (parameters), task
  runs, artifacts and logs. The LLM key must still reach the server (checked at a proxy).

Generated text kept inert (SQL injection, HTML in the report, the AST audit): ``test_hostile_text.py``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from proxy import FaultProxy
from pydantic import SecretStr

from ground.settings import Settings, load_settings


# --------------------------------------------------------------------------- listening sockets
def listening_sockets(pid: int) -> list[tuple[str, int, int]]:
    """(ip, port, pid) of every TCP socket that ``pid`` or one of its descendants listens on."""
    tree = psutil.Process(pid)
    pids = {pid} | {child.pid for child in tree.children(recursive=True)}
    return [
        (c.laddr.ip, c.laddr.port, c.pid)
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]


def assert_loopback_only(sockets: list[tuple[str, int, int]], what: str) -> None:
    exposed = [s for s in sockets if not ipaddress.ip_address(s[0]).is_loopback]
    assert not exposed, f"{what} listens beyond loopback: {exposed}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_every_server_defaults_to_loopback():
    settings = Settings()
    assert settings.embedded_llm.host == "127.0.0.1"
    assert settings.prefect.host == "127.0.0.1"


@pytest.mark.llm
def test_embedded_vllm_listens_on_loopback_only(llm_base_url):
    from embed_factory.llm_server import EmbeddedLLMServer

    server = EmbeddedLLMServer(load_settings().embedded_llm)
    status = server.status()
    if status.pid is None:
        pytest.skip("the vLLM server answering here was not started from this cache dir (no pid file)")
    sockets = listening_sockets(status.pid)
    assert any(port == server.settings.port for _, port, _ in sockets), sockets
    assert_loopback_only(sockets, "the embedded vLLM server")
    cmdline = psutil.Process(status.pid).cmdline()
    assert cmdline[cmdline.index("--host") + 1] == "127.0.0.1"
    print(f"[security] vllm: {len(sockets)} listening sockets, all loopback")


def test_local_prefect_server_serve_and_worker_listen_on_loopback_only(tmp_path, monkeypatch):
    """The local Prefect server, then `embed-factory serve` and `embed-factory deploy`'s worker polling it
    (a server of their own: what they register must not reach the session's shared test API)."""
    from embed_factory.prefect_server import LocalPrefectServer

    monkeypatch.setenv("EMBED_FACTORY_STORAGE__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("EMBED_FACTORY_PREFECT__PORT", str(free_port()))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    settings = load_settings()
    server = LocalPrefectServer(settings)
    server.start()
    try:
        sockets = listening_sockets(server.pid())
        assert any(port == settings.prefect.port for _, port, _ in sockets), sockets
        assert_loopback_only(sockets, "the local Prefect server")
        print(f"[security] local prefect server: {len(sockets)} listening sockets, all loopback")
        check_process(
            ["serve"], server.api_url, tmp_path, lambda c: _exists(c.read_deployment_by_name("finetune/finetune"))
        )
        pool = getattr(settings.prefect, "work_pool", None)
        if pool:  # `embed-factory deploy`: registers the deployments, then runs a worker for the pool
            check_process(
                ["deploy"],
                server.api_url,
                tmp_path,
                lambda c: _non_empty(c.read_workers_for_work_pool(work_pool_name=pool)),
            )
    finally:
        server.stop()


def check_process(args: list[str], api_url: str, tmp_path: Path, ready) -> None:
    """Start `embed-factory <args>` against ``api_url``; once ``ready(client)`` holds, check its sockets."""
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "EMBED_FACTORY_STORAGE__DATA_DIR": str(tmp_path / "data"),
        # a configured endpoint, so `deploy` does not start an embedded vLLM server for its worker
        "EMBED_FACTORY_LLM__BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "embed_factory.cli", *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        up = False
        while time.monotonic() < deadline and process.poll() is None and not up:
            up = asyncio.run(_ask(api_url, ready))
            time.sleep(1)
        assert up, f"embed-factory {' '.join(args)} did not come up:\n{_drain(process)}"
        time.sleep(3)  # polling now
        assert process.poll() is None, _drain(process)
        sockets = listening_sockets(process.pid)
        assert_loopback_only(sockets, f"embed-factory {' '.join(args)}")
        print(f"[security] embed-factory {' '.join(args)}: {len(sockets)} listening sockets, none beyond loopback")
    finally:
        process.terminate()  # SIGTERM to our own child; its flow-run subprocesses (none here) go with it
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _ask(api_url: str, ready) -> bool:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        return await ready(client)


async def _exists(coro) -> bool:
    from prefect.exceptions import ObjectNotFound

    try:
        await coro
        return True
    except ObjectNotFound:
        return False


async def _non_empty(coro) -> bool:
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    try:
        return bool(await coro)
    except (ObjectNotFound, PrefectHTTPStatusError):  # the work pool does not exist yet
        return False


def _drain(process: subprocess.Popen) -> str:
    if process.poll() is None:
        process.terminate()
    out, _ = process.communicate(timeout=30)
    return out[-3000:]


# --------------------------------------------------------------------------- secrets
def secret_env(tag: str) -> dict[str, str]:
    """A unique secret in every secret setting (found by type) and every token variable we know of."""
    secrets = {}
    for section, model in Settings.model_fields.items():
        annotation = model.annotation
        for key, field in getattr(annotation, "model_fields", {}).items():
            if "SecretStr" in str(field.annotation):
                secrets[f"EMBED_FACTORY_{section.upper()}__{key.upper()}"] = f"sk-{tag}-{section}-{key}-9f81c3"
    for name in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ):
        secrets[name] = f"tok-{tag}-{name.lower()}-77e0d4"
    return secrets


def find_secrets_in_file(path: Path, secrets: list[str]) -> list[str]:
    """Secrets found in a file's bytes, and, for Parquet, in its decoded values and metadata."""
    data = path.read_bytes()
    found = [s for s in secrets if s.encode() in data]
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        text = json.dumps(table.to_pylist(), default=str) + str(table.schema.metadata)
        found += [s for s in secrets if s in text and s not in found]
    return found


async def prefect_records() -> dict[str, list[str]]:
    """Everything the Prefect API holds about the runs: flow runs (with parameters), task runs, artifacts, logs."""
    from prefect.client.orchestration import get_client

    out: dict[str, list[str]] = {"flow_runs": [], "task_runs": [], "artifacts": [], "logs": []}
    async with get_client() as client:
        for kind, read in (
            ("flow_runs", client.read_flow_runs),
            ("task_runs", client.read_task_runs),
            ("artifacts", client.read_artifacts),
            ("logs", client.read_logs),
        ):
            offset = 0
            while True:
                page = await read(limit=200, offset=offset)
                out[kind] += [item.model_dump_json() for item in page]
                if len(page) < 200:
                    break
                offset += 200
    return out


@pytest.mark.llm
def test_secrets_never_reach_files_logs_or_prefect(llm_base_url, prefect_api_url, tmp_path):
    secrets = secret_env("sec")
    data = tmp_path / "data"
    vllm_log = Path(load_settings().embedded_llm.cache_dir) / "logs" / f"vllm-{load_settings().embedded_llm.port}.log"
    log_start = vllm_log.stat().st_size if vllm_log.exists() else 0
    with FaultProxy(llm_base_url) as proxy:  # no faults: it only records what reaches the server
        env = {
            **os.environ,
            **secrets,
            "PREFECT_API_URL": prefect_api_url,
            "EMBED_FACTORY_STORAGE__DATA_DIR": str(data),
            "EMBED_FACTORY_LLM__BASE_URL": proxy.base_url,
            "EMBED_FACTORY_LLM__MODEL": "SmolLM2-135M-Instruct",
            # debug logging everywhere, the openai and httpx loggers shipped to the Prefect API too
            "PREFECT_LOGGING_LEVEL": "DEBUG",
            "PREFECT_LOGGING_EXTRA_LOGGERS": "openai,httpx,httpcore",
            "EMBED_FACTORY_CLEAN__RANK_TOP_K": "10",
            "EMBED_FACTORY_CLEAN__NEGATIVE_RANK_MIN": "1",
            "EMBED_FACTORY_CLEAN__NEGATIVE_RANK_MAX": "8",
            "EMBED_FACTORY_CLEAN__CHECK_LANGUAGE": "false",
        }
        # the S3 secrets are planted, but the data dir stays local
        outputs = []
        for args in (
            # 2 task types (one brainstormed): the secrets' paths are the same for all six, the tokens are not
            ["run", "--run-id", "secrets", "-n", "6", "-t", "retrieval", "-t", "sts"],
            ["report"],
            ["query", "SELECT count(*) AS n FROM raw"],
            ["doctor"],
        ):
            result = subprocess.run(
                [sys.executable, "-m", "embed_factory.cli", *args],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=900,
            )
            if args[0] != "doctor":
                assert result.returncode == 0, result.stdout + result.stderr
            outputs.append(("cli " + args[0], result.stdout + result.stderr))
        hits = proxy.chat_hits()
    key = secrets["EMBED_FACTORY_LLM__API_KEY"]
    assert hits and all(h.authorization == f"Bearer {key}" for h in hits), "the API key reaches the server"

    values = list(secrets.values())
    leaks: dict[str, list[str]] = {}
    files = [p for p in data.rglob("*") if p.is_file()]
    for path in files:
        found = find_secrets_in_file(path, values)
        if found:
            leaks[str(path)] = found
    assert any(p.name == "report.html" for p in files) and any(p.suffix == ".parquet" for p in files)
    for name, text in outputs:
        if found := [s for s in values if s in text]:
            leaks[name] = found
    if vllm_log.exists():
        with vllm_log.open("rb") as fh:
            fh.seek(log_start)
            tail = fh.read().decode(errors="replace")
        if found := [s for s in values if s in tail]:
            leaks[str(vllm_log)] = found
    records = asyncio.run(prefect_records())
    assert any('"generate-secrets"' in r for r in records["flow_runs"]), "the run's flow run is in the API"
    assert records["logs"], "the runs logged to the API"
    for kind, items in records.items():
        if found := [s for s in values if any(s in item for item in items)]:
            leaks[f"prefect {kind}"] = found
    assert not leaks, f"secrets leaked: {leaks}"
    print(
        f"[security] {len(values)} secrets, none found in {len(files)} files, {len(outputs)} CLI outputs, the vLLM "
        f"log and {sum(map(len, records.values()))} Prefect records ({ {k: len(v) for k, v in records.items()} })"
    )


def test_api_key_from_a_prefect_secret_block(prefect_api_url, tmp_path):
    """The key lives in a Prefect Secret block; the run sends it, and writes or logs it nowhere."""
    from prefect.blocks.system import Secret

    from support.stub_llm import StubLLM

    key = "sk-block-5d2e8a0c4b71"
    Secret(value=key).save("embed-factory-test-llm-key", overwrite=True)
    data = tmp_path / "data"
    with StubLLM() as stub, FaultProxy(stub.base_url) as proxy:
        env = {
            **os.environ,
            "PREFECT_API_URL": prefect_api_url,
            "EMBED_FACTORY_STORAGE__DATA_DIR": str(data),
            "EMBED_FACTORY_LLM__BASE_URL": proxy.base_url,
            "EMBED_FACTORY_LLM__MODEL": stub.model,
            "EMBED_FACTORY_LLM__API_KEY": "prefect-secret:embed-factory-test-llm-key",
        }
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "embed_factory.cli",
                "run",
                "--run-id",
                "block-key",
                "-n",
                "4",
                "-t",
                "sts",
                "--no-clean",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        hits = proxy.chat_hits()
    assert result.returncode == 0, result.stdout + result.stderr
    assert hits and all(h.authorization == f"Bearer {key}" for h in hits)
    assert key not in result.stdout + result.stderr
    assert not [p for p in data.rglob("*") if p.is_file() and find_secrets_in_file(p, [key])]
    records = asyncio.run(prefect_records())
    assert not [k for k, items in records.items() if any(key in item for item in items)]


def test_secret_settings_are_masked_in_dumps(monkeypatch):
    for name, value in secret_env("dump").items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    dumped = settings.model_dump_json() + repr(settings) + str(settings.model_dump())
    planted = [v for k, v in secret_env("dump").items() if k.startswith("EMBED_FACTORY_")]
    assert planted and not [v for v in planted if v in dumped]
    assert isinstance(settings.llm.api_key, SecretStr)
    assert settings.llm.api_key.get_secret_value() == secret_env("dump")["EMBED_FACTORY_LLM__API_KEY"]
