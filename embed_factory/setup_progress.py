"""Progress of the embedded server's long set-up steps (pip, GGUF conversion): run a command with its whole
output in a log file, and say a status line at most every few seconds, so a first ``llm up`` never sits
silent for minutes. pip prints nothing while it installs; :class:`PipProgress` counts the dist-info
folders that appear instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO


def log_tail(path: Path, lines: int, width: int | None = None) -> str:
    """The last ``lines`` non-blank lines of a log (each cut to ``width``), or ``(no log)``."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    kept = [line.strip()[:width] for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(kept) or "(log empty)"


_PIP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


@dataclass
class PipProgress:
    """Reads pip's output and the venv's site-packages into a one-line status.

    pip prints a line per package while it resolves and downloads, then nothing while it installs
    (minutes, torch alone takes one or more); installed packages show up as ``*.dist-info`` folders.
    """

    venv: Path
    collected: list[str] = field(default_factory=list)
    to_install: list[str] = field(default_factory=list)
    install_started: float = 0.0

    def feed(self, line: str) -> None:
        line = line.strip()
        if line.startswith(("Collecting ", "Processing ")):
            match = _PIP_NAME.match(Path(line.split()[1]).name)
            if match:
                self.collected.append(match.group().split("-")[0] if line.startswith("Processing") else match.group())
        elif line.startswith("Installing collected packages:"):
            self.to_install = [n.strip() for n in line.split(":", 1)[1].split(",") if n.strip()]
            self.install_started = time.time() - 1  # file times have 1 s granularity on some filesystems

    def installed(self) -> list[str]:
        """The packages of ``to_install`` whose dist-info appeared since installation began, in install order."""
        fresh = set()
        for folder in self.venv.glob("lib/python*/site-packages/*.dist-info"):
            with contextlib.suppress(OSError):  # pip may remove one meanwhile (an upgrade, an uninstall)
                if folder.stat().st_mtime >= self.install_started:
                    fresh.add(_normalize(folder.name.split("-")[0]))
        return [n for n in self.to_install if _normalize(n) in fresh]

    def status(self) -> str:
        if self.to_install:
            done = self.installed()
            if len(done) == len(self.to_install):
                return f"all {len(done)} packages unpacked; pip is finishing"
            status = f"still installing: {len(done)}/{len(self.to_install)} packages done"
            if done:  # pip installs in the order it listed, so the one after the last done is under way
                status += f", last: {done[-1]}"
                following = self.to_install[self.to_install.index(done[-1]) + 1 :]
                status += f", now: {following[0]}" if following else ""
            return status
        if self.collected:
            return f"resolving and downloading: {len(self.collected)} packages collected, last: {self.collected[-1]}"
        return "starting pip"


def run_with_progress(
    cmd: list[str],
    log: TextIO,
    say: Callable[[str], None],
    label: str,
    interval_s: float,
    tracker: PipProgress | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Run ``cmd`` with its whole output copied into ``log`` (each line stamped with the seconds since the
    command began); at most every ``interval_s``, say ``label (Ns): status``, where the status is the
    tracker's or else the command's last output line. Returns the exit code and the last output line."""
    started = time.monotonic()
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    try:
        process = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env={**(env or os.environ), "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
        )
    except OSError as exc:  # e.g. the venv's python is gone
        log.write(f"cannot start: {exc}\n")
        log.flush()
        return 127, str(exc)
    last_line = ["(no output yet)"]

    def copy_output() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            log.write(f"[{time.monotonic() - started:7.1f}s] {line}")
            log.flush()
            if line.strip():
                last_line[0] = line.strip()[:160]
            if tracker is not None:
                tracker.feed(line)

    reader = threading.Thread(target=copy_output, daemon=True)
    reader.start()
    last_said = started
    while reader.is_alive() or process.poll() is None:
        reader.join(timeout=min(0.5, interval_s))
        now = time.monotonic()
        if now - last_said >= interval_s and (reader.is_alive() or process.poll() is None):
            last_said = now
            say(f"{label} ({now - started:.0f}s): {tracker.status() if tracker else last_line[0]}")
    code = process.wait()
    log.write(f"[{time.monotonic() - started:7.1f}s] exit code {code}\n")
    log.flush()
    return code, last_line[0]
