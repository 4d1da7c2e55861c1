"""The training commands: ``finetune`` (one fine-tune here) and ``serve`` (fine-tune after every clean run)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from embed_factory.cli.frame import (
    ConfigOption,
    ProfileOption,
    checked_data_dir,
    checked_export,
    command_frame,
    console,
    load_cli_settings,
    prefect_at,
    say,
    stage_bars,
)
from embed_factory.prefect_server import prefect_ui_url, resolve_api_url
from tasks.training.heldout_loss import describe_heldout_loss

if TYPE_CHECKING:
    from flows.finetune import FinetuneSummary


def finetune(
    clean_id: str | None = typer.Option(
        None, "--clean-id", help="Clean run whose export to train on (default: the latest with an export)."
    ),
    base_model: str | None = typer.Option(
        None,
        "--base-model",
        help="Model folder (or a model already in the Hugging Face cache) to "
        "start from (default: finetune.base_model, else the bundled "
        "all-MiniLM-L6-v2).",
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", min=1, help="Stop training after this many optimizer steps (default: one epoch)."
    ),
    profile: str | None = ProfileOption,
    config: Path | None = ConfigOption,
) -> None:
    """Fine-tune an embedding model on a clean run's export; evaluate it on STS before and after.

    Writes the model (sentence-transformers format, with its model card) and eval.json (before, after, delta) to <data_dir>/models/<model>-<clean_id>/, and prints the STS Spearman (and held-out nDCG@10) before/after/delta per Matryoshka dimension. Starts the local Prefect server if needed.
    """  # noqa: E501 (typer keeps line breaks: one paragraph, one line)
    from flows.finetune import FinetuneSummary, check_base_model
    from flows.finetune import finetune as finetune_flow

    settings = load_cli_settings(config, profile)
    with command_frame(interrupted="interrupted; nothing was moved into place"):  # FinetuneError is a ValueError
        resolved_id = checked_export(settings, clean_id)  # cheap checks before any server
        check_base_model(base_model or settings.finetune.base_model)
        api_url = resolve_api_url(settings, say)
        say(f"fine-tuning on clean run {resolved_id}; flow run in the Prefect UI at {prefect_ui_url(api_url)}")
        with prefect_at(api_url, stage_bars()):  # evaluation and training steps as bars
            summary = finetune_flow(
                clean_id=resolved_id, base_model=base_model, max_steps=max_steps, profile=settings.profile
            )
    print_finetune_summary(FinetuneSummary.of(summary))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_delta(value) -> str:
    if value is None:
        return "-"
    colour = "green" if value > 0 else "red" if value < 0 else "white"
    return f"[{colour}]{value:+.4f}[/]"


def print_finetune_summary(summary: FinetuneSummary) -> None:
    """Before/after/delta per Matryoshka dimension, then the training figures and where the model is."""
    out = Console()
    before, after, change = summary.before, summary.after, summary.delta  # the metrics as eval.json has them
    langs = after.sts.languages if after.sts else []
    what = f"STS Spearman ({langs[0]})" if len(langs) == 1 else f"STS Spearman (mean of {', '.join(langs)})"
    has_ret = bool(change.retrieval)
    if has_ret:
        what += " and held-out nDCG@10"
    table = Table(title=f"{summary.base_model} fine-tuned on {summary.clean_id}: {what}")
    table.add_column("dim", justify="right")
    for col in ("before", "after", "delta"):
        table.add_column(f"STS {col}", justify="right")
    if has_ret:
        for col in ("before", "after", "delta"):
            table.add_column(f"nDCG {col}", justify="right")
    spear_d = (change.sts or {}).get("mean", {})
    dims = [str(d) for d in after.dims or sorted(after.sts_mean, key=int, reverse=True)]
    for dim in dims:
        row = [dim, _fmt(before.sts_mean.get(dim)), _fmt(after.sts_mean.get(dim)), _fmt_delta(spear_d.get(dim))]
        if has_ret:
            rd = (change.retrieval or {}).get(dim, {})
            row += [_fmt(before.ndcg.get(dim)), _fmt(after.ndcg.get(dim)), _fmt_delta(rd.get("ndcg@10"))]
        table.add_row(*row)
    out.print(table)
    if len(langs) > 1:
        per_lang = {lang: v for lang, v in (change.sts or {}).items() if lang != "mean"}
        top = dims[0] if dims else None
        if top:
            out.print(
                "STS delta per language at dim "
                + top
                + ": "
                + ", ".join(f"{lang} {v.get(top, 0) or 0:+.4f}" for lang, v in per_lang.items())
            )
    tr = summary.train
    out.print(
        f"training: {tr.steps} steps, {tr.samples} samples, {tr.samples_per_s or 0:.1f} samples/s, "
        f"{tr.train_seconds or 0:.0f}s; " + describe_heldout_loss(tr.heldout_loss_before, tr.heldout_loss_after)
    )
    out.print(f"model: {summary.model_dir}")
    out.print(f"eval:  {summary.eval_path}")
    if summary.model_url:
        out.print(f"on S3: {summary.model_url}")


def serve(
    max_steps: int | None = typer.Option(
        None, "--max-steps", min=1, help="Cap the training steps of every run this deployment starts."
    ),
    base_model: str | None = typer.Option(
        None, "--base-model", help="Base model of every run this deployment starts (default: finetune.base_model)."
    ),
    limit: int = typer.Option(1, "--limit", min=1, help="Fine-tunes that may run at once on this machine."),
    work_pool: str | None = typer.Option(
        None,
        "--work-pool",
        help="Instead of serving here, register the deployment and its trigger on "
        "this work pool and exit (production: gpu-pool, whose worker runs "
        "the fine-tunes).",
    ),
    config: Path | None = ConfigOption,
) -> None:
    """Serve the finetune/finetune deployment: a fine-tune starts whenever a `clean` flow run completes.

    Its trigger listens for prefect.flow-run.Completed events of the flow `clean` and fine-tunes on that clean run's export (its clean_id). Runs execute on this machine, one at a time by default; Ctrl-C stops serving. Start one by hand with: prefect deployment run 'finetune/finetune' [-p clean_id=ID]. Starts the local Prefect server if needed.
    """  # noqa: E501 (typer keeps line breaks: one paragraph, one line)
    from embed_factory.deployments.finetune_trigger import FULL_NAME, register_finetune
    from embed_factory.deployments.serving import serve_finetune
    from flows.finetune import check_base_model

    settings = load_cli_settings(config)
    parameters = {"max_steps": max_steps, "base_model": base_model}
    with command_frame(stopped="stopped serving"):
        check_base_model(base_model)
        checked_data_dir(settings)  # no clean run yet is fine: it fine-tunes the ones that complete
        api_url = resolve_api_url(settings, say)
        with prefect_at(api_url):
            if work_pool:
                deployment_id = register_finetune(settings, work_pool, parameters)
                console.print(
                    f"[green]registered[/] {FULL_NAME} ({deployment_id}) on work pool {work_pool!r} with "
                    f"its trigger; a worker runs it: prefect worker start --pool {work_pool}"
                )
                return
            say(f"serving {FULL_NAME} (trigger: flow `clean` Completed); UI {prefect_ui_url(api_url)}; Ctrl-C stops")
            serve_finetune(settings, parameters, limit=limit)
