"""Bad input: each gives one clear ``error:`` line naming the cause and the file, a non-zero exit code,
no traceback, no partial output, and earlier data left as it was.

Through the real CLI in subprocesses: persona files (binary, wrong encoding, missing field, no
lines, ...) and config values (TOML and environment) in fresh interpreters; damaged stores (a
truncated, garbage or empty Parquet shard, a shard of an older schema, a corrupt manifest, run info,
persona pool, stage table or embedding cache), an unreachable or wrong LLM endpoint, an unreachable
Prefect API, and a full disk through ``run`` / ``clean``. The disk is really full where this machine
allows a small tmpfs (as root, or in a user namespace via ``unshare -Urm``: ENOSPC); everywhere, ``RLIMIT_FSIZE`` makes
writes past a size fail (EFBIG) as a second kind of full disk.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import RUN_ID, clean_args, clean_snapshot, run_args, temp_files


def _files(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def assert_one_clear_error(child_or_result, rc: int, *needles: str) -> str:
    """Exit code ``rc`` (non-zero), one ``error:`` line holding every needle, no traceback anywhere."""
    out, err, code = _streams(child_or_result)
    assert code == rc, f"exit code {code}, wanted {rc}:\n{out[-2000:]}\n{err[-3000:]}"
    assert "Traceback" not in out + err, err[-4000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"wanted one error line:\n{err[-4000:]}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def _streams(x) -> tuple[str, str, int]:
    if isinstance(x, subprocess.CompletedProcess):
        return x.stdout, x.stderr, x.returncode
    code = x.wait()
    return x.stdout, x.stderr, code


def cli(args: list[str], env: dict[str, str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "embed_factory.cli", *args],
        env=env,
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


# --- persona files -------------------------------------------------------------------------------
PERSONA_FILES = {
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "not UTF-8"),
    "latin-1": ('{"persona": "a café owner in Lyon"}\n'.encode("latin-1"), "not UTF-8"),
    "utf-16": ('{"persona": "a nurse"}\n'.encode("utf-16"), "not UTF-8"),
    "missing field": (b'{"persona": "a chemist"}\n{"name": "a baker"}\n', ':2: expected {"persona"'),
    "blank persona": (b'{"persona": "   "}\n', ':1: expected {"persona"'),
    "not an object": (b'["a", "list"]\n', ':1: expected {"persona"'),
    "truncated JSON": (b'{"persona": "a pilot"}\n{"persona": "a po', ":2: not valid JSON"),
    "0 lines": (b"", "no personas"),
    "blank lines only": (b"\n  \n\n", "no personas"),
}


@pytest.mark.parametrize("case", list(PERSONA_FILES) + ["folder", "missing file"])
def test_bad_persona_file(case, early_env, tmp_path, fault_summary):
    path = tmp_path / "personas.jsonl"
    if case == "folder":
        path.mkdir()
        needle = "is a folder"
    elif case == "missing file":
        needle = "persona file not found"
    else:
        content, needle = PERSONA_FILES[case]
        path.write_bytes(content)
    data = tmp_path / "data"
    result = cli(run_args(), early_env(data, personas__source=str(path)), tmp_path)
    assert_one_clear_error(result, 1, str(path), needle)
    assert not data.exists(), "nothing written for a rejected run"
    fault_summary["bad inputs"]["persona files"] += 1


# --- configuration ---------------------------------------------------------------------------------
TOML_CASES = {
    "syntax error": (b"[generation\nexamples = 3\n", "not a readable TOML file"),
    "binary": (b"\xff\xfe\x00\x01\x02garbage", "not a readable TOML file"),
    "wrong type": (b'[generation]\ninstructions_per_brainstorm = "many"\n', "generation.instructions_per_brainstorm"),
    "out of range": (b"[llm]\ntemperature = 5\n", "llm.temperature"),
    "unknown key": (b"[generation]\nexampels = 3\n", "generation.exampels"),
    "unknown section": (b"[generaton]\nexamples = 3\n", "generaton"),
    "unknown task type": (b'[generation]\ntask_types = ["poetry"]\n', "generation.task_types"),
    "unknown profile": (b'profile = "staging"\n', "profile"),
}


@pytest.mark.parametrize("case", list(TOML_CASES))
def test_bad_toml_config(case, early_env, tmp_path, fault_summary):
    config = tmp_path / "bad.toml"
    content, needle = TOML_CASES[case]
    config.write_bytes(content)
    data = tmp_path / "data"
    result = cli(run_args(), {**early_env(data), "EMBED_FACTORY_CONFIG": str(config)}, tmp_path)
    assert_one_clear_error(result, 1, "invalid settings", needle, str(config))
    assert not data.exists()
    fault_summary["bad inputs"]["config files (TOML)"] += 1


ENV_CASES = {
    "wrong type": ("GENERATION__EXAMPLES", "abc", "generation.examples"),
    "out of range": ("LLM__TEMPERATURE", "5", "llm.temperature"),
    "zero shard size": ("GENERATION__SHARD_SIZE", "0", "generation.shard_size"),
    "list not JSON": ("GENERATION__TASK_TYPES", "retrieval", "cannot parse"),
    "unknown task type": ("GENERATION__TASK_TYPES", '["poetry"]', "generation.task_types"),
    "unknown key": ("GENERATION__EXAMPELS", "3", "generation.exampels"),
    "unknown profile": ("PROFILE", "staging", "unknown profile 'staging'"),
}


@pytest.mark.parametrize("case", list(ENV_CASES))
def test_bad_environment_setting(case, early_env, tmp_path, fault_summary):
    key, value, needle = ENV_CASES[case]
    data = tmp_path / "data"
    result = cli(run_args(), {**early_env(data), f"EMBED_FACTORY_{key}": value}, tmp_path)
    assert_one_clear_error(result, 1, "invalid settings", needle, f"EMBED_FACTORY_{key}")
    assert not data.exists()
    fault_summary["bad inputs"]["environment settings"] += 1


def test_missing_config_file(early_env, tmp_path, fault_summary):
    data = tmp_path / "data"
    missing = tmp_path / "nope.toml"
    result = cli(run_args(), {**early_env(data), "EMBED_FACTORY_CONFIG": str(missing)}, tmp_path)
    assert_one_clear_error(result, 1, str(missing), "not found")
    result = cli([*run_args(), "--config", str(missing)], early_env(data), tmp_path)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert not data.exists()
    fault_summary["bad inputs"]["config files (TOML)"] += 2


def test_unreachable_prefect_api(early_env, tmp_path, fault_summary):
    data = tmp_path / "data"
    result = cli(run_args(), early_env(data), tmp_path)  # its PREFECT_API_URL is a closed port
    assert_one_clear_error(result, 1, "Prefect API http://127.0.0.1:9/api unreachable")
    assert not (data / "runs").exists()
    fault_summary["bad inputs"]["Prefect API"] += 1


# --- damaged stores ----------------------------------------------------------------------------------
def _shard(data: Path) -> Path:
    return sorted((data / "runs" / RUN_ID / "examples").glob("*.parquet"))[1]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _older_schema(path: Path) -> None:
    """The shard as a writer of schema version 0 would have left it: no prompt_version, no sampling."""
    table = pq.read_table(path).drop_columns(["prompt_version", "sampling"])
    meta = {b"embed_factory.table": b"examples", b"embed_factory.schema_version": b"0"}
    pq.write_table(table.replace_schema_metadata(meta), path)


SHARD_DAMAGE = {
    "truncated": (_truncate, "unreadable Parquet"),
    "garbage": (_garbage, "unreadable Parquet"),
    "empty": (_empty, "unreadable Parquet"),
    "older schema": (_older_schema, "missing column(s) prompt_version, sampling (older schema?)"),
}


@pytest.fixture
def store_copy(gen_reference, tmp_path):
    """A data dir holding a copy of the reference run (the "earlier data")."""
    data = tmp_path / "data"
    shutil.copytree(gen_reference[0] / "runs", data / "runs")
    return data


@pytest.mark.parametrize("damage", list(SHARD_DAMAGE))
@pytest.mark.parametrize("command", ["clean", "resume"])
def test_damaged_shard(damage, command, store_copy, forks, fault_env, tmp_path, fault_summary):
    data = store_copy
    shard = _shard(data)
    breaker, needle = SHARD_DAMAGE[damage]
    breaker(shard)
    before = _files(data)
    args = clean_args("x") if command == "clean" else run_args()
    child = forks.spawn(args, fault_env(data), tmp_path, tmp_path / "logs", "cmd")
    assert_one_clear_error(child, 1, str(shard), needle)
    after = _files(data)
    if command == "clean":
        assert after == before, "clean changed nothing in the runs and left no clean folder"
        assert not (data / "clean").exists() or not any((data / "clean").iterdir())
    else:  # the resume may rewrite instructions.parquet (same content) and caches, nothing else
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        # caches: the catalog (read for the run's cost plan) and the vectors of the intent dedup
        caches = {k for k in changed if k == "catalog.duckdb" or k.startswith("embeddings/")}
        assert changed - caches <= {f"runs/{RUN_ID}/instructions.parquet"}, changed
    assert not temp_files(data)
    fault_summary["bad inputs"]["damaged shards"] += 1


RUN_FILE_DAMAGE = {
    "manifest.json": (b"\x00\x01 not json", "corrupt manifest"),
    "run.json": (b'{"run_id": "crash", "fingerp', "corrupt run info"),
    "personas.jsonl": (b'{"persona": "ok person"}\n{"persona": 7}\n', ':2: expected {"persona"'),
}


@pytest.mark.parametrize("name", list(RUN_FILE_DAMAGE))
def test_damaged_run_file(name, store_copy, forks, fault_env, tmp_path, fault_summary):
    data = store_copy
    path = data / "runs" / RUN_ID / name
    content, needle = RUN_FILE_DAMAGE[name]
    path.write_bytes(content)
    before = _files(data)
    child = forks.spawn(run_args(), fault_env(data), tmp_path, tmp_path / "logs", "resume")
    assert_one_clear_error(child, 1, str(path), needle)
    after = _files(data)
    after.pop("catalog.duckdb", None)  # a cache: `run` reads the catalog for its cost plan first
    assert after == {k: v for k, v in before.items() if k != "catalog.duckdb"}
    fault_summary["bad inputs"]["damaged run files"] += 1


def test_damaged_clean_file(clean_reference, forks, fault_env, tmp_path, fault_summary):
    data = tmp_path / "data"
    shutil.copytree(clean_reference[0], data, ignore=shutil.ignore_patterns("prefect", "catalog.duckdb*"))
    path, clean_id = data / "clean" / RUN_ID / "mined.parquet", RUN_ID
    _truncate(path)
    before = _files(data)
    child = forks.spawn(clean_args(clean_id), fault_env(data), tmp_path, tmp_path / "logs", "clean")
    assert_one_clear_error(child, 1, str(path), "unreadable Parquet")
    after = _files(data)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    # a resumed clean may have rewritten its export (same content) before reading mined; a new clean id
    # may have committed its first stage tables: nothing of the earlier data changed
    assert all(k.startswith(f"clean/{clean_id}/") for k in changed), changed
    assert not temp_files(data)
    fault_summary["bad inputs"]["damaged clean files"] += 1


def test_a_torn_embedding_segment_is_skipped_and_embedded_again(clean_reference, forks, fault_env, tmp_path):
    """A cache segment cut short (a disk that lost its tail) is never read as vectors: a new clean id logs
    it, embeds its texts again into a new segment, and exports what the reference run exported."""
    data = tmp_path / "data"
    shutil.copytree(clean_reference[0], data, ignore=shutil.ignore_patterns("prefect", "catalog.duckdb*"))
    segments = sorted((data / "embeddings").rglob("*.vec"))
    path = max(segments, key=lambda p: p.stat().st_size)
    _truncate(path)
    child = forks.spawn(clean_args("again"), fault_env(data), tmp_path, tmp_path / "logs", "clean")
    assert child.wait() == 0, child.output[-4000:]
    assert "torn embedding segment" in child.output and str(path) in child.output, child.output[-4000:]
    assert len(sorted((data / "embeddings").rglob("*.vec"))) == len(segments) + 1
    want = {k: v for k, v in clean_reference[1].items() if k.startswith("export/")}
    assert {k: v for k, v in clean_snapshot(data, "again").items() if k.startswith("export/")} == want
    assert not temp_files(data)


# --- the LLM endpoint ------------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def not_http():
    """A TCP port that accepts connections and closes them at once (not an HTTP server)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.close()
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


@pytest.mark.parametrize("case", ["closed port", "not HTTP", "wrong path", "model not served"])
def test_unreachable_or_wrong_llm_endpoint(case, stub_llm, not_http, early_env, tmp_path, fault_summary):
    data = tmp_path / "data"
    env = early_env(data)
    if case == "closed port":
        url = f"http://127.0.0.1:{_closed_port()}/v1"
        env["EMBED_FACTORY_LLM__BASE_URL"], needles = url, [url, "unreachable"]
    elif case == "not HTTP":
        url = f"http://127.0.0.1:{not_http}/v1"
        env["EMBED_FACTORY_LLM__BASE_URL"], needles = url, [url, "unreachable"]
    elif case == "wrong path":
        url = stub_llm.base_url.removesuffix("/v1")
        env["EMBED_FACTORY_LLM__BASE_URL"], needles = url, [url, "HTTP 404"]
    else:
        env["EMBED_FACTORY_LLM__MODEL"], needles = "no-such-model", [stub_llm.base_url, "no-such-model"]
    result = cli(run_args(), env, tmp_path)
    assert_one_clear_error(result, 1, "LLM endpoint", *needles)
    assert not data.exists(), "nothing written when the LLM cannot be used"
    fault_summary["bad inputs"]["LLM endpoints"] += 1


# --- a full disk ---------------------------------------------------------------------------------------
def _userns_tmpfs_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", 'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d"'],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


def _du(root: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("command", ["run", "clean"])
def test_disk_full_tmpfs(command, gen_reference, fault_env, tmp_path, fault_summary):
    """ENOSPC: the data dir is a tmpfs (in a private mount namespace) with ~48 KiB free."""
    if not _userns_tmpfs_works():
        pytest.skip("no tmpfs: neither root nor unprivileged user namespaces (the RLIMIT_FSIZE test covers this)")
    src = gen_reference[0]
    before = _files(src / "runs")
    out = tmp_path / "after"
    size_kib = _du(src / "runs") // 1024 + 48  # the files (in 4 KiB pages) and ~48 KiB to spare
    args = run_args("new") if command == "run" else clean_args("full")
    script = (
        'set -e; mount -t tmpfs -o size="$SIZE"k tmpfs "$MNT"; cp -a "$SRC/runs" "$MNT/"; set +e; '
        '"$PY" -m embed_factory.cli "$@" >"$LOG.out" 2>"$LOG.err"; rc=$?; cp -a "$MNT/." "$OUT/"; exit $rc'
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out.mkdir()
    env = {
        **fault_env(mnt),
        "SIZE": str(size_kib),
        "MNT": str(mnt),
        "SRC": str(src),
        "PY": sys.executable,
        "LOG": str(tmp_path / "cmd"),
        "OUT": str(out),
    }
    result = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script, "sh", *args],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    done = subprocess.CompletedProcess(
        args, result.returncode, (tmp_path / "cmd.out").read_text(), (tmp_path / "cmd.err").read_text() + result.stderr
    )
    line = assert_one_clear_error(done, 1, str(mnt), "No space left on device")
    assert _files(out / "runs" / RUN_ID) == {k.removeprefix(f"{RUN_ID}/"): v for k, v in before.items()}, (
        "the earlier run is intact"
    )
    assert not temp_files(out), temp_files(out)
    for path in out.rglob("*.parquet"):
        pq.read_table(path)  # nothing half-written
    fault_summary["bad inputs"]["full disk (ENOSPC)"] += 1
    print(line)


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("command", ["run", "clean"])
def test_disk_full_file_size_limit(command, store_copy, fault_env, tmp_path, fault_summary):
    """EFBIG: RLIMIT_FSIZE lets no file of the process grow past a limit smaller than a data shard."""
    data = store_copy
    before = _files(data / "runs" / RUN_ID)
    largest = max(p.stat().st_size for p in (data / "runs" / RUN_ID / "examples").glob("*.parquet"))
    args = run_args("new") if command == "run" else clean_args("full")
    result = cli(args, fault_env(data), tmp_path, preexec_fn=_limit_file_size(largest // 2))
    line = assert_one_clear_error(result, 1, str(data), "File too large")
    assert _files(data / "runs" / RUN_ID) == before, "the earlier run is intact"
    assert not temp_files(data), temp_files(data)
    for path in data.rglob("*.parquet"):
        pq.read_table(path)
    fault_summary["bad inputs"]["full disk (EFBIG)"] += 1
    print(line)
