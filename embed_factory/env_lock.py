"""The project's own environment, every package pinned: ``requirements.lock``, checked against pyproject.

``pip install -e .`` alone resolves every range in pyproject afresh on each machine, so a release next
month can break a fresh clone that passed CI today. The README's commands install with the lock as pip
constraints (``pip install -c requirements.lock -e '.[test]'``): exactly the versions CI tested, and pip
refuses to install when a pyproject requirement and a pin disagree. The lock has the same format as the
embedded vLLM server's (:mod:`embed_factory.vllm_lock`): ``# for:`` and ``# platform:`` headers, then one
``name==version`` per line. Local version labels are dropped (``torch==2.13.0`` also matches the
``2.13.0+cpu`` build); pip reads ``#`` lines as comments.

:func:`problems` says where pyproject and the lock disagree (a requirement without a pin, a pin outside its
range, extras of the lock's ``for`` that pyproject no longer has); the suite runs it, so ``.ci/run`` fails on
a stale lock. Refresh it after changing pyproject's requirements (a new venv, resolved without the lock)::

    python -m embed_factory.env_lock
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from embed_factory.vllm_lock import Lock, freeze, read_lock, this_platform

ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = ROOT / "requirements.lock"
#: what the lock covers: the project with the extras the README's commands install (gpu is the worker image's)
LOCKED_EXTRAS = ["test"]
#: the venv's own tools and the project itself are not pinned
NOT_LOCKED = {"pip", "setuptools", "wheel", "embed-factory"}


def requirements(pyproject: Path = ROOT / "pyproject.toml", extras: list[str] = LOCKED_EXTRAS) -> list[Requirement]:
    """pyproject's dependencies plus those of ``extras``, whose markers hold on this machine."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        lines += optional.get(extra, [])
    reqs = [Requirement(line) for line in lines]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def problems(lock: Lock, reqs: list[Requirement]) -> list[str]:
    """Where ``reqs`` and the lock disagree; empty when every requirement has a pin inside its range."""
    found = []
    pins = {canonicalize_name(name): version for name, version in lock.pins.items()}
    for req in reqs:
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            found.append(f"{req.name}: required ({req}) but not pinned")
        elif req.specifier and not req.specifier.contains(pin, prereleases=True):
            found.append(f"{req.name}: pinned {pin}, outside the required {req.specifier}")
    return found


def write_lock(python: Path, path: Path = LOCK_FILE) -> Lock:
    spec = f".[{','.join(LOCKED_EXTRAS)}]"
    lines = [
        "# The project's environment, every package pinned (embed_factory/env_lock.py); pip constraints:",
        f"#   pip install -c requirements.lock -e '{spec}'",
        "# Refresh after changing pyproject's requirements: python -m embed_factory.env_lock",
        f"# for: {spec}",
        f"# platform: {this_platform()}",
        *freeze(python, NOT_LOCKED, local_labels=False),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return read_lock(path)


def refresh(path: Path = LOCK_FILE) -> Lock:
    """Resolve pyproject afresh in a new venv (no lock) and write what pip chose."""
    spec = f".[{','.join(LOCKED_EXTRAS)}]"
    with tempfile.TemporaryDirectory(prefix="env-lock-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = venv / "bin" / "python"
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", spec], check=True, cwd=ROOT)
        lock = write_lock(python, path)
    stale = problems(lock, requirements())
    if stale:
        raise SystemExit("the fresh lock does not fit pyproject: " + "; ".join(stale))
    return lock


def main() -> None:
    if len(sys.argv) > 1:
        sys.exit("usage: python -m embed_factory.env_lock   (re-resolves pyproject into requirements.lock)")
    lock = refresh()
    print(f"{lock.path}: {len(lock.pins)} pins for {' '.join(lock.requirements)} ({lock.platform})")


if __name__ == "__main__":
    main()
