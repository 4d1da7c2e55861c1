"""Seeding a fresh venv from this one (embed_factory/venv_seed.py), for real: a small installed distribution is
hardlinked into a new ``python -m venv`` and must import there and be what pip sees; a mismatch is left to pip."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from embed_factory.venv_seed import parse_pins, seed_venv, site_packages

DIST = "packaging"  # a declared dependency, pure Python, no scripts


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    venv = tmp_path_factory.mktemp("seed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # with pip: it must see the seed
    return venv / "bin" / "python"


def _in_venv(python, code: str) -> str:
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else f"failed: {done.stderr.strip()[-300:]}"


def test_a_mismatched_version_is_not_seeded(fresh_venv):
    seeded = seed_venv(fresh_venv, {DIST: "0.0.1"})
    assert seeded.dists == [] and "0.0.1" in seeded.skipped[DIST]
    assert not list(site_packages(fresh_venv).glob(f"{DIST}*"))
    assert _in_venv(fresh_venv, f"import {DIST}").startswith("failed")
    assert seed_venv(fresh_venv, {"no-such-dist": "1.0"}).skipped == {"no-such-dist": "not in the main environment"}


def test_the_same_version_is_hardlinked_and_seen_by_python_and_pip(fresh_venv):
    version = importlib.metadata.version(DIST)
    seeded = seed_venv(fresh_venv, parse_pins([f"{DIST}=={version}"]))
    assert seeded.dists == [(DIST, version)] and seeded.mode == "hardlinks", seeded
    assert seeded.summary().startswith(f"seeded {DIST} {version} from the main environment (hardlinks) in ")
    source = importlib.metadata.distribution(DIST)
    init = next(f for f in source.files if str(f) == f"{DIST}/__init__.py")
    target = site_packages(fresh_venv) / str(init)
    assert target.stat().st_ino == source.locate_file(init).stat().st_ino
    assert _in_venv(fresh_venv, f"import {DIST}; print({DIST}.__file__)") == str(target)
    # the venv's own pip sees it installed at that version, so `pip install packaging==<it>` has nothing to do
    shown = subprocess.run([str(fresh_venv), "-m", "pip", "show", DIST], capture_output=True, text=True).stdout
    assert f"Version: {version}" in shown and str(site_packages(fresh_venv)) in shown
    again = subprocess.run(
        [str(fresh_venv), "-m", "pip", "install", "--no-index", f"{DIST}=={version}"], capture_output=True, text=True
    )
    assert again.returncode == 0 and "already satisfied" in again.stdout, again.stdout + again.stderr
    # seeded once: a second seed finds it present and leaves it alone
    assert seed_venv(fresh_venv, {DIST: version}).dists == []


def test_only_exact_pins_are_accepted():
    assert parse_pins(["Torch==2.13.0+cpu"]) == {"torch": "2.13.0+cpu"}
    with pytest.raises(ValueError, match="exact pin"):
        parse_pins(["torch>=2"])
