"""The CLI turns user mistakes into one clear line and a non-zero exit code, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


def cli(*args: str, env: dict[str, str] | None = None, cwd=None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "embed_factory.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=120)


@pytest.mark.parametrize("command", [[], ["run"], ["llm"], ["llm", "up"], ["prefect"]])
def test_help_everywhere(command):
    result = cli(*command, "--help")
    assert result.returncode == 0
    assert "Usage" in result.stdout


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "no personas"),
        (b'{"persona": "ok person here"}\n{"persona": \n', ":2: not valid JSON"),
        (b'{"name": "x"}\n', ':1: expected {"persona"'),
        (b"\xff\xfe\x00\x01binary", "not UTF-8"),
    ],
)
def test_bad_persona_file_is_one_clear_error(tmp_path, content, expected):
    bad = tmp_path / "personas.jsonl"
    bad.write_bytes(content)
    result = cli("run", "-n", "1", env={"EMBED_FACTORY_PERSONAS__SOURCE": str(bad),
                                        "EMBED_FACTORY_STORAGE__DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 1
    assert expected in result.stderr and str(bad) in result.stderr.replace("\n", "")
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "data").exists(), "nothing written for a rejected run"


def test_invalid_setting_names_the_key(tmp_path):
    result = cli("run", env={"EMBED_FACTORY_GENERATION__SHARD_SIZE": "0"})
    assert result.returncode == 1
    assert "generation.shard_size" in result.stderr and "Traceback" not in result.stderr


def test_unknown_task_type(tmp_path):
    result = cli("run", "-t", "poetry", env={"EMBED_FACTORY_STORAGE__DATA_DIR": str(tmp_path)})
    assert result.returncode == 2 and "unknown task type" in result.stderr


def test_missing_config_file_is_reported(tmp_path):
    result = cli("run", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
