"""The ``embed-factory`` CLI run as a subprocess, for tests that check what a user sees (stdout, stderr,
exit code), and the repository root it runs in by default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str] | None = None, cwd=ROOT, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m embed_factory.cli ARGS`` with ``env`` added to this environment; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "embed_factory.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=timeout,
    )
