"""The operations commands: ``doctor`` (check the environment), ``deploy`` (register the deployments, run a
worker) and ``trigger`` (run one deployment now)."""

from __future__ import annotations

import os
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
    prefect_at,
    say,
)
from embed_factory.llm_server import EmbeddedLLMServer
from embed_factory.prefect_server import prefect_ui_url, resolve_api_url


def doctor(config: Path | None = ConfigOption) -> None:
    """Check the environment: config, LLM server and model, Prefect, disk, packages, vLLM env, personas.

    Prints OK/WARN/FAIL per check and the fix for each problem; the exit code is 1 if any check fails.
    """
    from embed_factory.doctor import FAIL, WARN, failed, run_checks

    if config is not None:
        os.environ["EMBED_FACTORY_CONFIG"] = str(config)
    out = Console(soft_wrap=True)
    colour = {FAIL: "bold red", WARN: "yellow"}
    checks = run_checks()
    for check in checks:
        out.print(
            f"[{colour.get(check.status, 'green')}]{check.status:<4}[/]  {check.name:<9} {check.detail}",
            markup=True,
            highlight=False,
        )
        if check.fix and check.status != "OK":
            out.print(f"      {'':<9} fix: {check.fix}", highlight=False)
    problems = {s: sum(c.status == s for c in checks) for s in (FAIL, WARN)}
    out.print(f"{len(checks)} checks: {problems[FAIL]} failed, {problems[WARN]} warnings")
    raise typer.Exit(1 if failed(checks) else 0)


def deploy(
    schedule: bool | None = typer.Option(
        None,
        "--schedule/--no-schedule",
        help="Register the pipeline's nightly cron schedule switched on / off "
        "(default: prefect.pipeline_schedule, off).",
    ),
    worker: bool = typer.Option(
        True,
        "--worker/--no-worker",
        help="After registering, run a worker for the process pool here (Ctrl-C stops it).",
    ),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Flow runs the worker runs at once (default: prefect.worker_limit, 1)."
    ),
    profile: str | None = ProfileOption,
    config: Path | None = ConfigOption,
) -> None:
    """Register the deployments of prefect.yaml (generate, clean, finetune, pipeline) and run a local worker.

    Each deployment shows its parameters as a form in the Prefect UI (Deployments → Run → Custom run). Work pools come from the settings: prefect.work_pool (local-pool; production cpu-pool) and, for finetune, prefect.gpu_work_pool (production gpu-pool); missing pools are created. finetune keeps its trigger (a completed clean run outside a pipeline starts a fine-tune). Flow runs start in the current directory. Starts the local Prefect server (and, for the worker, the embedded vLLM server) if needed. Run one with: embed-factory trigger NAME --param k=v.
    """  # noqa: E501 (typer keeps line breaks: one paragraph, one line)
    from embed_factory.deployments.project import register_project
    from embed_factory.deployments.serving import start_worker

    settings = load_cli_settings(config, profile)
    with command_frame(stopped="worker stopped"):
        checked_data_dir(settings)  # no runs yet is fine: deploying comes first
        api_url = resolve_api_url(settings, say)
        with prefect_at(api_url):
            registered = register_project(settings, schedule=schedule)
            out = Console()
            table = Table(title=f"deployments on {prefect_ui_url(api_url)}")
            for column in ("deployment", "work pool", "schedule", "trigger"):
                table.add_column(column)
            for r in registered:
                table.add_row(r.full_name, r.work_pool, ", ".join(r.schedules) or "-", ", ".join(r.triggers) or "-")
            out.print(table)
            out.print(
                f"UI: {prefect_ui_url(api_url)}/deployments   run one: embed-factory trigger pipeline "
                "--param examples=12"
            )
            if not worker:
                return
            pool = settings.prefect.work_pool
            others = sorted({r.work_pool for r in registered} - {pool})
            if others:
                say(f"runs on {', '.join(others)} need a worker there: prefect worker start --pool {others[0]}")
            if settings.uses_embedded_llm:  # generate and pipeline runs talk to it
                EmbeddedLLMServer(settings.embedded_llm, say).start()
            os.environ["PREFECT_API_URL"] = api_url  # the worker's flow-run processes inherit it
            say(f"worker for work pool {pool!r} (limit {limit or settings.prefect.worker_limit}); Ctrl-C stops it")
            start_worker(pool, limit or settings.prefect.worker_limit)


def trigger(
    name: str = typer.Argument(..., help="Deployment: pipeline, generate, clean, finetune (or FLOW/DEPLOYMENT)."),
    params: list[str] | None = typer.Option(
        None,
        "--param",
        "-p",
        help="Flow parameter NAME=VALUE (repeatable). Values are JSON when they "
        'parse (6, true, null, ["a"]), else text; lists may be '
        "comma-separated: task_types=retrieval,sts.",
    ),
    wait: bool = typer.Option(
        True, "--wait/--no-wait", help="Wait for the run to finish and exit non-zero unless it completed."
    ),
    config: Path | None = ConfigOption,
) -> None:
    """Run one deployment now with parameters; print its final state (or, with --no-wait, its id).

    Parameters are checked against the deployment's schema before anything starts: an unknown name or a value of the wrong type is an error. A worker of the deployment's pool runs it (embed-factory deploy starts one). Examples: embed-factory trigger pipeline -p examples=12 -p task_types=retrieval,sts -p max_steps=5; embed-factory trigger generate -p run_id=run-1 --no-wait.
    """  # noqa: E501 (typer keeps line breaks: one paragraph, one line)
    from embed_factory.deployments.runs import trigger as trigger_run

    settings = load_cli_settings(config)
    with command_frame(interrupted="stopped waiting; the flow run goes on (cancel it in the UI)"):
        check_deployment_name(name, settings)  # before any server: a typo names the project's deployments
        checked_data_dir(settings)
        api_url = resolve_api_url(settings, say)
        with prefect_at(api_url):
            run, full_name = trigger_run(name, params or [], wait=wait, say=say)
    url = f"{prefect_ui_url(api_url)}/runs/flow-run/{run.id}"
    Console(soft_wrap=True).print(f"{full_name}: flow run {run.name} {run.state_name}  {url}")
    if wait and not (run.state and run.state.is_completed()):
        fail(f"{run.name} ended {run.state_name}: {(run.state.message if run.state else '') or 'no message'}")


def check_deployment_name(name: str, settings) -> None:
    """``name`` is FLOW/DEPLOYMENT (checked on the server) or one of prefect.yaml's deployments."""
    from embed_factory.deployments import DeployError
    from embed_factory.deployments.project import load_project, project_values
    from storage.inventory import closest_first

    parts = name.split("/")
    if len(parts) > 2 or not all(part.strip() for part in parts):
        raise DeployError(f"invalid deployment name {name!r}: give NAME (pipeline, generate, ...) or FLOW/DEPLOYMENT")
    known = [spec.name for spec in load_project(project_values(settings))]
    if len(parts) == 1 and name not in known:
        raise DeployError(
            f"no deployment {name!r} in prefect.yaml (deployments: {closest_first(name, known)}); "
            "a deployment of another project is FLOW/DEPLOYMENT"
        )
