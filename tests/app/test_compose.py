"""docker-compose.yml, checked two ways.

Plain Python, with no tool: .env.example lists exactly the variables the file uses, and no secret is a
literal in the file. A real Compose implementation (``docker-compose config``, Debian's 1.29.2): the file
validates with the variables of .env.example, fails when a required secret is missing, and its resolved
form has every service, health check, GPU reservation and loopback-only port it should, with secrets only
in environment variables. Those tests skip where docker-compose is not installed, and fail under CI=true
(``require_tool`` in conftest.py; .ci/run installs it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from ground.settings import PROFILES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
#: the Compose Specification JSON schema that Debian's docker-compose ships (offline)
SPEC_SCHEMA = Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")
INSTALL = "Debian: apt-get install docker-compose"

#: required variables (``${VAR:?…}``) with a distinct value each, so a leak can be traced
SECRETS = {
    "POSTGRES_PASSWORD": "pg-secret-value-1",
    "VLLM_API_KEY": "vllm-secret-value-2",
    "MINIO_ROOT_USER": "minio-root-user-3",
    "MINIO_ROOT_PASSWORD": "minio-root-secret-4",
    "FACTORY_S3_ACCESS_KEY": "factory-access-key-5",
    "FACTORY_S3_SECRET_KEY": "factory-secret-value-6",
}
SERVICES = {
    *("postgres", "prefect-server", "vllm", "embeddings", "minio", "minio-init", "worker-cpu", "worker-gpu"),
    *("dask-scheduler", "generation-worker"),
}
GPU_SERVICES = {"vllm", "embeddings", "worker-gpu"}


@pytest.fixture(scope="session")
def compose(require_tool):
    """``compose(*args, env=, env_file=, file=)``: docker-compose on ``file`` (the repository's by default) with
    exactly ``env`` (plus PATH/HOME) and ``env_file``, run in the file's folder."""
    binary = require_tool("docker-compose", INSTALL)

    def run(*args: str, env: dict[str, str], env_file: Path, file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess:
        base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
        return subprocess.run(
            [binary, "--env-file", str(env_file), "-f", str(file), *args],
            env={**base, **env},
            cwd=file.parent,
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


@pytest.fixture
def empty_env_file(tmp_path) -> Path:
    """An empty --env-file, so that a developer's own .env cannot make a test pass."""
    path = tmp_path / "empty.env"
    path.write_text("")
    return path


@pytest.fixture
def resolved(compose, empty_env_file) -> dict:
    """The resolved configuration (``docker-compose config``) with the test secrets and VLLM_TP=8."""
    proc = compose("config", env={**SECRETS, "VLLM_TP": "8"}, env_file=empty_env_file)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def referenced_variables(text: str) -> dict[str, bool]:
    """Variables the compose file interpolates -> whether required (``:?``); ``$$`` escapes are not."""
    found: dict[str, bool] = {}
    for match in re.finditer(r"(?<!\$)\$\{([A-Z0-9_]+)(:?[?-])?", text):
        found[match.group(1)] = found.get(match.group(1), False) or (match.group(2) or "").endswith("?")
    return found


def env_example_variables() -> dict[str, str]:
    lines = [line.strip() for line in ENV_EXAMPLE.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


# --- the file itself, in plain Python (no tool needed) ----------------------------------------------


def test_env_example_lists_exactly_the_variables_the_file_uses():
    used = referenced_variables(COMPOSE_FILE.read_text())
    documented = env_example_variables()
    assert set(used) == set(documented)
    assert {name for name, required in used.items() if required} == set(SECRETS)
    for name in SECRETS:  # the example holds placeholders, never something that looks real
        assert documented[name].startswith(("change-me", "embed-factory")), name


def test_the_file_itself_holds_no_secret_values():
    """Every secret-looking key in the file takes its value from a variable, never a literal."""
    for lineno, line in enumerate(COMPOSE_FILE.read_text().splitlines(), 1):
        m = re.match(r"\s*([A-Z0-9_]*(PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY)[A-Z0-9_]*):\s*(.*)", line)
        if m:
            value = m.group(3).split(" #")[0].strip()
            assert value.startswith("${") or value == "", f"line {lineno}: {line.strip()}"
    assert "--api-key" not in COMPOSE_FILE.read_text()  # vLLM reads VLLM_API_KEY: no key on a command line


# --- validation by docker-compose itself ---------------------------------------------------------


def test_validates_with_the_variables_of_env_example(compose):
    proc = compose("config", "-q", env={}, env_file=ENV_EXAMPLE)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_a_missing_required_secret_fails_validation(compose, missing, empty_env_file):
    env = {k: v for k, v in SECRETS.items() if k != missing}
    proc = compose("config", "-q", env=env, env_file=empty_env_file)
    assert proc.returncode != 0
    assert f"set {missing}" in proc.stderr  # the file's own message names the variable


def test_a_broken_file_fails_validation(compose, tmp_path, empty_env_file):
    """The same check rejects a schema error, so passing above means something."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    healthcheck:\n", "    healthcheckz:\n", 1))
    proc = compose("config", "-q", env=SECRETS, env_file=empty_env_file, file=broken)
    assert proc.returncode != 0 and "healthcheckz" in proc.stderr


def test_matches_the_compose_specification_schema(resolved, require_tool):
    import jsonschema  # a dependency of the factory itself

    schema = json.loads(Path(require_tool(SPEC_SCHEMA, INSTALL)).read_text())
    validator = jsonschema.Draft201909Validator(schema)  # its $schema names draft 2019-09
    errors = sorted(validator.iter_errors(resolved), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    broken = json.loads(json.dumps(resolved))
    broken["services"]["vllm"]["healthcheckz"] = broken["services"]["vllm"].pop("healthcheck")
    assert any("healthcheckz" in e.message for e in validator.iter_errors(broken))  # the schema does bite


# --- structure of the resolved configuration --------------------------------------------------------


def test_every_service_is_there_with_its_health_check(resolved):
    services = resolved["services"]
    assert set(services) == SERVICES
    for name in ("postgres", "prefect-server", "vllm", "embeddings", "minio"):
        check = services[name].get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), name
    assert any("/health" in part for part in services["vllm"]["healthcheck"]["test"])
    assert any("/api/health" in part for part in services["prefect-server"]["healthcheck"]["test"])


def test_vllm_serves_qwen2_72b_tensor_parallel_from_the_environment(resolved):
    cmd = resolved["services"]["vllm"]["command"]
    assert cmd[cmd.index("--model") + 1] == "Qwen/Qwen2-72B-Instruct"
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "8"  # VLLM_TP
    assert resolved["services"]["vllm"]["image"].startswith("vllm/vllm-openai")
    embed = resolved["services"]["embeddings"]
    assert embed["image"].startswith("vllm/vllm-openai")
    assert "embed" in embed["command"] and ("--convert" in embed["command"] or "--task" in embed["command"])


def test_gpu_reservations(resolved):
    for name, service in resolved["services"].items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        gpus = [d for d in devices if "gpu" in d.get("capabilities", [])]
        if name in GPU_SERVICES:
            assert gpus and gpus[0]["driver"] == "nvidia", name
        else:
            assert not gpus, name


def test_every_port_binds_to_loopback_once(resolved):
    published = []
    for name, service in resolved["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                ip, host, target = port.get("host_ip"), str(port.get("published")), str(port["target"])
            else:
                ip, host, target = str(port).rsplit(":", 2) if str(port).count(":") == 2 else (None, None, None)
            assert ip == "127.0.0.1", f"{name} publishes {port} beyond this machine"
            published.append(host)
    assert len(published) == len(set(published))  # no host port twice
    assert sorted(published) == ["4200", "8000", "8001", "9000", "9001"]
    assert "ports" not in resolved["services"]["postgres"]  # the database is reached inside the network only


def test_workers_use_the_pools_and_storage_the_factory_expects(resolved):
    services = resolved["services"]
    production = PROFILES["production"]["prefect"]
    assert f"--pool {production['work_pool']}" in services["worker-cpu"]["command"]
    assert f"--pool {production['gpu_work_pool']}" in services["worker-gpu"]["command"]
    for name in ("worker-cpu", "worker-gpu"):
        env = services[name]["environment"]
        assert env["EMBED_FACTORY_STORAGE__DATA_DIR"].startswith("s3://")
        assert env["EMBED_FACTORY_STORAGE__ENDPOINT_URL"] == "http://minio:9000"
        assert env["EMBED_FACTORY_CLEAN__EMBEDDING_BASE_URL"] == "http://embeddings:8000/v1"
        assert env["AWS_SECRET_ACCESS_KEY"] == SECRETS["FACTORY_S3_SECRET_KEY"]  # not the MinIO root account
        assert services[name]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    # the settings object accepts exactly this environment
    from ground.settings import Settings

    worker_env = {k: v for k, v in services["worker-cpu"]["environment"].items() if k.startswith("EMBED_FACTORY_")}
    old = {k: os.environ.get(k) for k in worker_env}
    try:
        os.environ.update(worker_env)
        settings = Settings()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert settings.storage.is_remote and settings.clean.embedder == "openai"
    assert settings.llm.base_url == "http://vllm:8000/v1"
    # one run's example shards spread over the generation workers, which share the storage and the LLM
    assert settings.generation.task_runner == "dask"
    assert settings.generation.dask_address == "tcp://dask-scheduler:8786"
    workers = services["generation-worker"]
    assert workers["command"].startswith("dask worker tcp://dask-scheduler:8786")
    assert workers["deploy"]["replicas"] == settings.generation.workers
    for key in ("EMBED_FACTORY_STORAGE__DATA_DIR", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_URL"):
        assert workers["environment"][key] == services["worker-cpu"]["environment"][key], key


def test_no_secret_outside_environment_variables(resolved):
    """Secrets appear only as environment values: never in commands, health checks, images or build args."""
    for name, service in resolved["services"].items():
        outside = json.dumps({k: v for k, v in service.items() if k != "environment"})
        for var, value in SECRETS.items():
            assert value not in outside, f"{var} leaks into {name} outside its environment"
