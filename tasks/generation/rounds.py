"""The steps of a generation run: persona pool → brainstorm rounds → example and top-up rounds.

Each step plans its rounds from the settings and the shards already committed, skips the shards
that are complete, and runs the rest (``run_shards``, each shard under its claim); so a run killed
anywhere re-plans the same shards when resumed and redoes only what was not committed.
``flows/generate.py`` calls the steps in order inside the run's coordinator lock; the example rounds
may hand their shards to other worker processes (``execute``, ``tasks/generation/workers.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger

from ground import progress
from ground.settings import GenerationSettings, PersonaSettings
from llm.client import LLMClient, Sampling
from personas.sampling import PersonaSampler
from personas.sources import Persona, load_persona_pool, read_persona_jsonl
from prompts.task_types import get_task_type
from storage.schemas import EXAMPLE_SCHEMA, count_by_type
from storage.shards import RunStore, ShardRecord, read_parquet_checked
from tasks.generation.brainstorm import (
    OVERSHOOT,
    BrainstormShard,
    brainstorm_shard_task,
    deficits,
    next_overshoots,
    plan_round,
    unique_instructions,
)
from tasks.generation.expand_personas import expand_personas
from tasks.generation.generate import (
    ExampleShard,
    example_shard_task,
    plan_examples,
    split_targets,
)
from tasks.generation.intents import Encode
from tasks.generation.workers import run_claimed

ShardTask = Callable[[RunStore, object, LLMClient, Sampling], Awaitable[object]]
#: called with each shard's record as it commits (the flow shows progress from it); never told of skipped shards
OnShard = Callable[[ShardRecord], None]
#: runs a round's example shards somewhere else (other worker processes) and returns when all are committed
Execute = Callable[[Sequence[ExampleShard], OnShard | None], Awaitable[None]]


@dataclass
class ShardTally:
    """Shards this session ran (``written``) and found committed by an earlier session (``skipped``)."""

    written: int = 0
    skipped: int = 0


@dataclass(frozen=True)
class Brainstormed:
    instructions: pa.Table  # the unique instructions (INSTRUCTION_SCHEMA), as written to instructions.parquet
    short: dict[str, int]  # instructions still missing per task type after the last round (only types short)
    max_rounds: int

    @property
    def warning(self) -> str | None:
        if not self.short:
            return None
        return f"unique instructions short of target after {self.max_rounds} rounds: {self.short}"


async def run_shards(
    shard_task: ShardTask,
    store: RunStore,
    shards: Sequence,
    client: LLMClient,
    sampling: Sampling,
    shards_in_flight: int,
    on_shard: OnShard | None = None,
) -> list:
    """Run shard tasks with at most ``shards_in_flight`` at once; requests are bounded by the client.

    When a shard fails, no further shard starts and the ones in flight finish before the first error is
    raised: the caller closes the client after this returns, and a shard still sending would fail with
    "client has been closed" (a traceback for what is one user error, e.g. a full disk).
    """
    gate = asyncio.Semaphore(shards_in_flight)
    errors: list[BaseException] = []

    async def run(shard):
        kind = "brainstorm" if isinstance(shard, BrainstormShard) else "examples"  # example or grounded shard
        async with gate:
            if errors:
                return None  # a shard failed: start no more
            try:
                record = await run_claimed(
                    store, kind, shard.shard_id, lambda: shard_task(store, shard, client, sampling)
                )
            except BaseException as exc:
                errors.append(exc)
                raise
            if on_shard is not None and isinstance(record, ShardRecord):
                on_shard(record)
            return record

    results = await asyncio.gather(*(run(shard) for shard in shards), return_exceptions=True)
    if errors:
        raise errors[0]
    return results


def before_round(table: pa.Table, round_prefix: str) -> pa.Table:
    """Rows of the shards of rounds before ``round_prefix`` (shard ids sort by round): all a round's plan may use.

    A run killed mid-round has some of that round's shards; planning from them would re-plan the
    round differently, so a resumed run would skip or redo other requests than the killed one had.
    """
    return table.filter(pc.less(table["shard_id"], round_prefix))


def example_targets(gen: GenerationSettings) -> dict[str, int]:
    """Parsed examples wanted per task type."""
    return split_targets(gen.examples, gen.task_types)


def instruction_targets(gen: GenerationSettings) -> dict[str, int]:
    """Unique instructions wanted per brainstormed type: ``unique_instructions`` split, else one per example."""
    brainstormed = [t for t in gen.task_types if get_task_type(t).brainstorms]
    if gen.unique_instructions:
        return split_targets(gen.unique_instructions, brainstormed) if brainstormed else {}
    wanted = example_targets(gen)
    return {t: wanted[t] for t in brainstormed}


def _todo(store: RunStore, kind: str, shards: Sequence, tally: ShardTally) -> list:
    """The planned shards not yet committed; counts the committed ones as skipped."""
    todo = [s for s in shards if not store.is_complete(kind, s.shard_id)]
    tally.skipped += len(shards) - len(todo)
    return todo


async def persona_pool(
    store: RunStore, cfg: PersonaSettings, client: LLMClient, sampling: Sampling, seed: int
) -> list[Persona]:
    """The run's personas: read (and expanded, if configured) once, then reused from the run folder."""
    if store.personas_path.exists():
        pool = read_persona_jsonl(store.personas_path)
    else:
        load = load_persona_pool(cfg)  # bad lines skipped and over-long personas cut as the settings say
        for note in load.notes():
            get_run_logger().warning("personas: %s", note)
        pool = load.personas
        if cfg.expand_rounds:
            pool = await expand_personas(pool, client, sampling, cfg.expand_rounds, cfg.expand_per_persona, seed)
        store.write_personas([(x.persona_id, x.text) for x in pool])
    get_run_logger().info("persona pool: %d personas", len(pool))
    return pool


async def brainstorm_to_targets(
    store: RunStore,
    gen: GenerationSettings,
    sampler: PersonaSampler,
    client: LLMClient,
    sampling: Sampling,
    tally: ShardTally,
    on_shard: OnShard | None = None,
    encode: Encode | None = None,
) -> Brainstormed:
    """Brainstorm rounds until every brainstormed type has its intents (or the rounds run out).

    ``encode``: the instruction embedder for semantic dedup (``generation.intent_threshold``); None: text dedup only.
    """
    threshold = gen.intent_threshold if encode is not None else None
    logger = get_run_logger()
    targets = instruction_targets(gen)
    per_request = gen.instructions_per_brainstorm
    overshoot: dict[str, float] = {}
    last: dict[str, int] = {}  # the deficits the previous round was planned for
    for round_idx in range(gen.max_brainstorm_rounds):
        # from earlier rounds' shards only, so a resumed run plans this round exactly as before
        earlier = before_round(store.read_kind("brainstorm"), f"b{round_idx:03d}")
        instructions = unique_instructions(earlier, targets, encode, threshold)
        missing = deficits(instructions, targets)
        if not any(missing.values()):
            break
        overshoot = next_overshoots(overshoot, last, missing, per_request)  # sized by what the last round yielded
        last = missing
        shards = plan_round(round_idx, missing, sampler, per_request, gen.shard_size, gen.seed, overshoot)
        todo = _todo(store, "brainstorm", shards, tally)
        progress.add_total("brainstorm", sum(len(s.requests) for s in todo))
        logger.info(
            "brainstorm round %d: deficits %s, overshoot %s, %d shard(s) to run, %d done",
            round_idx,
            missing,
            {t: round(overshoot.get(t, OVERSHOOT), 2) for t, n in missing.items() if n},
            len(todo),
            len(shards) - len(todo),
        )
        await run_shards(brainstorm_shard_task, store, todo, client, sampling, gen.shards_in_flight, on_shard)
        tally.written += len(todo)
    else:  # the rounds ran out: what every round brought
        instructions = unique_instructions(store.read_kind("brainstorm"), targets, encode, threshold)
    store.write_instructions(instructions)
    result = Brainstormed(
        instructions, {t: n for t, n in deficits(instructions, targets).items() if n}, gen.max_brainstorm_rounds
    )
    if result.warning:
        logger.warning(result.warning)
    return result


def _examples_by_type(store: RunStore, shards: Sequence) -> dict[str, int]:
    """Examples per task type in the given (committed) example shards."""
    counts: dict[str, int] = {}
    for shard in shards:
        for task_type, n in count_by_type(
            read_parquet_checked(store.shard_path("examples", shard.shard_id), EXAMPLE_SCHEMA)
        ).items():
            counts[task_type] = counts.get(task_type, 0) + n
    return counts


async def examples_with_topups(
    store: RunStore,
    gen: GenerationSettings,
    instructions: pa.Table,
    client: LLMClient,
    sampling: Sampling,
    tally: ShardTally,
    on_shard: OnShard | None = None,
    execute: Execute | None = None,
    mix: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, int]:
    """The example round, then top-up rounds for what failed; returns the examples per task type.
    ``mix``: per task type, the generator models' weights (None: the client's one model).

    ``execute``: where the shards run (None: here, ``shards_in_flight`` at once on ``client``).

    Each round's plan depends only on the counts of the rounds before it, added up from each
    round's own shards once it is done (no shard is read twice).
    """
    logger = get_run_logger()
    targets = example_targets(gen)
    have: dict[str, int] = {}
    for round_idx in range(gen.max_topup_rounds + 1):
        wanted = targets if round_idx == 0 else {t: max(0, targets[t] - have.get(t, 0)) for t in targets}
        if not any(wanted.values()):
            break
        shards = plan_examples(
            store.run_id,
            round_idx,
            wanted,
            instructions,
            gen.seed,
            gen.shard_size,
            gen.placeholder_overrides,
            sampling.max_tokens_ceiling,  # the placeholders are capped to what the context holds
            mix,
        )
        todo = _todo(store, "examples", shards, tally)
        progress.add_total("generate", sum(len(s.requests) for s in todo))
        logger.info("generation round %d: %d shard(s) to run, %d done", round_idx, len(todo), len(shards) - len(todo))
        if execute is None:
            await run_shards(example_shard_task, store, todo, client, sampling, gen.shards_in_flight, on_shard)
        else:
            await execute(todo, on_shard)
        tally.written += len(todo)
        for task_type, n in _examples_by_type(store, shards).items():
            have[task_type] = have.get(task_type, 0) + n
    return have
