"""Benchmark: the pipeline's output tokens/s vs a bare async OpenAI client's, same server, same concurrency.

Both sides send the same rendered example prompts (with ``response_format``) at the same number of
requests in flight. The pipeline side is the real thing: the Prefect ``generate-shard`` tasks inside
a flow, the schema-validating client, and atomic Parquet shard writes. Trials alternate
(bare, pipeline, bare, pipeline, ...) to spread machine noise over both. The ratio is printed last.

    python bench/generation.py --requests 96 --concurrency 16 --trials 2

Needs the LLM server (``embed-factory llm up``) and a Prefect API (started here if none).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from openai import AsyncOpenAI
from prefect import flow

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embed_factory.prefect_server import resolve_api_url  # noqa: E402
from ground.settings import load_settings  # noqa: E402
from flows.generate import run_shards  # noqa: E402
from prompts.render import render_example  # noqa: E402
from prompts.task_types import TASK_TYPES, get_task_type  # noqa: E402
from storage.schemas import INSTRUCTION_SCHEMA  # noqa: E402
from storage.shards import RunStore  # noqa: E402
from tasks.generation.generate import ExampleShard, example_shard_task, plan_examples, split_targets  # noqa: E402
from llm.client import LLMClient, Sampling  # noqa: E402

INSTRUCTIONS = {
    "retrieval": "Given a question about home gardening, retrieve forum posts that answer it.",
    "classification": "Classify customer reviews of kitchen appliances by sentiment.",
    "short_short": "Match a word with its dictionary definition.",
    "long_long": "Given a news article, retrieve articles covering the same event from another outlet.",
}


def bench_plan(n: int, shard_size: int, seed: int) -> list[ExampleShard]:
    rows = [{"instruction_id": f"{t}-000001", "task_type": t, "instruction": text, "normalized": text.lower(),
             "persona_id": "p_bench", "persona": "A benchmark persona."} for t, text in INSTRUCTIONS.items()]
    table = pa.Table.from_pylist(rows, schema=INSTRUCTION_SCHEMA)
    return plan_examples("bench", 0, split_targets(n, list(TASK_TYPES)), table, seed, shard_size)


async def bare_client(base_url: str, model: str, api_key: str, shards: list[ExampleShard], sampling: Sampling,
                      concurrency: int) -> tuple[int, float]:
    """The reference: one AsyncOpenAI client, a semaphore, nothing else."""
    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    prompts = [render_example(get_task_type(r.task_type), r.instruction, dict(r.placeholders))
               for shard in shards for r in shard.requests]

    async def one(prompt) -> int:
        async with gate:
            response = await client.chat.completions.create(
                model=model, messages=prompt.messages, response_format=prompt.response_format,
                temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens)
            return response.usage.completion_tokens

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
    elapsed = time.perf_counter() - start
    await client.close()
    return tokens, elapsed


@flow(name="bench-generation")
async def pipeline_flow(base_url: str, model: str, api_key: str, shards: list[ExampleShard], sampling: Sampling,
                        concurrency: int, shards_in_flight: int, data_dir: str) -> tuple[int, float]:
    store = RunStore(Path(data_dir), f"bench-{time.time_ns()}")
    client = LLMClient(base_url, model, api_key, max_in_flight=concurrency, schema_retries=0,
                       send_seed=load_settings().llm.send_seed)
    start = time.perf_counter()
    await run_shards(example_shard_task, store, shards, client, sampling, shards_in_flight)
    elapsed = time.perf_counter() - start
    await client.close()
    return client.stats.completion_tokens, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=96, help="requests per trial and side")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight, both sides")
    parser.add_argument("--shard-size", type=int, default=48)
    parser.add_argument("--shards-in-flight", type=int, default=2)
    parser.add_argument("--trials", type=int, default=2, help="alternating trials per side")
    parser.add_argument("--max-tokens", type=int, default=None)
    args = parser.parse_args()

    settings = load_settings()
    sampling = Sampling(settings.llm.temperature, settings.llm.top_p, args.max_tokens or settings.llm.max_tokens)
    base_url, model, key = settings.llm_base_url, settings.llm_model, settings.llm.api_key.get_secret_value()
    shards = bench_plan(args.requests, args.shard_size, settings.generation.seed)
    api_url = resolve_api_url(settings, print)

    from prefect.settings import PREFECT_API_URL, temporary_settings

    bare, pipe = [], []
    with tempfile.TemporaryDirectory() as tmp, temporary_settings(updates={PREFECT_API_URL: api_url}):
        asyncio.run(bare_client(base_url, model, key, shards[:1], sampling, args.concurrency))  # warm-up
        for trial in range(args.trials):
            tokens, elapsed = asyncio.run(bare_client(base_url, model, key, shards, sampling, args.concurrency))
            bare.append(tokens / elapsed)
            print(f"trial {trial}: bare client  {tokens:6d} tokens in {elapsed:6.1f}s = {bare[-1]:7.1f} tok/s")
            tokens, elapsed = asyncio.run(pipeline_flow(base_url, model, key, shards, sampling, args.concurrency,
                                                        args.shards_in_flight, tmp))
            pipe.append(tokens / elapsed)
            print(f"trial {trial}: pipeline     {tokens:6d} tokens in {elapsed:6.1f}s = {pipe[-1]:7.1f} tok/s")
    print(f"requests/trial {args.requests}, concurrency {args.concurrency}, trials {args.trials}, "
          f"max_tokens {sampling.max_tokens}")
    print(f"bare client mean {statistics.mean(bare):.1f} tok/s; pipeline mean {statistics.mean(pipe):.1f} tok/s")
    print(f"ratio pipeline/bare: {statistics.mean(pipe) / statistics.mean(bare):.3f}")


if __name__ == "__main__":
    main()
