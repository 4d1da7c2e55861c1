"""The ``ablate`` command: which cleaning stages pay, measured by training on variants of one clean run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from embed_factory.cli.frame import (
    ConfigOption,
    ProfileOption,
    checked_export,
    command_frame,
    load_cli_settings,
    prefect_at,
    say,
    stage_bars,
)
from embed_factory.prefect_server import prefect_ui_url, resolve_api_url

if TYPE_CHECKING:
    from flows.ablate import AblationSummary


def ablate(
    clean_id: str = typer.Option(..., "--clean-id", help="Clean run whose stage tables the variants are made of."),
    max_steps: int | None = typer.Option(
        None, "--max-steps", min=1, help="Training steps of every run (default: one epoch each)."
    ),
    seeds: int = typer.Option(2, "--seeds", min=2, help="Training seeds per variant: finetune.seed, +1, ..."),
    variants: list[str] | None = typer.Option(
        None,
        "--variants",
        help="Variants to train, repeated or comma-separated (default: all): unfiltered, filtered, "
        "filtered+judge, no-hard-negatives, homogeneous-0, homogeneous-1.",
    ),
    languages: str | None = typer.Option(
        None, "--languages", help="STS Benchmark languages to evaluate, comma-separated, e.g. en (default: all)."
    ),
    base_model: str | None = typer.Option(
        None, "--base-model", help="Model folder to start from (default: finetune.base_model, else MiniLM)."
    ),
    profile: str | None = ProfileOption,
    config: Path | None = ConfigOption,
) -> None:
    """Train the same base model on variants of one clean run and compare STS / held-out nDCG@10 per dim.

    Variants: unfiltered (deduped rows, hard negatives mined the same way without the ranking-consistency filter), filtered (the export), filtered+judge (when the clean run has LLM-judge results), no-hard-negatives (in-batch only), homogeneous-0 / homogeneous-1 (batch task mix). Every variant trains with the same steps and seeds; the table (mean ± spread over seeds) goes to <data_dir>/clean/<clean_id>/ablation/ (results.parquet, ablation.html) and to a Prefect artifact. Quick on CPU: --max-steps 20 --languages en.
    """  # noqa: E501 (typer keeps line breaks: one paragraph, one line)
    from flows.ablate import ablate as ablate_flow
    from storage.models import check_base_model
    from tasks.training.ablation import parse_variants

    settings = load_cli_settings(config, profile)
    langs = [lang.strip() for lang in (languages or "").split(",") if lang.strip()] or None
    with command_frame(interrupted="interrupted; no ablation table was written"):
        resolved_id = checked_export(settings, clean_id)  # cheap checks before any server
        chosen = [v.name for v in parse_variants(variants)]
        check_base_model(base_model or settings.finetune.base_model)
        _check_languages(settings, langs)
        api_url = resolve_api_url(settings, say)
        say(f"ablation of clean run {resolved_id}: {', '.join(chosen)} x {seeds} seeds; UI {prefect_ui_url(api_url)}")
        with prefect_at(api_url, stage_bars()):
            summary = ablate_flow(
                clean_id=resolved_id,
                max_steps=max_steps,
                seeds=seeds,
                variants=chosen,
                languages=langs,
                base_model=base_model,
                profile=settings.profile,
            )
    print_ablation(summary)


def _check_languages(settings, languages: list[str] | None) -> None:
    from tasks.training.eval_data import sts_dir_for, sts_file

    cfg = settings.finetune
    for lang in languages or []:
        path = sts_file(sts_dir_for(cfg), lang, "test")
        if not Path(path).exists():
            raise ValueError(f"--languages: no STS Benchmark test split for {lang!r} ({path})")


def print_ablation(summary: AblationSummary) -> None:
    """The table (mean ± sample std over seeds), the skipped variants and where the files are."""
    import pyarrow as pa

    from storage.schemas import ABLATION_SCHEMA
    from tasks.training.ablation import display_rows

    out = Console()
    text = display_rows(pa.Table.from_pylist(summary.table, schema=ABLATION_SCHEMA))
    table = Table(title=f"ablation of {summary.clean_id} ({summary.base_model}), mean ± std over seeds")
    for name in text.header:
        table.add_column(name, justify="left" if name == "variant" else "right")
    for row in text.rows:
        table.add_row(*row)
    out.print(table)
    for note in summary.notes:
        out.print(f"- {note}")
    out.print(f"table: {summary.results_path}")
    out.print(f"page:  {summary.html_path}")
