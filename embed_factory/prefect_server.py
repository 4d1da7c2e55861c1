"""A local Prefect server (SQLite, 127.0.0.1, telemetry off) for when no Prefect API is configured.

``PREFECT_HOME`` lives in the project's data folder, so runs show up in the Prefect UI at
``http://127.0.0.1:<port>`` and survive restarts of the CLI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from ground.settings import Settings


class PrefectServerError(RuntimeError):
    pass


def prefect_ui_url(api_url: str) -> str:
    """The Prefect UI's address for an API address (``http://host:4200/api`` → ``http://host:4200``)."""
    return api_url.removesuffix("/api")


class LocalPrefectServer:
    def __init__(self, settings: Settings, say: Callable[[str], None] = lambda _: None):
        self.settings = settings
        self.say = say
        self.home = (settings.storage.local_root / "prefect").resolve()

    @property
    def api_url(self) -> str:
        return f"http://{self.settings.prefect.host}:{self.settings.prefect.port}/api"

    @property
    def ui_url(self) -> str:
        return prefect_ui_url(self.api_url)

    @property
    def pid_file(self) -> Path:
        return self.home / "server.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "server.log"

    def env(self) -> dict[str, str]:
        return {
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_API_HOST": self.settings.prefect.host,
            "PREFECT_SERVER_API_PORT": str(self.settings.prefect.port),
            "PREFECT_UI_API_URL": self.api_url,
        }

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def start(self) -> str:
        if self.healthy():
            return self.api_url
        if self.pid() is None:
            self.home.mkdir(parents=True, exist_ok=True)
            self.say(f"starting a local Prefect server on {self.ui_url} (PREFECT_HOME={self.home})")
            with self.log_file.open("ab") as log:
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "prefect",
                        "server",
                        "start",
                        "--host",
                        self.settings.prefect.host,
                        "--port",
                        str(self.settings.prefect.port),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, **self.env()},
                    start_new_session=True,
                )
            self.pid_file.write_text(str(process.pid))
        deadline = time.monotonic() + self.settings.prefect.startup_timeout_s
        while time.monotonic() < deadline:
            if self.healthy():
                return self.api_url
            if self.pid() is None:
                raise PrefectServerError(f"the Prefect server exited during start-up; see {self.log_file}")
            time.sleep(0.5)
        raise PrefectServerError(f"the Prefect server did not answer in time; see {self.log_file}")

    def stop(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.pid() is not None:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)
        self.pid_file.unlink(missing_ok=True)
        return True


def resolve_api_url(settings: Settings, say: Callable[[str], None] = lambda _: None) -> str:
    """The Prefect API to use: configured, from PREFECT_API_URL, or a local server started now."""
    if settings.prefect.api_url:
        return settings.prefect.api_url
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    return LocalPrefectServer(settings, say).start()
