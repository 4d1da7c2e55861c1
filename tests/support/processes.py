"""Process helpers shared by the tests that run CLI servers and workers in their own sessions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def stop(process: subprocess.Popen) -> None:
    """Ctrl-C (as a user would), then SIGTERM/SIGKILL to the process group it started."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)  # its own session: the process and its flow-run children
        except ProcessLookupError:
            break
        time.sleep(1)
    process.wait(timeout=10)


def start_deploy(project: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`embed-factory deploy` (register, then run a worker) in ``project``, its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "embed_factory.cli", "deploy"],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
