"""Flow ``generate``: personas → brainstormed unique instructions → example shards (orchestration only).

The steps are in ``tasks/generation/rounds.py``; this module checks the run's settings against
the ones it started with, runs the steps in order under the run's coordinator lock, and sums the run up.
Re-running a run id resumes it: completed shards are skipped, the rest are (re)done.

The personas and the brainstorm run here, once per run; the example shards run here too
(``generation.task_runner = "inline"``) or on the workers of a Dask cluster (``"dask"``,
``flows/runners.py``), each shard under its claim, with its own client over a share of ``llm.base_urls``.
A grounded run (``generation.corpus``) replaces the brainstorm and example rounds by ``flows/grounded.py``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow, get_run_logger

from flows.artifacts import GenerateProgress, publish_generate
from flows.endpoints import degraded_warnings, publish_endpoints
from flows.grounded import grounded_examples, grounded_passages, grounded_target
from flows.runners import on_workers, shard_runner
from ground.cost_plan import Plan
from ground.costs import generation_rows
from ground.settings import Settings, TaskTypeName, load_settings
from ground.task_types import BRAINSTORM_TASK_TYPES
from llm.client import ClientStats, LLMClient, Sampling
from llm.embedder import make_embedder
from personas.sampling import PersonaSampler
from prompts.budget import answer_room, budget_problems
from storage.embedding_cache import EmbeddingCache, embeddings_dir, encode_cached
from storage.ledger import read_ledger, read_plan, write_ledger, write_plan
from storage.location import data_root
from storage.schemas import INSTRUCTION_SCHEMA, count_by_type
from storage.shards import RunStore
from tasks.generation.intents import intent_summary
from tasks.generation.rounds import (
    Brainstormed,
    ShardTally,
    brainstorm_to_targets,
    example_targets,
    examples_with_topups,
    persona_pool,
)
from tasks.generation.usage import USAGE_COLUMNS, usage_by_type
from tasks.generation.workers import add_stats, merge_endpoints, stats_counts


class RunConfigMismatch(ValueError):
    """An existing run id was started with other generation settings."""


class TargetsMissed(ValueError):
    """A task type ended far below its target: the run is Failed (its shards stay, a re-run resumes it)."""


#: a run with a task type below this share of its target ends Failed
FAIL_BELOW_SHARE = 0.5


def _advice(reason: str) -> str:
    """What to change for a run whose top reject reason is ``reason``."""
    if reason.startswith("truncated") or "(length)" in reason:
        return (
            "the answers do not fit the token budget: raise llm.context_tokens (the server's max_model_len) "
            "or ask for shorter texts (generation.placeholder_overrides)"
        )
    if reason.startswith(("http", "timeout", "connection", "all endpoints", "invalid response")):
        return "the LLM server failed: check it with `embed-factory doctor` and re-run the same --run-id"
    if reason.startswith("invalid output"):
        return "the model does not follow the JSON schema: use a stronger model or raise llm.schema_retries"
    return "see the rejects table (`embed-factory` catalog view `rejects`) and re-run the same --run-id"


def targets_missed(
    targets: dict[str, int], by_type: dict[str, int], rejects: pa.Table, instructions: dict[str, int]
) -> str | None:
    """The one line that fails a run, or None: the types below FAIL_BELOW_SHARE of target, why, what to change."""
    far = [t for t, n in targets.items() if by_type.get(t, 0) < FAIL_BELOW_SHARE * n]
    if not far:
        return None
    parts, advice = [], {}
    for t in far:
        mine = rejects.filter(pc.equal(rejects["task_type"], t)) if rejects.num_rows else rejects
        if t in BRAINSTORM_TASK_TYPES and not instructions.get(t):
            why = "no brainstormed instruction"
            advice.setdefault("check the brainstorm warnings and re-run the same --run-id", None)
        elif mine.num_rows:
            reason, count = Counter(mine["reason"].to_pylist()).most_common(1)[0]
            why = f"top reject reason {reason!r} x{count}"
            advice.setdefault(_advice(reason), None)
        else:
            why = "no rejects recorded"
        parts.append(f"{t} {by_type.get(t, 0)}/{targets[t]} ({why})")
    return f"generation ended below {FAIL_BELOW_SHARE:.0%} of the target for {'; '.join(parts)}: " + "; ".join(advice)


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
    # per brainstormed type: instructions, distinct intents, clusters of 2+, mean nearest-neighbour cosine
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    # what this session asked of the LLM server (a resumed run counts only its own requests)
    llm_calls: int = 0  # chat completions asked for, schema re-asks included
    http_attempts: int = 0  # HTTP requests sent, transport retries included
    transport_failures: int = 0  # attempts without a usable answer (429/5xx, timeouts, resets, bad bodies)
    transport_retries: int = 0
    schema_retries: int = 0
    transport_failure_rate: float = 0.0
    # per LLM endpoint: requests, failures, median / p99 latency, seconds out of rotation (llm/router.py)
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    hedges: int = 0  # requests sent to a second endpoint because the first was slow

    @property
    def examples(self) -> int:
        return sum(self.examples_by_type.values())


#: what the run's summary and its failure line read of the rejects (not their response texts)
REJECT_COUNT_COLUMNS = ("task_type", "reason")


def rejects_by_reason(rejects: pa.Table, top: int = 3) -> str:
    """The most frequent reject reasons, e.g. ``"http 500: boom" ×4, "timeout after retries" ×2``."""
    counts: dict[str, int] = {}
    for reason in rejects["reason"].to_pylist() if rejects.num_rows else []:
        counts[reason] = counts.get(reason, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return ", ".join(f"{reason!r} ×{n}" for reason, n in ranked) or "none"


#: generation settings that say how a run is executed, not what it makes: a run may resume with others
RUNTIME_ONLY = {"shards_in_flight", "task_runner", "workers", "dask_address"}


def generator_mix(settings: Settings) -> dict[str, dict[str, float]] | None:
    """Per task type, each generator model's weight; None with one model (every request asks it)."""
    if len(settings.llm_models) < 2:
        return None
    return {t: settings.generator_weights(t) for t in settings.generation.task_types}


def run_fingerprint(settings: Settings) -> dict[str, Any]:
    """What must not change between a run and its resumption (a mix of models: which write what share)."""
    generation = settings.generation.model_dump(exclude=RUNTIME_ONLY)
    mix = generator_mix(settings)
    return ({"generators": mix} if mix else {}) | {
        "generation": generation,
        "personas": settings.personas.model_dump(),
        "model": settings.llm_model,
        # the context caps the placeholders (prompts/budget.py), so it shapes the plan
        "sampling": settings.llm.model_dump(
            include={"temperature", "top_p", "max_tokens", "brainstorm_max_tokens", "context_tokens"}
        ),
    }


def _older(stored: Any, fingerprint: dict[str, Any]) -> Any:
    """A fingerprint from before ``generation.intent_threshold`` (or ``llm.context_tokens``) existed reads as
    one with today's value."""
    if isinstance(stored, dict) and "intent_threshold" not in stored.get("generation", {"intent_threshold": 0}):
        generation = fingerprint["generation"]
        stored = {**stored, "generation": {**stored["generation"], "intent_threshold": generation["intent_threshold"]}}
    if isinstance(stored, dict) and "context_tokens" not in stored.get("sampling", {"context_tokens": 0}):
        stored = {
            **stored,
            "sampling": {**stored["sampling"], "context_tokens": fingerprint["sampling"]["context_tokens"]},
        }
    return stored


def instruction_encoder(settings: Settings):
    """The embedder of intent dedup (clean.embedder, vectors cached under the data dir); None when it is off."""
    if settings.generation.intent_threshold is None:
        return None
    embedder = make_embedder(settings.clean)  # a local model loads only when a text is not cached yet
    cache = EmbeddingCache(embeddings_dir(data_root(settings.storage), embedder.model_key))
    return lambda texts: encode_cached(texts, embedder, cache)


def check_fingerprint(store: RunStore, settings: Settings) -> None:
    """Record a new run's settings; refuse to resume an existing run with other ones."""
    info = store.read_run_info()
    fingerprint = run_fingerprint(settings)
    if info is None:
        store.write_run_info({"fingerprint": fingerprint, "profile": settings.profile})
    elif _older(info.get("fingerprint"), fingerprint) != fingerprint:
        raise RunConfigMismatch(
            f"run {store.run_id!r} already exists with other settings ({store.run_info_path}); "
            "resume it with the same settings or choose a new --run-id"
        )


def make_client(settings: Settings) -> LLMClient:
    # endpoints taken out / back show in the flow run's log
    return LLMClient.from_settings(settings, logger=get_run_logger())


def summarize(
    settings: Settings,
    store: RunStore,
    stats: ClientStats,
    *,
    pool_size: int,
    brainstormed: Brainstormed,
    by_type: dict[str, int],
    targets: dict[str, int],
    tally: ShardTally,
    elapsed: float,
    endpoints: list[dict[str, Any]] | None = None,
) -> GenerateSummary:
    """The run's summary, with a warning for each target missed (``targets``: examples wanted per task type)
    and each failure rate over the threshold."""
    logger = get_run_logger()
    rejects = store.read_kind("rejects", REJECT_COUNT_COLUMNS)
    requests = sum(by_type.values()) + rejects.num_rows
    transport_rate = stats.transport_failures / stats.http_attempts if stats.http_attempts else 0.0
    found: list[str] = []
    short = {t: targets[t] - by_type.get(t, 0) for t in targets if by_type.get(t, 0) < targets[t]}
    if short:
        found.append(f"examples short of target: {short}")
    if transport_rate > settings.llm.warn_failure_rate:
        found.append(
            f"{stats.transport_failures} of {stats.http_attempts} HTTP attempts to the LLM server "
            f"failed ({transport_rate:.1%}; {stats.transport_retries} transport retries)"
        )
    if requests and rejects.num_rows / requests > settings.llm.warn_failure_rate:
        found.append(
            f"{rejects.num_rows} of {requests} requests were rejected "
            f"({rejects.num_rows / requests:.1%}); reasons: {rejects_by_reason(rejects)}"
        )
    found += degraded_warnings(endpoints or [])
    for warning in found:
        logger.warning(warning)
    # the brainstorm step logged its warning when it found it
    warnings = ([brainstormed.warning] if brainstormed.warning else []) + found
    summary = GenerateSummary(
        run_id=store.run_id,
        run_dir=str(store.root),
        examples_by_type=dict(sorted(by_type.items())),
        rejects=rejects.num_rows,
        requests=requests,
        failure_rate=rejects.num_rows / requests if requests else 0.0,
        completion_tokens=stats.completion_tokens,
        tokens_per_s=stats.completion_tokens / elapsed if elapsed else 0.0,
        elapsed_s=elapsed,
        unique_instructions=count_by_type(brainstormed.instructions),
        intents=intent_summary(
            brainstormed.instructions["task_type"].to_pylist(),
            brainstormed.instructions["intent_id"].to_pylist(),
            brainstormed.instructions["nearest_similarity"].to_pylist(),
        ),
        personas=pool_size,
        shards_written=tally.written,
        shards_skipped=tally.skipped,
        warnings=warnings,
        llm_calls=stats.requests,
        http_attempts=stats.http_attempts,
        transport_failures=stats.transport_failures,
        transport_retries=stats.transport_retries,
        schema_retries=stats.schema_retries,
        transport_failure_rate=transport_rate,
        endpoints=list(endpoints or []),
        hedges=stats.hedges,
    )
    logger.info(
        "run %s: %d examples %s, %d rejects, %.0f completion tokens/s",
        store.run_id,
        summary.examples,
        summary.examples_by_type,
        summary.rejects,
        summary.tokens_per_s,
    )
    logger.info(
        "LLM: %d calls, %d HTTP attempts, %d transport failures (%.1f%%), %d transport retries, %d schema retries",
        stats.requests,
        stats.http_attempts,
        stats.transport_failures,
        100 * transport_rate,
        stats.transport_retries,
        stats.schema_retries,
    )
    return summary


def write_run_ledger(settings: Settings, store: RunStore, elapsed_s: float) -> None:
    """The run's cost ledger per task type, from its rows; wall seconds add up over the sessions that finished."""
    earlier = sum(row["generation_wall_s"] or 0.0 for row in read_ledger(store.ledger_path))
    usage = usage_by_type(**{kind: store.read_kind(kind, columns) for kind, columns in USAGE_COLUMNS.items()})
    plan = read_plan(store.plan_path)
    predicted = Plan.from_json(plan).predicted_columns() if plan else None
    rows = generation_rows(
        store.run_id,
        settings.llm_model,
        usage,
        earlier + elapsed_s,
        Counter(e.model for e in settings.llm_endpoints),
        settings.cost,
        predicted,
    )
    write_ledger(store.ledger_path, rows, store.compression)
    get_run_logger().info(
        "ledger: %.4f GPU-hours, %.4f USD over %d task types (%s)",
        sum(r["gpu_hours"] for r in rows),
        sum(r["cost_usd"] for r in rows),
        len(rows),
        store.ledger_path,
    )


async def generate_run(settings: Settings, run_id: str, plan: dict[str, Any] | None = None) -> GenerateSummary:
    """The body of the flow; callable directly (tests, CLI) inside a flow context.

    ``plan``: the cost plan made before the run (``ground/cost_plan.py``), stored with a new run so its
    ledger shows predicted vs actual."""
    gen, llm = settings.generation, settings.llm
    store = RunStore.from_settings(settings, run_id)
    started = time.monotonic()
    tally = ShardTally()
    with store.exclusive():
        check_fingerprint(store, settings)
        for problem in budget_problems(settings):  # the requests are capped at the context; said once here
            get_run_logger().warning("token budget: %s", problem)
        manifest = store.manifest()  # read (and checked) before anything is written
        if plan and not manifest and not store.plan_path.exists():  # a new run: nothing committed yet
            write_plan(store.plan_path, plan)
        # the UI's progress bar: parsed examples committed (earlier sessions' too) vs the target
        committed = sum(e["rows"] for e in manifest.values() if e.get("kind") == "examples")
        tracker = GenerateProgress(run_id, sum(example_targets(gen).values()), committed)
        tracker.start()
        async with make_client(settings) as client:
            persona_room = answer_room(settings, settings.personas.max_chars or 0)
            brainstorm_sampling = Sampling(llm.temperature, llm.top_p, llm.brainstorm_max_tokens, persona_room)
            pool = await persona_pool(store, settings.personas, client, brainstorm_sampling, gen.seed)
            sampling = Sampling(llm.temperature, llm.top_p, llm.max_tokens, answer_room(settings))
            worker_stats, worker_endpoints = ClientStats(), []
            if gen.corpus:  # grounded: one query per passage of the corpus (flows/grounded.py), no brainstorm
                passages = grounded_passages(settings, store, pool)
                targets = grounded_target(settings, passages)
                brainstormed = Brainstormed(INSTRUCTION_SCHEMA.empty_table(), {}, 0)
                by_type = await grounded_examples(
                    settings, store, pool, passages, client, sampling, tally, tracker.shard_committed
                )
            else:
                brainstormed = await brainstorm_to_targets(
                    store,
                    gen,
                    PersonaSampler(pool, gen.seed),
                    client,
                    brainstorm_sampling,
                    tally,
                    tracker.shard_committed,
                    instruction_encoder(settings),
                )
                targets = example_targets(gen)
                with shard_runner(gen) as runner:
                    execute = None
                    if runner is not None:
                        get_run_logger().info(
                            "example shards on %s workers (%s)", gen.workers, gen.dask_address or "local"
                        )
                        execute = on_workers(runner, settings, run_id, sampling, worker_stats, worker_endpoints)
                    by_type = await examples_with_topups(
                        store,
                        gen,
                        brainstormed.instructions,
                        client,
                        sampling,
                        tally,
                        tracker.shard_committed,
                        execute,
                        generator_mix(settings),
                    )
        add_stats(client.stats, stats_counts(worker_stats))
        summary = summarize(
            settings,
            store,
            client.stats,
            pool_size=len(pool),
            brainstormed=brainstormed,
            by_type=by_type,
            targets=targets,
            tally=tally,
            elapsed=time.monotonic() - started,
            endpoints=merge_endpoints(client.router.report_rows() + worker_endpoints),
        )
        write_run_ledger(settings, store, summary.elapsed_s)
        publish_generate(store)  # the per-task-type table in the UI
        publish_endpoints(store.run_id, summary.endpoints)
        instructions = count_by_type(brainstormed.instructions)
        failed = targets_missed(targets, by_type, store.read_kind("rejects", REJECT_COUNT_COLUMNS), instructions)
        if failed:
            get_run_logger().error(failed)
            raise TargetsMissed(failed)  # the flow run ends Failed; the CLI prints this line and exits 1
        return summary


@flow(name="generate", flow_run_name="generate-{run_id}")
async def generate(
    run_id: str,
    examples: int | None = None,
    task_types: list[TaskTypeName] | None = None,
    seed: int | None = None,
    unique_instructions: int | None = None,
    profile: str | None = None,
    plan: dict[str, Any] | None = None,
    corpus: str | None = None,
) -> GenerateSummary:
    """Generate persona-driven embedding training examples into Parquet shards of ``run_id``.

    Args:
        run_id: Generation run id; re-use one to resume that run.
        examples: Target number of parsed examples over all task types (default: the profile's).
        task_types: Task types to generate (default: all six).
        seed: Sampling seed for personas and placeholders (default: generation.seed).
        unique_instructions: Target unique brainstormed instructions (default: what examples needs).
        profile: Settings profile: local or production (default: the environment's).
        plan: The cost plan made before the run (`embed-factory plan`), stored with a new run.
        corpus: Grounded generation: one retrieval query per passage of this document corpus ("python-docs":
            the shipped one; a .txt/.md/.html/.jsonl/.parquet file or folder, local or s3://).
    """
    overrides = {
        k: v
        for k, v in {
            "examples": examples,
            "task_types": task_types,
            "seed": seed,
            "unique_instructions": unique_instructions,
            "corpus": corpus,
        }.items()
        if v is not None
    }
    settings = load_settings(profile=profile, generation=overrides)
    return await generate_run(settings, run_id, plan)
