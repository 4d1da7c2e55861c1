"""Benchmark: the pipeline's output tokens/s vs a bare async OpenAI client's, same server, same concurrency.

Both sides send the same rendered example prompts (with ``response_format``) at the same number of
requests in flight. The pipeline side is the real thing: the Prefect ``generate-shard`` tasks inside
a flow, the schema-validating client, and atomic Parquet shard writes. Trials alternate which side
goes first (bare, pipeline / pipeline, bare / ...) to spread machine noise over both; the median and
range of each side and of the per-trial ratio (pipeline / bare) are printed last.

    python bench/generation.py --requests 96 --concurrency 16 --trials 3
    python bench/generation.py --stub          # no LLM server: tests/support/stub_llm.py's deterministic stub

Needs the LLM server (``embed-factory llm up``; 127.0.0.1:8011 for the embedded one) unless ``--stub``;
uses the configured Prefect API, else a throw-away one for the bench's lifetime. With ``--stub`` the
answers cost no model time, so the ratio measures the pipeline's own overhead (validation, Prefect
tasks, shard writes) at its worst; the stub's deliberately invalid answers (one in 9) are turned off
so both sides get the same work.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import pyarrow as pa
from openai import AsyncOpenAI
from prefect import flow

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ground.settings import load_settings  # noqa: E402
from llm.client import LLMClient, Sampling  # noqa: E402
from prompts.render import render_example  # noqa: E402
from prompts.task_types import TASK_TYPES, get_task_type  # noqa: E402
from storage.schemas import INSTRUCTION_SCHEMA  # noqa: E402
from storage.shards import RunStore  # noqa: E402
from tasks.generation.generate import ExampleShard, example_shard_task, plan_examples, split_targets  # noqa: E402
from tasks.generation.rounds import run_shards  # noqa: E402

INSTRUCTIONS = {
    "retrieval": "Given a question about home gardening, retrieve forum posts that answer it.",
    "classification": "Classify customer reviews of kitchen appliances by sentiment.",
    "short_short": "Match a word with its dictionary definition.",
    "long_long": "Given a news article, retrieve articles covering the same event from another outlet.",
}


def bench_plan(n: int, shard_size: int, seed: int) -> list[ExampleShard]:
    rows = [
        {
            "instruction_id": f"{t}-000001",
            "task_type": t,
            "instruction": text,
            "normalized": text.lower(),
            "persona_id": "p_bench",
            "persona": "A benchmark persona.",
        }
        for t, text in INSTRUCTIONS.items()
    ]
    table = pa.Table.from_pylist(rows, schema=INSTRUCTION_SCHEMA)
    return plan_examples("bench", 0, split_targets(n, list(TASK_TYPES)), table, seed, shard_size)


async def bare_client(
    base_url: str, model: str, api_key: str, shards: list[ExampleShard], sampling: Sampling, concurrency: int
) -> tuple[int, float]:
    """The reference: one AsyncOpenAI client, a semaphore, nothing else."""
    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    prompts = [
        render_example(get_task_type(r.task_type), r.instruction, dict(r.placeholders))
        for shard in shards
        for r in shard.requests
    ]

    async def one(prompt) -> int:
        async with gate:
            response = await client.chat.completions.create(
                model=model,
                messages=prompt.messages,
                response_format=prompt.response_format,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
            )
            return response.usage.completion_tokens

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
    elapsed = time.perf_counter() - start
    await client.close()
    return tokens, elapsed


@flow(name="bench-generation")
async def pipeline_flow(
    base_url: str,
    model: str,
    api_key: str,
    shards: list[ExampleShard],
    sampling: Sampling,
    concurrency: int,
    shards_in_flight: int,
    data_dir: str,
) -> tuple[int, float]:
    store = RunStore(Path(data_dir), f"bench-{time.time_ns()}")
    client = LLMClient(
        base_url, model, api_key, max_in_flight=concurrency, schema_retries=0, send_seed=load_settings().llm.send_seed
    )
    start = time.perf_counter()
    await run_shards(example_shard_task, store, shards, client, sampling, shards_in_flight)
    elapsed = time.perf_counter() - start
    await client.close()
    return client.stats.completion_tokens, elapsed


def spread(values: list[float], unit: str) -> str:
    return f"median {statistics.median(values):8.2f} {unit} (range {min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=96, help="requests per trial and side")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight, both sides")
    parser.add_argument("--shard-size", type=int, default=48)
    parser.add_argument("--shards-in-flight", type=int, default=2)
    parser.add_argument("--trials", type=int, default=3, help="trials per side, alternating which goes first")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--stub", action="store_true", help="serve tests/support/stub_llm.py's stub instead")
    args = parser.parse_args()
    if args.trials < 1:
        parser.error("--trials must be at least 1")

    settings = load_settings()
    sampling = Sampling(settings.llm.temperature, settings.llm.top_p, args.max_tokens or settings.llm.max_tokens)
    shards = bench_plan(args.requests, args.shard_size, settings.generation.seed)
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls from the bench's API
    configured = settings.prefect.api_url or os.environ.get("PREFECT_API_URL")

    if args.stub:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
        from stub_llm import StubLLM

        server = StubLLM(invalid_every=0)
    else:
        server = nullcontext()
    # a configured Prefect API, else a throw-away one (SQLite in a temp dir) for this bench only
    api = temporary_settings(updates={PREFECT_API_URL: configured}) if configured else prefect_test_harness(600)
    with server as stub, tempfile.TemporaryDirectory() as tmp, api:
        if stub is not None:
            base_url, model, key = stub.base_url, stub.model, "EMPTY"
        else:
            base_url, model = settings.llm_base_url, settings.llm_model
            key = settings.llm.api_key.get_secret_value()
        print(
            f"server {base_url} ({'stub' if stub is not None else model}), {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        sides = {
            "bare client": lambda: bare_client(base_url, model, key, shards, sampling, args.concurrency),
            "pipeline": lambda: pipeline_flow(
                base_url, model, key, shards, sampling, args.concurrency, args.shards_in_flight, tmp
            ),
        }
        asyncio.run(bare_client(base_url, model, key, shards[:1], sampling, args.concurrency))  # warm-up
        rates: dict[str, list[float]] = {name: [] for name in sides}
        for trial in range(args.trials):
            order = list(sides) if trial % 2 == 0 else list(sides)[::-1]
            for name in order:
                tokens, elapsed = asyncio.run(sides[name]())
                rates[name].append(tokens / elapsed)
                print(
                    f"trial {trial}: {name:<12} {tokens:6d} tokens in {elapsed:6.1f}s = {rates[name][-1]:8.1f} tok/s",
                    flush=True,
                )
    bare, pipe = rates["bare client"], rates["pipeline"]
    ratios = [p / b for p, b in zip(pipe, bare, strict=True)]
    print(
        f"requests/trial {args.requests}, concurrency {args.concurrency}, trials {args.trials}, "
        f"max_tokens {sampling.max_tokens}, server {'stub' if args.stub else model}, "
        f"load average now {os.getloadavg()[0]:.1f}"
    )
    print(f"  bare client {spread(bare, 'tok/s')}")
    print(f"  pipeline    {spread(pipe, 'tok/s')}")
    print(f"  ratio pipeline/bare: {spread(ratios, 'x')}")


if __name__ == "__main__":
    main()
