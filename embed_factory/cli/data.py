"""The data commands: ``clean`` (the clean flow), ``query`` (DuckDB over the catalog) and ``report`` (HTML)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from embed_factory.cli.frame import (
    ConfigOption,
    checked_data_dir,
    command_frame,
    console,
    fail,
    load_cli_settings,
    prefect_at,
    say,
    stage_bars,
)
from embed_factory.prefect_server import resolve_api_url
from storage.stages import CLEAN_STAGES

if TYPE_CHECKING:
    from flows.clean import CleanSummary


def clean(
    clean_id: str | None = typer.Option(None, "--clean-id", help="Id of the clean run (default: new)."),
    runs: list[str] | None = typer.Option(None, "--run", "-r", help="Generation run(s) to include (default: all)."),
    publish_to: str | None = typer.Option(
        None,
        "--publish-to",
        help="Also publish the export: a local folder or a Hub dataset repo id (token from HF_TOKEN).",
    ),
    config: Path | None = ConfigOption,
) -> None:
    """Validate, deduplicate, rank-filter and mine hard negatives; export the training corpus."""
    from storage.corpus import CleanStore
    from storage.inventory import check_runs_readable, require_runs, run_ids

    settings = load_cli_settings(config)
    clean_id = clean_id or datetime.now(UTC).strftime("clean-%Y%m%d-%H%M%S")
    with command_frame():  # the ids and the runs' files are checked before any server starts
        root = checked_data_dir(settings, holds_runs=True)
        CleanStore(root, clean_id)  # a new clean id is fine; a malformed one is its error
        chosen = require_runs(root, runs) if runs else run_ids(root)
        if not chosen:
            fail(f"no generation runs under {root / 'runs'}; run `embed-factory run` first")
        check_runs_readable(root, chosen)
        api_url = resolve_api_url(settings, say)
        print_clean_summary(clean_flow(api_url, clean_id, runs, publish_to, settings.profile))


def clean_flow(api_url: str, clean_id: str, runs, publish_to, profile) -> CleanSummary:
    """Run the clean flow here, its stages as bars; its summary."""
    from flows.clean import clean as clean_runs

    with prefect_at(api_url, stage_bars()):
        summary = clean_runs(clean_id=clean_id, runs=runs, publish_to=publish_to, profile=profile)
    return summary


def print_clean_summary(summary: CleanSummary) -> None:
    out = Console()
    # the id goes on its own line: as a title of this narrow table it would wrap mid-word
    out.print(f"clean {summary.clean_id} ({len(summary.runs)} run(s))")
    table = Table()
    table.add_column("stage")
    table.add_column("rows", justify="right")
    for stage, count in summary.counts.items():
        table.add_row(stage, str(count))
    out.print(table)
    out.print("dropped: " + (", ".join(f"{k} {v}" for k, v in summary.dropped.items()) or "none"))
    out.print(f"export: {summary.export_dir}   report: {summary.report}")
    out.print('query:  embed-factory query "SELECT task_type, count(*) FROM mined GROUP BY 1"')


def query(
    sql: str = typer.Argument(
        ...,
        help="SQL over the catalog views: raw, rejects, brainstorm, instructions, "
        f"{', '.join(s.table for s in CLEAN_STAGES)}, judged, dropped, clean_inputs, ledger, lineage, passages.",
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the result to a .csv or .parquet file."),
    limit: int = typer.Option(50, help="Rows to print."),
    config: Path | None = ConfigOption,
) -> None:
    """Query the shards and every cleaning stage with DuckDB (catalog file: <data_dir>/catalog.duckdb).

    With an s3:// data_dir the views read the shards from S3 (no catalog file there).
    """
    from storage.catalog import Catalog, CatalogError

    settings = load_cli_settings(config)
    with command_frame():
        checked_data_dir(settings, holds_runs=True)  # a misspelled data dir: nothing created, no empty answer
    catalog = Catalog.from_settings(settings)
    try:  # the catalog refreshes its views by itself
        if out is not None:
            if out.suffix not in (".csv", ".parquet"):
                fail(f"--out must end in .csv or .parquet, not {out.suffix or '(none)'}", 2)
            catalog.to_file(sql, out)
            console.print(f"wrote {out}")
            return
        result = catalog.query(sql)
    except CatalogError as exc:
        fail(str(exc))
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


def report(
    clean_id: str | None = typer.Option(None, "--clean-id", help="Clean run to report on (default: latest)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="HTML file (default: the clean run's report.html)."),
    config: Path | None = ConfigOption,
) -> None:
    """Write an HTML report: funnel, drop reasons, ranks, negative scores, lengths, diversity."""
    from storage.catalog import Catalog
    from storage.corpus import CleanStore
    from storage.inventory import require_clean
    from tasks.cleaning.report import write_report

    settings = load_cli_settings(config)
    with command_frame():
        root = checked_data_dir(settings, holds_runs=True)
        catalog = Catalog.from_settings(settings)
        if clean_id is None:
            ids = catalog.clean_ids()  # oldest first
            if not ids:
                fail("no clean run yet; run `embed-factory clean` first")
            clean_id = ids[-1]
        require_clean(root, clean_id)
        target = out or CleanStore.from_settings(settings, clean_id).report_path
        catalog.refresh()
        path = write_report(catalog, clean_id, target)
    console.print(f"report: {path}")
