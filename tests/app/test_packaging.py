"""The worker image and the wheel carry every package of the project (the redesign once left two behind)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def project_packages() -> set[str]:
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    return {pattern.rstrip("*") for pattern in include}


def test_every_top_level_package_is_declared_and_copied_into_the_worker_image():
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    declared = project_packages()
    assert on_disk == declared, (
        f"pyproject's packages.find.include {sorted(declared)} vs packages on disk {sorted(on_disk)}"
    )
    copied = set(re.findall(r"^COPY (\w+) \1$", (ROOT / "Dockerfile").read_text(), flags=re.M))
    assert declared <= copied, f"the Dockerfile does not copy {sorted(declared - copied)}"


def test_import_linter_sees_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert set(config["root_packages"]) == project_packages()
