"""Flow ``generate``: personas → brainstormed unique instructions → example shards (orchestration only).

Re-running a run id resumes it: completed shards are skipped, the rest are (re)done.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow, get_run_logger

from ground import progress
from ground.secrets import reveal
from ground.settings import Settings, TaskTypeName, load_settings
from tasks.generation.expand_personas import expand_personas
from personas.sampling import PersonaSampler
from personas.sources import load_personas, read_persona_jsonl
from prompts.task_types import get_task_type
from storage.shards import RunStore
from tasks.generation.brainstorm import brainstorm_shard_task, deficits, plan_round, unique_instructions
from tasks.generation.generate import count_by_type, example_shard_task, plan_examples, split_targets
from llm.client import LLMClient, Sampling


class RunConfigMismatch(ValueError):
    """An existing run id was started with other generation settings."""


@dataclass
class GenerateSummary:
    run_id: str
    run_dir: str
    examples_by_type: dict[str, int]
    rejects: int
    requests: int
    failure_rate: float
    completion_tokens: int
    tokens_per_s: float
    elapsed_s: float
    unique_instructions: dict[str, int]
    personas: int
    shards_written: int
    shards_skipped: int
    warnings: list[str] = field(default_factory=list)
    # what this session asked of the LLM server (a resumed run counts only its own requests)
    llm_calls: int = 0  # chat completions asked for, schema re-asks included
    http_attempts: int = 0  # HTTP requests sent, transport retries included
    transport_failures: int = 0  # attempts without a usable answer (429/5xx, timeouts, resets, bad bodies)
    transport_retries: int = 0
    schema_retries: int = 0
    transport_failure_rate: float = 0.0

    @property
    def examples(self) -> int:
        return sum(self.examples_by_type.values())


def rejects_by_reason(rejects, top: int = 3) -> str:
    """The most frequent reject reasons, e.g. ``"http 500: boom" ×4, "timeout after retries" ×2``."""
    counts: dict[str, int] = {}
    for reason in rejects["reason"].to_pylist() if rejects.num_rows else []:
        counts[reason] = counts.get(reason, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return ", ".join(f"{reason!r} ×{n}" for reason, n in ranked) or "none"


def before_round(table: pa.Table, round_prefix: str) -> pa.Table:
    """Rows of the shards of rounds before ``round_prefix`` (shard ids sort by round): all a round's plan may use.

    A run killed mid-round has some of that round's shards; planning from them would re-plan the
    round differently, so a resumed run would skip or redo other requests than the killed one had.
    """
    return table.filter(pc.less(table["shard_id"], round_prefix))


def run_fingerprint(settings: Settings) -> dict[str, Any]:
    """What must not change between a run and its resumption."""
    generation = settings.generation.model_dump(exclude={"shards_in_flight"})
    return {
        "generation": generation,
        "personas": settings.personas.model_dump(),
        "model": settings.llm_model,
        "sampling": settings.llm.model_dump(include={"temperature", "top_p", "max_tokens", "brainstorm_max_tokens"}),
    }


def make_client(settings: Settings) -> LLMClient:
    # endpoints taken out / back show in the flow run's log
    return LLMClient.from_settings(settings, logger=get_run_logger())


async def run_shards(shard_task, store: RunStore, shards: Sequence, client: LLMClient, sampling: Sampling,
                     shards_in_flight: int) -> list:
    """Run shard tasks with at most ``shards_in_flight`` at once; requests are bounded by the client."""
    gate = asyncio.Semaphore(shards_in_flight)

    async def run(shard):
        async with gate:
            return await shard_task(store, shard, client, sampling)

    return await asyncio.gather(*(run(shard) for shard in shards))


async def generate_run(settings: Settings, run_id: str) -> GenerateSummary:
    """The body of the flow; callable directly (tests, CLI) inside a flow context."""
    logger = get_run_logger()
    gen = settings.generation
    store = RunStore.from_settings(settings, run_id)
    started = time.monotonic()
    written = skipped = 0
    warnings: list[str] = []

    with store.exclusive():
        info = store.read_run_info()
        fingerprint = run_fingerprint(settings)
        if info is not None and info.get("fingerprint") != fingerprint:
            raise RunConfigMismatch(
                f"run {run_id!r} already exists with other settings ({store.run_info_path}); "
                "resume it with the same settings or choose a new --run-id"
            )
        if info is None:
            store.write_run_info({"fingerprint": fingerprint, "profile": settings.profile})

        async with make_client(settings) as client:
            brainstorm_sampling = Sampling(settings.llm.temperature, settings.llm.top_p, settings.llm.brainstorm_max_tokens)
            sampling = Sampling(settings.llm.temperature, settings.llm.top_p, settings.llm.max_tokens)

            # 1. personas (expanded once per run, then reused from the run folder)
            if store.personas_path.exists():
                pool = read_persona_jsonl(store.personas_path)
            else:
                p = settings.personas
                pool = load_personas(p.source, hub_repo=p.hub_repo, hub_file=p.hub_file,
                                     hub_revision=p.hub_revision, limit=p.limit)
                if p.expand_rounds:
                    pool = await expand_personas(pool, client, brainstorm_sampling, p.expand_rounds,
                                                 p.expand_per_persona, gen.seed)
                store.write_personas([(x.persona_id, x.text) for x in pool])
            logger.info("persona pool: %d personas", len(pool))
            sampler = PersonaSampler(pool, gen.seed)

            # 2. brainstorm until every brainstormed type has its unique instructions
            example_targets = split_targets(gen.examples, gen.task_types)
            brainstormed = [t for t in gen.task_types if get_task_type(t).brainstorms]
            if gen.unique_instructions:
                instruction_targets = split_targets(gen.unique_instructions, brainstormed) if brainstormed else {}
            else:
                instruction_targets = {t: example_targets[t] for t in brainstormed}
            for round_idx in range(gen.max_brainstorm_rounds):
                # from earlier rounds' shards only, so a resumed run plans this round exactly as before
                instructions = unique_instructions(before_round(store.read_kind("brainstorm"), f"b{round_idx:03d}"),
                                                   instruction_targets)
                missing = deficits(instructions, instruction_targets)
                if not any(missing.values()):
                    break
                shards = plan_round(round_idx, missing, sampler, gen.instructions_per_brainstorm,
                                    gen.shard_size, gen.seed)
                todo = [s for s in shards if not store.is_complete("brainstorm", s.shard_id)]
                skipped += len(shards) - len(todo)
                progress.add_total("brainstorm", sum(len(s.requests) for s in todo))
                logger.info("brainstorm round %d: deficits %s, %d shard(s) to run, %d done",
                            round_idx, missing, len(todo), len(shards) - len(todo))
                await run_shards(brainstorm_shard_task, store, todo, client, brainstorm_sampling, gen.shards_in_flight)
                written += len(todo)
                instructions = unique_instructions(store.read_kind("brainstorm"), instruction_targets)
            store.write_instructions(instructions)
            short = {t: n for t, n in deficits(instructions, instruction_targets).items() if n}
            if short:
                warnings.append(f"unique instructions short of target after {gen.max_brainstorm_rounds} rounds: {short}")
                logger.warning(warnings[-1])

            # 3. examples, then top-up rounds for what failed
            for round_idx in range(gen.max_topup_rounds + 1):
                have = count_by_type(before_round(store.read_kind("examples"), f"g{round_idx:02d}"))
                wanted = example_targets if round_idx == 0 else {
                    t: max(0, example_targets[t] - have.get(t, 0)) for t in example_targets
                }
                if not any(wanted.values()):
                    break
                shards = plan_examples(run_id, round_idx, wanted, instructions, gen.seed, gen.shard_size,
                                       gen.placeholder_overrides)
                todo = [s for s in shards if not store.is_complete("examples", s.shard_id)]
                skipped += len(shards) - len(todo)
                progress.add_total("generate", sum(len(s.requests) for s in todo))
                logger.info("generation round %d: %d shard(s) to run, %d done", round_idx, len(todo),
                            len(shards) - len(todo))
                await run_shards(example_shard_task, store, todo, client, sampling, gen.shards_in_flight)
                written += len(todo)

        examples = store.read_kind("examples")
        rejects = store.read_kind("rejects")
        by_type = count_by_type(examples)
        short = {t: example_targets[t] - by_type.get(t, 0) for t in example_targets if by_type.get(t, 0) < example_targets[t]}
        if short:
            warnings.append(f"examples short of target: {short}")
            logger.warning(warnings[-1])
        requests = examples.num_rows + rejects.num_rows
        elapsed = time.monotonic() - started
        stats = client.stats
        transport_rate = stats.transport_failures / stats.http_attempts if stats.http_attempts else 0.0
        if transport_rate > settings.llm.warn_failure_rate:
            warnings.append(f"{stats.transport_failures} of {stats.http_attempts} HTTP attempts to the LLM server "
                            f"failed ({transport_rate:.1%}; {stats.transport_retries} transport retries)")
            logger.warning(warnings[-1])
        if requests and rejects.num_rows / requests > settings.llm.warn_failure_rate:
            warnings.append(f"{rejects.num_rows} of {requests} requests were rejected "
                            f"({rejects.num_rows / requests:.1%}); reasons: {rejects_by_reason(rejects)}")
            logger.warning(warnings[-1])
        summary = GenerateSummary(
            run_id=run_id,
            run_dir=str(store.root),
            examples_by_type=dict(sorted(by_type.items())),
            rejects=rejects.num_rows,
            requests=requests,
            failure_rate=rejects.num_rows / requests if requests else 0.0,
            completion_tokens=client.stats.completion_tokens,
            tokens_per_s=client.stats.completion_tokens / elapsed if elapsed else 0.0,
            elapsed_s=elapsed,
            unique_instructions=count_by_type(instructions),
            personas=len(pool),
            shards_written=written,
            shards_skipped=skipped,
            warnings=warnings,
            llm_calls=stats.requests,
            http_attempts=stats.http_attempts,
            transport_failures=stats.transport_failures,
            transport_retries=stats.transport_retries,
            schema_retries=stats.schema_retries,
            transport_failure_rate=transport_rate,
        )
        logger.info("run %s: %d examples %s, %d rejects, %.0f completion tokens/s", run_id, summary.examples,
                    summary.examples_by_type, summary.rejects, summary.tokens_per_s)
        logger.info("LLM: %d calls, %d HTTP attempts, %d transport failures (%.1f%%), %d transport retries, "
                    "%d schema retries", stats.requests, stats.http_attempts, stats.transport_failures,
                    100 * transport_rate, stats.transport_retries, stats.schema_retries)
        return summary


@flow(name="generate", flow_run_name="generate-{run_id}")
async def generate(
    run_id: str,
    examples: int | None = None,
    task_types: list[TaskTypeName] | None = None,
    seed: int | None = None,
    unique_instructions: int | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """Generate persona-driven embedding training examples into Parquet shards of ``run_id``.

    Args:
        run_id: Generation run id; re-use one to resume that run.
        examples: Target number of parsed examples over all task types (default: the profile's).
        task_types: Task types to generate (default: all six).
        seed: Sampling seed for personas and placeholders (default: generation.seed).
        unique_instructions: Target unique brainstormed instructions (default: what examples needs).
        profile: Settings profile: local or production (default: the environment's).
    """
    overrides = {k: v for k, v in {"examples": examples, "task_types": task_types, "seed": seed,
                                   "unique_instructions": unique_instructions}.items() if v is not None}
    settings = load_settings(profile=profile, generation=overrides)
    return asdict(await generate_run(settings, run_id))
