"""``embed-factory plan``: what a run would cost before it spends anything (also ``run --dry-run``).

From the cost ledger of earlier runs with the same model and prompt versions (the catalog's ``ledger``
view), else from a pilot of ``cost.pilot_requests`` real requests per task type, which it says it sends.
Nothing is written: no run folder, no Prefect flow run. The arithmetic is ``ground/cost_plan.py``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from embed_factory.cli.frame import (
    ConfigOption,
    ProfileOption,
    checked_data_dir,
    command_frame,
    fail,
    load_cli_settings,
    say,
)
from ground.cost_plan import Plan, plan_from_history, plan_from_pilot
from ground.settings import PersonaSettings, Settings
from ground.task_types import ALL_TASK_TYPES
from prompts.budget import budget_problems, budget_summary
from prompts.task_types import get_task_type
from storage.catalog import Catalog, CatalogError
from storage.location import data_root
from storage.shards import list_runs

TASK_TYPE_LIST = ", ".join(ALL_TASK_TYPES)


def history(settings: Settings, task_types: list[str]) -> tuple[list[dict], dict[str, float]]:
    """Earlier generate-scope ledger rows of this model with today's prompt versions, and the accepted share
    per task type from earlier clean runs of such rows (accepted / examples)."""
    if not list_runs(data_root(settings.storage)):
        return [], {}
    rows = Catalog.from_settings(settings).query(
        "SELECT * FROM ledger WHERE model = ? AND list_contains(?, task_type)", [settings.llm_model, task_types]
    )
    current = [r for r in rows.to_pylist() if r["prompt_version"] == get_task_type(r["task_type"]).prompt_version]
    acceptance: dict[str, float] = {}
    for task_type in task_types:
        cleans = [r for r in current if r["scope"] == "clean" and r["task_type"] == task_type and r["examples"]]
        if cleans:
            acceptance[task_type] = sum(r["accepted"] or 0 for r in cleans) / sum(r["examples"] for r in cleans)
    return [r for r in current if r["scope"] == "generate"], acceptance


def pilot_plan(settings: Settings, targets: dict[str, int]) -> Plan:
    """Send the pilot (starting the embedded server if it is the endpoint) and plan from what it measured."""
    from embed_factory.llm_server import EmbeddedLLMServer
    from llm.client import LLMClient, Sampling
    from personas.sampling import PersonaSampler
    from personas.sources import load_persona_pool
    from prompts.budget import answer_room
    from tasks.generation.pilot import run_pilot

    gen, llm, n = settings.generation, settings.llm, settings.cost.pilot_requests
    endpoints = settings.llm_base_urls
    say(
        f"no earlier run of {settings.llm_model} with these prompt versions: sending a pilot of about "
        f"{n * len(targets)} requests ({n} per task type) to {', '.join(endpoints)}"
    )
    if settings.uses_embedded_llm:
        EmbeddedLLMServer(settings.embedded_llm, say).start()
    # the persona only shapes a brainstorm prompt: the bundled seed set spares a Hub download
    personas = settings.personas if settings.personas.source != "hub" else PersonaSettings()
    pool = PersonaSampler(load_persona_pool(personas).personas, gen.seed).sample(len(targets), "pilot")

    async def send():
        async with LLMClient.from_settings(settings) as client:
            return await run_pilot(
                client,
                list(targets),
                n,
                pool,
                Sampling(llm.temperature, llm.top_p, llm.brainstorm_max_tokens),
                Sampling(llm.temperature, llm.top_p, llm.max_tokens, answer_room(settings)),
                gen.instructions_per_brainstorm,
                gen.seed,
            )

    usage, wall = asyncio.run(send())
    if not any(u.parsed for u in usage):
        reasons = sorted({r for u in usage for r in u.rejected})
        raise ValueError(
            f"every pilot request failed ({'; '.join(reasons[:3]) or 'no answer'}); see `embed-factory doctor`"
        )
    say(f"pilot: {sum(u.brainstorm_requests + u.example_requests for u in usage)} requests in {wall:.1f}s")
    return plan_from_pilot(
        usage,
        wall,
        len(endpoints),
        targets,
        gen.instructions_per_brainstorm,
        settings.llm_model,
        len(endpoints),
        settings.cost,
    )


def make_plan(
    settings: Settings, examples: int | None, task_types: list[str] | None, pilot: bool = True
) -> Plan | None:
    """The plan of a run of ``examples`` over ``task_types`` (default: the settings'); from history, else a
    pilot (``pilot=False``: None instead)."""
    from tasks.generation.generate import split_targets

    unknown = [t for t in task_types or [] if t not in ALL_TASK_TYPES]
    if unknown:
        raise ValueError(f"unknown task type(s) {', '.join(unknown)}; choose from {TASK_TYPE_LIST}")
    types = list(dict.fromkeys(task_types or settings.generation.task_types))
    targets = split_targets(examples or settings.generation.examples, types)
    rows, acceptance = history(settings, types)
    endpoints = len(settings.llm_base_urls)
    plan = plan_from_history(rows, targets, settings.llm_model, endpoints, settings.cost, acceptance)
    if plan is None and pilot:
        plan = pilot_plan(settings, targets)
    return plan


def history_plan(settings: Settings, examples: int | None, task_types: list[str] | None) -> Plan | None:
    """For a real run: the plan from earlier runs, or None (said why); never a pilot, never a failure."""
    try:
        planned = make_plan(settings, examples, task_types, pilot=False)
    except CatalogError as exc:
        say(f"no cost plan: the catalog is unreadable ({exc})")
        return None
    if planned is None:
        say(
            f"no cost plan: no earlier run of {settings.llm_model} with these prompt versions "
            "(`embed-factory plan` sends a pilot)"
        )
    else:
        say(
            f"cost plan ({planned.source}): ${planned.cost_usd:,.2f}, {planned.gpu_hours:.3f} GPU-hours, "
            "stored with the run"
        )
    return planned


def print_plan(plan: Plan, settings: Settings) -> None:
    out = Console()
    cost = settings.cost
    table = Table(title=f"plan: {plan.examples} examples on {plan.endpoints} endpoint(s) of {plan.model}")
    for name in ("task type", "examples", "requests", "prompt tok", "completion tok", "wall s", "GPU-h", "USD"):
        table.add_column(name, justify="left" if name == "task type" else "right")
    for t in [*plan.by_type, None]:
        row = t or plan
        table.add_row(
            t.task_type if t else "[bold]total",
            f"{row.examples:,}",
            f"{row.requests:,.0f}",
            f"{sum(x.prompt_tokens for x in ([t] if t else plan.by_type)):,.0f}",
            f"{sum(x.completion_tokens for x in ([t] if t else plan.by_type)):,.0f}",
            f"{row.wall_s:,.0f}",
            f"{row.gpu_hours:,.3f}",
            f"{row.cost_usd:,.2f}",
        )
    out.print(table)
    out.print(budget_summary(settings, [t.task_type for t in plan.by_type]))  # prompts/budget.py
    for problem in budget_problems(settings):
        out.print(f"[yellow]warning:[/] token budget: {problem}")
    per_k = plan.cost_per_1k_accepted
    out.print(
        f"from {plan.source}; wall time {plan.wall_s / 3600:.2f} h; GPU-hours {plan.gpu_hours:.3f} at "
        f"{cost.llm_gpus_per_endpoint} GPU(s) per endpoint x ${cost.gpu_hour_usd:g}/GPU-hour"
        + (f" (LLM on the CPU: ${cost.cpu_hour_usd:g}/hour)" if cost.llm_gpus_per_endpoint == 0 else "")
        + f"; cost ${plan.cost_usd:,.2f}"
        + (f"; ~{plan.accepted:,.0f} accepted, ${per_k:,.2f} per 1,000 accepted" if per_k is not None else "")
    )


def plan(
    examples: int | None = typer.Option(
        None, "--examples", "-n", min=1, help="Examples the run would make (default: the profile's)."
    ),
    task_types: list[str] | None = typer.Option(
        None, "--task-type", "-t", help=f"Task type(s) to plan for: {TASK_TYPE_LIST}."
    ),
    profile: str | None = ProfileOption,
    config: Path | None = ConfigOption,
) -> None:
    """Predict a run's requests, tokens, GPU-hours, wall time and cost before spending anything.

    From the cost ledger of earlier runs with the same model and prompt versions, else from a pilot of a few
    real requests per task type (cost.pilot_requests). Prices and GPUs: the [cost] settings.
    """
    settings = load_cli_settings(config, profile)
    with command_frame(interrupted="interrupted; nothing was written"):
        checked_data_dir(settings)  # no runs yet is fine: a pilot measures instead
        planned = make_plan(settings, examples, task_types)
        if planned is None:  # pragma: no cover - make_plan pilots when there is no history
            fail("no plan")
        print_plan(planned, settings)
