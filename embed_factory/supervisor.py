"""One supervised server process, for the embedded vLLM server and the local Prefect server alike.

A server is known by its pid file, so any CLI process can find, check and stop one another process started:

* ``pid()``: the pid from the file, or None when that process is gone or a zombie (exited, not yet reaped by
  its parent: ``kill(pid, 0)`` still succeeds for it);
* ``healthy()``: its health URL answers 200;
* ``lock()``: one process at a time sets up and spawns it; the others wait, saying who holds the lock;
* ``spawn()``: started in a session of its own (so a stop reaches its whole process group), output appended
  to its log after a line saying when it started;
* ``wait_healthy()``: progress lines with the log's last line; an exit during start-up is an error with the
  log's last lines;
* ``stop()``: SIGTERM to the process group, then SIGKILL to whatever is left after a grace period.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from embed_factory.setup_progress import log_tail

#: seconds a stop waits after SIGKILL for the process group to be gone
KILL_WAIT_S = 10.0


def is_zombie(pid: int) -> bool:
    """True when ``pid`` has exited but its parent has not collected it yet (state Z in /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def is_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return not is_zombie(pid)


def reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our own child (else it stays a zombie and its pid stays taken)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


class SupervisedProcess:
    """A server process known by ``pid_file``, writing to ``log_file``, healthy when ``health_url`` answers 200.

    ``error`` is the exception type raised for a failed start (the server's own, so the CLI reports it as one
    ``error:`` line); ``say`` receives progress lines, at most every ``progress_interval_s`` while waiting.
    """

    def __init__(
        self,
        name: str,
        *,
        pid_file: Path,
        log_file: Path,
        lock_file: Path,
        health_url: str,
        error: type[Exception],
        say: Callable[[str], None] = lambda _: None,
        progress_interval_s: float = 5.0,
    ):
        self.name = name
        self.pid_file, self.log_file, self.lock_file = pid_file, log_file, lock_file
        self.health_url = health_url
        self.error = error
        self.say = say
        self.progress_interval_s = progress_interval_s

    def pid(self) -> int | None:
        """The server's pid, or None when no pid file names a live (non-zombie) process."""
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if is_alive(pid) else None

    def healthy(self) -> bool:
        try:
            return httpx.get(self.health_url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    @contextlib.contextmanager
    def lock(self, doing: str, holder_log: Path) -> Iterator[None]:
        """Hold the lock file for the block; while another process holds it, say so (with ``holder_log``'s last
        line) every progress interval. Without it, a second start could undo the first's half-done set-up."""
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        with self.lock_file.open("a+") as fh:
            started = time.monotonic()
            last_said = started - self.progress_interval_s  # say it at once, then every interval
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    if now - last_said >= self.progress_interval_s:
                        fh.seek(0)
                        holder = fh.read().strip() or "?"
                        self.say(
                            f"another process (pid {holder}) is {doing}; waiting ({now - started:.0f}s); "
                            f"its log: {log_tail(holder_log, 1, 120)}"
                        )
                        last_said = now
                    time.sleep(min(0.5, self.progress_interval_s))
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            try:
                yield
            finally:
                fh.truncate(0)
                fcntl.flock(fh, fcntl.LOCK_UN)

    def spawn(self, cmd: list[str], env: dict[str, str], doing: str = "") -> int:
        """Start ``cmd`` in a new session, output appended to the log after a line saying when (and ``doing``, what
        it does before its first line of output); write and return its pid."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            # the progress line shows the log's last line: this one, not an earlier start's, until the server prints
            note = f" ({doing})" if doing else ""
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}{note} ---\n".encode())
            log.flush()
            process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, stdin=subprocess.DEVNULL
            )
        self.pid_file.write_text(str(process.pid))
        return process.pid

    def wait_healthy(self, timeout_s: float) -> bool:
        """True once healthy; False when still starting after ``timeout_s`` (left running: it may still come up).
        Raises ``error`` when the process exits first."""
        started = time.monotonic()
        deadline = started + timeout_s
        last_said = started
        while time.monotonic() < deadline:
            if self.healthy():
                self.say(f"{self.name} is healthy after {time.monotonic() - started:.0f}s")
                return True
            if self.pid() is None:
                pid = self._pid_in_file()
                if pid is not None:
                    reap(pid)
                raise self.error(
                    f"the {self.name} server exited during start-up; last lines of {self.log_file}:\n"
                    + log_tail(self.log_file, 15)
                )
            if time.monotonic() - last_said >= self.progress_interval_s:
                last_said = time.monotonic()
                self.say(
                    f"waiting for {self.name} /health ({last_said - started:.0f}s): {log_tail(self.log_file, 1, 160)}"
                )
            time.sleep(min(0.5, self.progress_interval_s))
        return False

    def stop(self, timeout_s: float = 30, kill_after_s: float = KILL_WAIT_S) -> bool:
        """Stop the whole process group: SIGTERM, then after ``timeout_s`` SIGKILL; True if one was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, kill_after_s)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and is_alive(pid):
                reap(pid)
                time.sleep(0.1)
            if not is_alive(pid):
                break
        reap(pid)
        self.pid_file.unlink(missing_ok=True)
        return True

    def _pid_in_file(self) -> int | None:
        try:
            return int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
