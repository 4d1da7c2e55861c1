"""The one supervisor of the embedded vLLM and Prefect servers (embed_factory/supervisor.py), with real child
processes: a tiny HTTP server for health, a server that ignores SIGTERM, one that dies at once."""

from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest

from embed_factory.llm_server import EmbeddedLLMServer, LLMServerError
from embed_factory.prefect_server import LocalPrefectServer, PrefectServerError
from embed_factory.supervisor import SupervisedProcess, is_alive, is_zombie
from ground.settings import EmbeddedLLMSettings, Settings
from support.tiny_http import serve

# ignores SIGTERM (saying so in its log), and starts a grandchild in its process group that does too
STUBBORN = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    def ignore(*_):
        print(f"{os.getpid()} ignored SIGTERM", flush=True)
    signal.signal(signal.SIGTERM, ignore)
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    print(f"grandchild {child.pid}", flush=True)
    time.sleep(600)
""")


def supervised(tmp_path, error=RuntimeError, port: int = 1, **kwargs) -> SupervisedProcess:
    return SupervisedProcess(
        "test",
        pid_file=tmp_path / "run" / "server.pid",
        log_file=tmp_path / "logs" / "server.log",
        lock_file=tmp_path / "server.lock",
        health_url=f"http://127.0.0.1:{port}/health",
        error=error,
        **kwargs,
    )


def wait_for_line(path, prefix: str, timeout_s: float = 20) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = [line for line in path.read_text().splitlines() if line.startswith(prefix)] if path.exists() else []
        if lines:
            return lines[0]
        time.sleep(0.05)
    raise AssertionError(f"no line {prefix!r} in {path}")


def servers(tmp_path, monkeypatch) -> list:
    """Both servers, data and cache under tmp_path; what each supervises."""
    monkeypatch.setenv("EMBED_FACTORY_STORAGE__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("EMBED_FACTORY_PREFECT__PORT", "1")  # nothing listens there: never the lead's server
    monkeypatch.setenv("EMBED_FACTORY_PREFECT__STARTUP_TIMEOUT_S", "0.5")
    llm = EmbeddedLLMServer(EmbeddedLLMSettings(cache_dir=tmp_path / "cache", port=1))
    return [llm, LocalPrefectServer(Settings())]


@pytest.mark.parametrize("which", ["vllm", "prefect"])
def test_stop_escalates_to_sigkill_for_the_whole_process_group(tmp_path, monkeypatch, which):
    """Both servers stop alike (before, Prefect's stop sent SIGTERM only and left a stubborn server running)."""
    server = servers(tmp_path, monkeypatch)[0 if which == "vllm" else 1]
    pid = server.process.spawn([sys.executable, "-c", STUBBORN], dict(os.environ))
    grandchild = int(wait_for_line(server.log_file, "grandchild ").split()[1])
    assert server.process.pid() == pid and is_alive(grandchild)
    started = time.monotonic()
    assert server.stop(timeout_s=1.0) is True
    assert 1.0 <= time.monotonic() - started < 10
    assert f"{pid} ignored SIGTERM" in server.log_file.read_text()  # SIGTERM came first, and was not enough
    assert not is_alive(pid) and not is_zombie(pid), "stopped and reaped"
    deadline = time.monotonic() + 5
    while is_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_alive(grandchild), "the grandchild in its process group is killed too"
    assert not server.pid_file.exists() and server.process.pid() is None
    assert server.stop() is False  # nothing left to stop


def test_a_zombie_is_not_a_running_server_and_its_start_fails_with_its_log(tmp_path):
    process = supervised(tmp_path, error=LLMServerError)
    pid = process.spawn([sys.executable, "-c", "print('cannot bind the port'); raise SystemExit(3)"], dict(os.environ))
    deadline = time.monotonic() + 20
    while not is_zombie(pid):  # exited, not reaped: kill(pid, 0) still succeeds
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(pid, 0)
    assert process.pid() is None
    with pytest.raises(LLMServerError, match=r"(?s)test server exited during start-up.*cannot bind the port"):
        process.wait_healthy(30)
    assert not is_zombie(pid), "the failed start reaped its child"


def test_a_server_answering_late_is_waited_for_with_progress(tmp_path):
    said: list[str] = []
    child, port = serve(tmp_path / "www", {"health": "ok"}, delay_s=1.5)
    try:
        process = supervised(tmp_path, port=port, say=said.append, progress_interval_s=0.4)
        process.pid_file.parent.mkdir(parents=True)
        process.pid_file.write_text(str(child.pid))
        assert not process.healthy() and process.pid() == child.pid
        assert process.wait_healthy(30) is True
        assert process.healthy()
        assert any(m.startswith("waiting for test /health (") for m in said), said
        assert said[-1].startswith("test is healthy after")
        assert process.stop() is True and not is_alive(child.pid)
    finally:
        child.kill()


def test_a_start_past_its_timeout_leaves_the_prefect_server_running_and_says_how_to_stop_it(tmp_path, monkeypatch):
    """A Prefect server still starting is not an exit: one line naming the pid, the way to stop it, and its log."""
    server = servers(tmp_path, monkeypatch)[1]
    pid = server.process.spawn([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))
    with pytest.raises(PrefectServerError, match=rf"still starting \(pid {pid}\).*prefect down.*server\.log"):
        server.start()
    assert is_alive(pid)
    assert server.stop(timeout_s=5) is True and not is_alive(pid)
