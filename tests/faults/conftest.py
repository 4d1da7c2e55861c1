"""Fixtures of the fault tests: a stub LLM, a fork server running the real CLI, reference runs, snapshots.

* ``stub_llm``: the deterministic OpenAI-compatible server of ``stub_llm.py`` (why: see there).
* ``forks``: ``forkserver.py``, which imports the CLI and flows once and forks one ``embed-factory``
  process per command; ``Child`` wraps such a process (or a fresh ``python -m embed_factory.cli``
  started by ``fresh_cli``) with ``wait``, ``kill`` and its output.
* ``fault_env``: the environment of a tiny run on a given data dir (stub LLM, 24 examples, 3 per
  shard, the session's Prefect test server), plus fault-hook variables; ``early_env`` the same with a
  closed Prefect port, for commands that must fail before they need Prefect.
* ``gen_reference`` / ``clean_reference``: one uninterrupted generation run and one clean run of it,
  with snapshots (content hashes per file; time-dependent columns left out) to compare against.
* ``fault_summary``: counters every test adds to (kills per stage, bad inputs, concurrent starts);
  printed at the end of the session.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from storage.schemas import LEDGER_WALL_CLOCK_COLUMNS
from storage.shards import RunStore
from support.stub_llm import StubLLM

HERE = Path(__file__).parent
RUN_ID = "crash"
EXAMPLES = 24
#: columns that hold wall-clock facts, not content
VOLATILE_COLUMNS = {"created_at", "latency_s", *LEDGER_WALL_CLOCK_COLUMNS}

SUMMARY: dict[str, Counter] = defaultdict(Counter)


# --- summary ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def fault_summary() -> dict[str, Counter]:
    return SUMMARY


def pytest_terminal_summary(terminalreporter):
    if not SUMMARY:
        return
    tr = terminalreporter
    tr.write_sep("=", "fault tests: what was proven")
    kills = SUMMARY.get("kills", Counter())
    if kills:
        tr.write_line(
            "kill -9 points survived per stage (resumed run equal to an uninterrupted one): "
            + ", ".join(f"{stage} {n}" for stage, n in sorted(kills.items()))
            + f"; total {sum(kills.values())}"
        )
    for name in sorted(SUMMARY):
        if name != "kills" and SUMMARY[name]:
            tr.write_line(
                f"{name}: "
                + ", ".join(f"{k} {v}" for k, v in sorted(SUMMARY[name].items()))
                + f"; total {sum(SUMMARY[name].values())}"
            )


# --- processes -------------------------------------------------------------------------------------
class Child:
    """One ``embed-factory`` process (forked by the fork server, or a fresh interpreter)."""

    def __init__(self, pid: int, stdout: Path, stderr: Path, waiter):
        self.pid, self.stdout_path, self.stderr_path, self._waiter = pid, stdout, stderr, waiter

    def wait(self, timeout: float = 300) -> int:
        """The exit code; ``-9`` if it was killed by SIGKILL."""
        return self._waiter(timeout)

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass

    def cont(self) -> None:
        os.kill(self.pid, 18)  # SIGCONT

    def state(self) -> str:
        """The kernel's process state letter (R, S, T = stopped, Z = zombie), '' when gone."""
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return ""

    def wait_stopped(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.state() != "T":
            if self.state() in ("", "Z") or time.monotonic() > deadline:
                raise AssertionError(f"process {self.pid} did not stop at its fault point:\n{self.stderr[-3000:]}")
            time.sleep(0.02)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class ForkServer:
    """Talks JSON lines to ``forkserver.py``."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "forkserver.py")],
            env=env,
            cwd=str(HERE),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._cond = threading.Condition()
        self._pids: dict[int, int] = {}
        self._rcs: dict[int, int] = {}
        self._next = 0
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError("the fork server did not start")
        self._reader = threading.Thread(target=self._read, name="forkserver-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            with self._cond:
                if "id" in message:
                    self._pids[message["id"]] = message["pid"]
                if "rc" in message:
                    self._rcs[message["pid"]] = message["rc"]
                self._cond.notify_all()

    def spawn(self, args: list[str], env: dict[str, str], cwd: Path, log_dir: Path, name: str) -> Child:
        log_dir.mkdir(parents=True, exist_ok=True)
        with self._cond:
            self._next += 1
            command_id = self._next
        stdout, stderr = log_dir / f"{name}.out", log_dir / f"{name}.err"
        command = {
            "id": command_id,
            "args": args,
            "env": env,
            "cwd": str(cwd),
            "stdout": str(stdout),
            "stderr": str(stderr),
        }
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        with self._cond:
            if not self._cond.wait_for(lambda: command_id in self._pids, timeout=60):
                raise RuntimeError("the fork server did not fork")
            pid = self._pids[command_id]

        def waiter(timeout: float) -> int:
            with self._cond:
                if not self._cond.wait_for(lambda: pid in self._rcs, timeout=timeout):
                    os.kill(pid, 9)
                    raise AssertionError(
                        f"embed-factory {' '.join(args)} did not end in {timeout}s:\n"
                        f"{stderr.read_text(errors='replace')[-3000:]}"
                    )
                return self._rcs[pid]

        return Child(pid, stdout, stderr, waiter)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def fresh_cli(args: list[str], env: dict[str, str], cwd: Path, log_dir: Path, name: str, **popen) -> Child:
    """``python -m embed_factory.cli <args>`` in a new interpreter (stdout/stderr to files)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout, stderr = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "embed_factory.cli", *args],
            env=env,
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            **popen,
        )

    def waiter(timeout: float) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"embed-factory {' '.join(args)} did not end in {timeout}s") from None

    child = Child(proc.pid, stdout, stderr, waiter)
    child.popen = proc
    return child


def base_env() -> dict[str, str]:
    """This environment without any EMBED_FACTORY_* setting (a developer's own must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBED_FACTORY_")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "NO_COLOR": "1",
            "COLUMNS": "200",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if os.environ.get("EMBED_FACTORY_CACHE"):
        env["EMBED_FACTORY_CACHE"] = os.environ["EMBED_FACTORY_CACHE"]
    return env


@pytest.fixture(scope="session")
def stub_llm():
    with StubLLM(delay_s=0.005) as llm:
        yield llm


@pytest.fixture(scope="session")
def forks(prefect_api_url):
    server = ForkServer({**base_env(), "PREFECT_API_URL": prefect_api_url})
    yield server
    server.close()


@pytest.fixture(scope="session")
def fault_env(stub_llm, prefect_api_url):
    """``fault_env(data_dir, kill_at=None, stop_at=None, **settings)`` → environment of a tiny run."""
    return _env_maker(stub_llm, prefect_api_url)


@pytest.fixture(scope="session")
def early_env(stub_llm):
    """Like ``fault_env`` for commands that must fail before they need Prefect (its URL is a closed port)."""
    return _env_maker(stub_llm, "http://127.0.0.1:9/api")


def _env_maker(stub_llm, prefect_api_url: str):
    def make(data_dir: Path, kill_at: str | None = None, stop_at: str | None = None, **settings: str) -> dict:
        env = {
            **base_env(),
            "PREFECT_API_URL": prefect_api_url,
            "EMBED_FACTORY_STORAGE__DATA_DIR": str(data_dir),
            "EMBED_FACTORY_LLM__BASE_URL": stub_llm.base_url,
            "EMBED_FACTORY_LLM__MODEL": stub_llm.model,
            "EMBED_FACTORY_LLM__MAX_RETRIES": "1",
            "EMBED_FACTORY_GENERATION__EXAMPLES": str(EXAMPLES),
            "EMBED_FACTORY_GENERATION__SHARD_SIZE": "3",
            "EMBED_FACTORY_GENERATION__SHARDS_IN_FLIGHT": "2",
            "EMBED_FACTORY_GENERATION__SEED": "5",
            "EMBED_FACTORY_PERSONAS__LIMIT": "40",
            # a corpus of ~60 texts: shrink the rank windows to fit it; stub words are not the asked language
            "EMBED_FACTORY_CLEAN__CHECK_LANGUAGE": "false",
            "EMBED_FACTORY_CLEAN__RANK_TOP_K": "30",
            "EMBED_FACTORY_CLEAN__NEGATIVE_RANK_MIN": "30",
            "EMBED_FACTORY_CLEAN__NEGATIVE_RANK_MAX": "50",
        }
        env.update({f"EMBED_FACTORY_{k.upper()}": str(v) for k, v in settings.items()})
        if kill_at:
            env["EMBED_FACTORY_FAULT_KILL_AT"] = kill_at
        if stop_at:
            env["EMBED_FACTORY_FAULT_STOP_AT"] = stop_at
        return env

    return make


def run_args(run_id: str = RUN_ID) -> list[str]:
    return ["run", "--run-id", run_id, "--no-clean"]


def clean_args(clean_id: str) -> list[str]:
    return ["clean", "--clean-id", clean_id]


# --- snapshots ---------------------------------------------------------------------------------------
def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str, ensure_ascii=False).encode()).hexdigest()


def table_digest(path: Path) -> str:
    """Content hash of a Parquet file, wall-clock columns left out; raises if the file is not whole.
    ``clean_id`` (a column of the cost ledger only) is left out too: compared clean runs differ by id."""
    table = pq.read_table(path)
    keep = [c for c in table.column_names if c not in VOLATILE_COLUMNS and c != "clean_id"]
    return _digest({"columns": keep, "rows": table.select(keep).to_pylist()})


def temp_files(root: Path) -> list[Path]:
    return sorted(root.rglob(".*.tmp-*"))


def run_snapshot(data_dir: Path, run_id: str = RUN_ID, rename: str | None = None) -> dict[str, str]:
    """file → content hash of a generation run (``rename``: read as if its run id were this one)."""
    root = data_dir / "runs" / run_id
    out: dict[str, str] = {}

    def norm(value):
        return json.loads(json.dumps(value, default=str).replace(run_id, rename)) if rename else value

    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        # plan.json: the cost plan, made only when earlier runs exist (an interrupted chain has some)
        if not path.is_file() or path.name in (".lock", "plan.json") or path.name.startswith("."):
            continue
        if rel.startswith("claims/"):  # a killed worker's claim on a shard it had committed: no content
            continue
        if rel.startswith("manifest.d/"):  # a shard's entry: its counts (the file's hash holds commit times)
            entry = json.loads(path.read_text())
            out[rel] = _digest((entry["rows"], entry["rejects"]))
            continue
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            keep = [c for c in table.column_names if c not in VOLATILE_COLUMNS]
            out[rel] = _digest(norm(table.select(keep).to_pylist()))
        elif path.name == "manifest.json":
            shards = json.loads(path.read_text())["shards"]
            out[rel] = _digest({k: (v["rows"], v["rejects"]) for k, v in shards.items()})
        else:
            out[rel] = _digest(norm(path.read_text()))
    return out


def clean_snapshot(data_dir: Path, clean_id: str) -> dict[str, str]:
    """file → content hash of a clean run (the card without its date and clean id; the report left out)."""
    root = data_dir / "clean" / clean_id
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or path.name.startswith(".") or path.name == "report.html":
            continue
        if rel.startswith("ranking/"):  # the ranking step's memory-mapped scratch files, not a result
            continue
        if path.suffix == ".parquet":
            out[rel] = table_digest(path)
        elif path.name == "README.md":
            text = re.sub(r"_Card written .*?_", "", path.read_text())
            text = text.replace(f"Clean run: `{clean_id}`", "Clean run: <clean_id>")
            out[rel] = _digest(text)
        else:
            out[rel] = _digest(path.read_text())
    assert (root / "report.html").stat().st_size > 0, f"{root}: no report"
    return out


def diff(got: dict[str, str], want: dict[str, str]) -> str:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    changed = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    return f"missing {missing}, extra {extra}, changed {changed}"


def check_run_invariants(data_dir: Path, run_id: str = RUN_ID) -> None:
    """After any crash: every data file whole, the manifest only names whole files, no row twice."""
    root = data_dir / "runs" / run_id
    for path in root.rglob("*.parquet"):
        pq.read_table(path)  # a half-written file raises
    for key, entry in RunStore(data_dir, run_id).manifest().items():
        path = root / f"{key}.parquet"
        assert path.exists(), f"manifest names {key} but {path} is missing"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], f"{path} differs from the manifest"
    ids = [
        i
        for p in (root / "examples").glob("*.parquet")
        for i in pq.read_table(p, columns=["example_id"])["example_id"].to_pylist()
    ]
    assert len(ids) == len(set(ids)), "an example is stored twice"


def check_clean_invariants(data_dir: Path, clean_id: str) -> None:
    for path in (data_dir / "clean" / clean_id).rglob("*.parquet"):
        pq.read_table(path)
    for path in (data_dir / "clean" / clean_id / "export").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            json.loads(line)  # no torn line


@pytest.fixture(scope="session")
def gen_reference(forks, fault_env, tmp_path_factory):
    """One uninterrupted generation run (run id ``crash``): its data dir and snapshot."""
    base = tmp_path_factory.mktemp("gen-reference")
    data = base / "data"
    child = forks.spawn(run_args(), fault_env(data), base, base / "logs", "reference")
    rc = child.wait()
    assert rc == 0, child.output[-5000:]
    snapshot = run_snapshot(data)
    assert any(k.startswith("examples/") for k in snapshot) and any(k.startswith("rejects/") for k in snapshot)
    assert not temp_files(data)
    return data, snapshot


@pytest.fixture(scope="session")
def clean_reference(forks, fault_env, gen_reference, tmp_path_factory):
    """One uninterrupted clean run (clean id ``crash``) over a copy of the reference generation run."""
    base = tmp_path_factory.mktemp("clean-reference")
    data = base / "data"
    shutil.copytree(gen_reference[0] / "runs", data / "runs")
    child = forks.spawn(clean_args(RUN_ID), fault_env(data), base, base / "logs", "reference")
    rc = child.wait()
    assert rc == 0, child.output[-5000:]
    snapshot = clean_snapshot(data, RUN_ID)
    assert "mined.parquet" in snapshot and "export/train.jsonl" in snapshot, snapshot
    assert pq.read_metadata(data / "clean" / RUN_ID / "mined.parquet").num_rows > 0
    return data, snapshot
