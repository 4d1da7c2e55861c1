"""The project's lock file (embed_factory/env_lock.py): it fits pyproject, it catches a stale pin, and the
environment these tests run in was installed from it (README commands 1 and 2, .ci/run)."""

from __future__ import annotations

import os
import sys
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from embed_factory.env_lock import LOCK_FILE, NOT_LOCKED, problems, requirements
from embed_factory.vllm_lock import freeze, read_lock


def test_the_shipped_lock_pins_every_requirement_inside_its_range():
    lock = read_lock(LOCK_FILE)
    assert lock.requirements == [".[test]"]
    assert problems(lock, requirements()) == []


def test_a_stale_lock_is_named_pin_by_pin(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\ndependencies = ["numpy>=2", "duckdb<1", "rich", "torch==2.13.0"]\n'
        '[project.optional-dependencies]\ntest = ["pytest>=8"]\ngpu = ["faiss-gpu>=1"]\n'
        "extra-only = [\"win-thing; sys_platform == 'win32'\"]\n"
    )
    lock_file = tmp_path / "requirements.lock"
    lock_file.write_text("# for: .[test]\n# platform: p\nnumpy==2.4.6\nDuckDB==1.4.0\ntorch==2.13.0\npytest==8.0\n")
    found = problems(read_lock(lock_file), requirements(pyproject))
    assert found == ["duckdb: pinned 1.4.0, outside the required <1", "rich: required (rich) but not pinned"]
    # the gpu extra is not locked; a requirement whose marker does not hold here is not asked for
    assert [r.name for r in requirements(pyproject, ["test", "extra-only"])][-1] == "pytest"


def test_freeze_pins_this_venv_without_its_tools_or_local_labels():
    pins = freeze(Path(sys.executable), NOT_LOCKED, local_labels=False)
    names = {canonicalize_name(p.split("==")[0]) for p in pins}
    assert not names & NOT_LOCKED and "torch" in names
    assert all("+" not in p for p in pins) and pins == sorted(pins, key=str.lower)


def test_this_environment_was_installed_from_the_lock():
    """Every locked package installed at its pin; under CI=true, nothing installed that the lock lacks."""
    pins = {canonicalize_name(n): v for n, v in read_lock(LOCK_FILE).pins.items()}
    installed = {canonicalize_name(d.metadata["Name"]): d.version.split("+")[0] for d in distributions()}
    off = {name: (version, pins[name]) for name, version in installed.items() if name in pins and version != pins[name]}
    assert not off, f"installed (version, lock) differ: {off}; install with -c requirements.lock"
    unlocked = sorted(set(installed) - set(pins) - NOT_LOCKED)
    if unlocked and os.environ.get("CI") == "true":
        pytest.fail(f"installed but not in requirements.lock: {unlocked} (refresh: python -m embed_factory.env_lock)")
