"""``embed-factory import``: existing training data (KaLM JSONL, sentence-transformers columns, Parquet, datasets
folders; local or S3) as a run of the catalog, which ``embed-factory clean`` then cleans with the generated runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from embed_factory.cli.frame import (
    ConfigOption,
    checked_data_dir,
    command_frame,
    fail,
    load_cli_settings,
    prefect_at,
    say,
    stage_bars,
)
from embed_factory.prefect_server import resolve_api_url
from ground.task_types import ALL_TASK_TYPES
from storage.shards import RunStore

if TYPE_CHECKING:
    from flows.importing import ImportSummary


def import_data(
    paths: list[str] = typer.Argument(
        ..., help="Input files or folders (local or s3://): .jsonl/.json/.ndjson (.gz), .parquet, datasets folders."
    ),
    import_id: str | None = typer.Option(
        None, "--import-id", help="Run id of the import; re-use one to resume it (default: import-<first input>)."
    ),
    task_type: str = typer.Option(
        "retrieval", "--task-type", "-t", help="Task type of records without a known task_name."
    ),
    instruction: str | None = typer.Option(None, "--instruction", help="Instruction for records that carry none."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip and count invalid lines."),
    shard_rows: int = typer.Option(20_000, "--shard-rows", min=1, help="Rows per committed shard."),
    config: Path | None = ConfigOption,
) -> None:
    """Import existing training data as a run; `embed-factory clean` then cleans it with the generated runs.

    Layouts: KaLM/FlagEmbedding (query, pos, neg, task_name, instruction), sentence-transformers
    (anchor/positive/negative, query/positive or query/answer). A bad line stops the import with its
    file:line (nothing is kept), or with --skip-invalid is skipped and counted.
    """
    from flows.importing import check_import_id
    from tasks.importing.readers import resolve_sources
    from tasks.importing.shards import default_import_id

    settings = load_cli_settings(config)
    if task_type not in ALL_TASK_TYPES:
        fail(f"unknown task type {task_type}; choose from {', '.join(ALL_TASK_TYPES)}", 2)
    import_id = import_id or default_import_id(paths)
    with command_frame():  # the inputs and the id are checked before any server starts
        root = checked_data_dir(settings)
        check_import_id(RunStore(root, import_id))  # a malformed id, or a generation run's, is its error
        resolve_sources(paths, settings.storage.storage_options())
        api_url = resolve_api_url(settings, say)
        summary = import_flow(api_url, paths, import_id, task_type, instruction, skip_invalid, shard_rows, settings)
    print_import_summary(summary)


def import_flow(api_url, paths, import_id, task_type, instruction, skip_invalid, shard_rows, settings) -> ImportSummary:
    """Run the import flow here, its rows as a bar; its summary."""
    from flows.importing import import_data as import_flow_fn

    with prefect_at(api_url, stage_bars()):
        summary = import_flow_fn(
            paths=paths,
            import_id=import_id,
            task_type=task_type,
            instruction=instruction,
            skip_invalid=skip_invalid,
            shard_rows=shard_rows,
            profile=settings.profile,
        )
    return summary


def print_import_summary(summary: ImportSummary) -> None:
    out = Console()
    out.print(f"import {summary.import_id}: {summary.rows} rows in {summary.elapsed_s:.1f} s")
    table = Table()
    table.add_column("task type")
    table.add_column("rows", justify="right")
    for task_type, rows in summary.by_type.items():
        table.add_row(task_type, str(rows))
    out.print(table)
    for path, layout in summary.layouts.items():
        out.print(f"{path}: {layout} layout")
    for note in summary.notes:
        out.print(f"note: {note}")
    out.print(f"run: {summary.run_dir}")
    out.print("next: embed-factory clean")
    out.print('query: embed-factory query "SELECT file, count(*) FROM raw JOIN lineage USING (example_id) GROUP BY 1"')
