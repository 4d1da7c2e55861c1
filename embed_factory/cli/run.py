"""``embed-factory run``: generate examples of every task type, then clean them into a training corpus."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import typer
from rich.console import Console
from rich.table import Table

from embed_factory.cli.data import clean_flow, print_clean_summary
from embed_factory.cli.frame import (
    ConfigOption,
    ProfileOption,
    checked_data_dir,
    command_frame,
    fail,
    load_cli_settings,
    prefect_at,
    say,
    stage_bars,
)
from embed_factory.cli.plan import history_plan, make_plan, print_plan
from embed_factory.llm_server import EmbeddedLLMServer
from embed_factory.prefect_server import prefect_ui_url, resolve_api_url
from ground.task_types import ALL_TASK_TYPES
from personas.sources import load_persona_pool
from storage.inventory import check_runs_readable, run_ids
from storage.shards import RunStore

if TYPE_CHECKING:
    from flows.generate import GenerateSummary
    from ground.cost_plan import Plan

TASK_TYPE_LIST = ", ".join(ALL_TASK_TYPES)


def run(
    examples: int | None = typer.Option(
        None, "--examples", "-n", min=1, help="Target number of parsed examples (default: the profile's)."
    ),
    run_id: str | None = typer.Option(None, "--run-id", help="Run id; re-use one to resume it (default: new)."),
    task_types: list[str] | None = typer.Option(
        None, "--task-type", "-t", help=f"Task type(s) to generate: {TASK_TYPE_LIST}."
    ),
    seed: int | None = typer.Option(None, help="Sampling seed for personas and placeholders."),
    clean_after: bool = typer.Option(
        True, "--clean/--no-clean", help="Clean all runs into a training corpus after generating."
    ),
    instructions: int | None = typer.Option(
        None, "--instructions", min=1, help="Target unique brainstormed instructions."
    ),
    corpus: str | None = typer.Option(
        None,
        "--corpus",
        help="Grounded generation: one retrieval query per passage of this document corpus: python-docs (shipped), "
        "a .txt/.md/.html/.jsonl/.parquet file or a folder of them, local or s3:// (generation.corpus).",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Only print the predicted requests, tokens, GPU-hours, time and cost (as `plan`)."
    ),
    profile: str | None = ProfileOption,
    config: Path | None = ConfigOption,
) -> None:
    """Generate examples of all 6 task types, then clean them into a training corpus.

    With --corpus, one retrieval query per passage of a document corpus instead (grounded generation).
    Starts the embedded vLLM and local Prefect servers if needed. Re-use --run-id to resume a run.
    The cost plan from earlier runs' ledger is stored with a new run, so its ledger shows predicted vs actual.
    """
    settings = load_cli_settings(config, profile)
    if corpus is not None:
        settings = settings.model_copy(update={"generation": settings.generation.model_copy(update={"corpus": corpus})})
    unknown = [t for t in task_types or [] if t not in ALL_TASK_TYPES]
    if unknown:
        fail(f"unknown task type(s) {', '.join(unknown)}; choose from {TASK_TYPE_LIST}", 2)
    if settings.generation.corpus and task_types and task_types != ["retrieval"]:
        fail("--task-type does not apply to --corpus: a grounded run writes retrieval rows only", 2)
    with command_frame():  # check cheap inputs before starting any server
        root = checked_data_dir(settings)  # missing or empty is fine: a first run creates it
        if run_id is not None:  # a new id starts that run; an existing one is resumed, if its files read
            RunStore(root, run_id)
            if run_id in run_ids(root):
                check_runs_readable(root, [run_id])
        if settings.generation.corpus:  # a corpus that is missing or holds no document: refused before any server
            check_corpus(settings)
        if settings.personas.source != "hub":
            for note in load_persona_pool(settings.personas).notes():  # refused as the flow would refuse it
                say(f"personas: {note}")
        if dry_run:  # nothing written, no Prefect flow run; a pilot only when no earlier run matches
            print_plan(make_plan(settings, examples, task_types), settings)
            return
        # the plan from earlier runs (no pilot: the run measures itself), stored with a new run
        cost_plan = history_plan(settings, examples, task_types)
    if not settings.uses_embedded_llm:  # a configured endpoint must answer before anything is written
        from embed_factory.doctor import FAIL, check_llm

        check = check_llm(settings)
        if check.status == FAIL:
            fail(f"LLM endpoint: {check.detail}" + (f"; {check.fix}" if check.fix else ""))
    run_id = run_id or datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S-") + uuid4().hex[:6]
    with command_frame(interrupted=f"interrupted; resume with: embed-factory run --run-id {run_id}"):
        api_url = start_servers(settings)
        summary = generate_flow(
            api_url, run_id, examples, task_types, seed, instructions, settings.profile, cost_plan, corpus
        )
        print_generate_summary(summary, api_url)
        if clean_after:
            print_clean_summary(clean_flow(api_url, run_id, None, None, settings.profile))


def check_corpus(settings) -> None:
    """The corpus' files exist and are of known kinds (their contents are read by the flow)."""
    from storage.documents import corpus_files
    from storage.location import is_url
    from tasks.generation.passages import corpus_location

    location = corpus_location(settings.generation.corpus)
    corpus_files(location, settings.storage.storage_options() if is_url(location) else None)


def start_servers(settings) -> str:
    """The Prefect API URL, with the embedded vLLM server (where used) answering too. A local Prefect server
    starts in a thread while vLLM sets up and starts (~20 s of a first run, when Prefect's database is made),
    instead of after it; the first failure of either is raised."""
    if not settings.uses_embedded_llm:
        return resolve_api_url(settings, say)
    outcome: dict[str, Any] = {}

    def start_prefect() -> None:
        try:
            outcome["api_url"] = resolve_api_url(settings, say)
        except BaseException as exc:  # re-raised below, in the command's thread
            outcome["error"] = exc

    # a daemon thread: Ctrl-C during vLLM's set-up exits at once instead of waiting for Prefect's start
    prefect = threading.Thread(target=start_prefect, name="prefect-server", daemon=True)
    prefect.start()
    EmbeddedLLMServer(settings.embedded_llm, say).start()
    prefect.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["api_url"]


def generate_flow(
    api_url: str,
    run_id: str,
    examples,
    task_types,
    seed,
    instructions,
    profile,
    plan: Plan | None = None,
    corpus: str | None = None,
) -> GenerateSummary:
    """Run the generate flow here, its stages as bars; its summary."""
    from flows.generate import generate

    bar = stage_bars(failed=True)
    say(f"run {run_id}: flow run in the Prefect UI at {prefect_ui_url(api_url)}")
    with prefect_at(api_url, bar):
        summary = asyncio.run(
            generate(
                run_id=run_id,
                examples=examples,
                task_types=task_types,
                seed=seed,
                unique_instructions=instructions,
                profile=profile,
                plan=plan.to_json() if plan else None,
                corpus=corpus,
            )
        )
    return summary


def print_generate_summary(summary: GenerateSummary, api_url: str) -> None:
    out = Console()
    table = Table(title=f"run {summary.run_id}")
    table.add_column("task type")
    table.add_column("examples", justify="right")
    table.add_column("unique instructions", justify="right")
    table.add_column("intents", justify="right")  # semantic dedup (generation.intent_threshold)
    table.add_column("clusters / mean NN cos", justify="right")
    for task_type, count in summary.examples_by_type.items():
        intents = summary.intents.get(task_type) or {}
        nn = intents.get("mean_nn_similarity")
        table.add_row(
            task_type,
            str(count),
            str(summary.unique_instructions.get(task_type, "-")),
            str(intents.get("intents", "-")),
            f"{intents['clusters']} / {nn:.2f}" if intents and nn is not None else "-",
        )
    table.add_row("[bold]total", f"[bold]{summary.examples}", "", "", "")
    out.print(table)
    out.print(
        f"requests: {summary.requests}  rejects: {summary.rejects} "
        f"(failure rate {summary.failure_rate:.1%})  completion tokens/s: {summary.tokens_per_s:.1f}  "
        f"elapsed: {summary.elapsed_s:.0f}s  shards written/skipped: "
        f"{summary.shards_written}/{summary.shards_skipped}"
    )
    out.print(
        f"LLM: {summary.llm_calls} calls, {summary.http_attempts} HTTP attempts, "
        f"{summary.transport_failures} transport failures ({summary.transport_failure_rate:.1%}), "
        f"{summary.transport_retries} transport retries, {summary.schema_retries} schema retries"
    )
    for warning in summary.warnings:
        out.print(f"[yellow]warning:[/] {warning}")
    run_dir = summary.run_dir
    out.print(f"shards: {run_dir}/examples/*.parquet   rejects: {run_dir}/rejects/*.parquet")
    out.print(f"query:  duckdb -c \"SELECT task_type, count(*) FROM '{run_dir}/examples/*.parquet' GROUP BY 1\"")
    out.print(f"UI:     {prefect_ui_url(api_url)}/runs")
