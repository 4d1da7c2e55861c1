"""Benchmark: README command 1's install on a fresh machine, from the lock file vs resolving pyproject's ranges.

Each trial makes a fresh venv and runs ``pip install -e .`` twice into new folders: once with
``-c requirements.lock`` (embed_factory/env_lock.py) and once without (as before the lock). pip's download
cache is off for both sides (``PIP_NO_CACHE_DIR=1``: empty caches, as on a fresh machine); each side's clock
covers its own ``venv`` + ``pip install``. Trials alternate which side goes first. Prints each time, then the
medians and the ratio, and the load average around the run (the machine is shared).

    python bench/install.py --trials 1 [--extras test]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_install(locked: bool, extras: str, root: Path) -> float:
    venv = Path(tempfile.mkdtemp(prefix="locked-" if locked else "resolved-", dir=root)) / "venv"
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1"}
    spec = f".[{extras}]" if extras else "."
    command = [str(venv / "bin" / "pip"), "install", "-q", *(["-c", "requirements.lock"] if locked else []), "-e", spec]
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(command, check=True, cwd=ROOT, env=env)
    seconds = time.monotonic() - started
    shutil.rmtree(venv.parent)
    print(f"  {'lock' if locked else 'resolve'}: {seconds:.1f}s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--extras", default="", help="extras to install too, e.g. test (README command 2)")
    args = parser.parse_args()
    times: dict[bool, list[float]] = {True: [], False: []}
    print(f"load average before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-install-") as tmp:
        for trial in range(args.trials):
            order = [True, False] if trial % 2 == 0 else [False, True]
            print(f"trial {trial + 1}: {' then '.join('lock' if o else 'resolve' for o in order)}", flush=True)
            for locked in order:
                times[locked].append(one_install(locked, args.extras, Path(tmp)))
    lock, resolve = statistics.median(times[True]), statistics.median(times[False])
    print(f"load average after: {os.getloadavg()}")
    print(
        f"install from the lock {lock:.1f}s (range {min(times[True]):.1f}-{max(times[True]):.1f}) vs resolving "
        f"{resolve:.1f}s (range {min(times[False]):.1f}-{max(times[False]):.1f}): {resolve / lock:.2f}x, "
        f"{args.trials} trial(s)"
    )


if __name__ == "__main__":
    main()
