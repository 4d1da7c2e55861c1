"""A local Prefect server (SQLite, 127.0.0.1, telemetry off) for when no Prefect API is configured.

``PREFECT_HOME`` lives in the project's data folder, so runs show up in the Prefect UI at
``http://127.0.0.1:<port>`` and survive restarts of the CLI.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from embed_factory.supervisor import SupervisedProcess
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
        self.process = SupervisedProcess(
            "Prefect",
            pid_file=self.home / "server.pid",
            log_file=self.home / "server.log",
            lock_file=self.home / "server.lock",
            health_url=f"{self.api_url}/health",
            error=PrefectServerError,
            say=say,
        )

    @property
    def api_url(self) -> str:
        return f"http://{self.settings.prefect.host}:{self.settings.prefect.port}/api"

    @property
    def ui_url(self) -> str:
        return prefect_ui_url(self.api_url)

    @property
    def pid_file(self) -> Path:
        return self.process.pid_file

    @property
    def log_file(self) -> Path:
        return self.process.log_file

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
        return self.process.healthy()

    def pid(self) -> int | None:
        return self.process.pid()

    def start(self) -> str:
        """Start the server unless it already answers (one process at a time); wait until it does."""
        if self.healthy():
            return self.api_url
        with self.process.lock("starting the Prefect server", self.log_file):
            if self.pid() is None and not self.healthy():  # another process may have started it meanwhile
                self.say(f"starting a local Prefect server on {self.ui_url} (PREFECT_HOME={self.home})")
                s = self.settings.prefect
                cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", s.host, "--port", str(s.port)]
                self.process.spawn(cmd, {**os.environ, **self.env()})
        if not self.process.wait_healthy(self.settings.prefect.startup_timeout_s):
            raise PrefectServerError(
                f"the Prefect server did not answer in {self.settings.prefect.startup_timeout_s:.0f}s and is still "
                f"starting (pid {self.pid()}); `embed-factory prefect down` stops it; its log: {self.log_file}"
            )
        return self.api_url

    def stop(self, timeout_s: float = 20) -> bool:
        """Stop the server's process group, SIGKILL after ``timeout_s``; True if one was running."""
        return self.process.stop(timeout_s)


def resolve_api_url(settings: Settings, say: Callable[[str], None] = lambda _: None) -> str:
    """The Prefect API to use: configured, from PREFECT_API_URL, or a local server started now."""
    if settings.prefect.api_url:
        return settings.prefect.api_url
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    return LocalPrefectServer(settings, say).start()
