"""The corpus report's cost section: the clean run's ledger per task type (``ledger`` view of the catalog),
its input runs' generation ledgers, and each run's plan against what it spent (``ground/costs.py``)."""

from __future__ import annotations

from ground.costs import relative_error, totals
from tasks.cleaning.report_data import ReportData
from tasks.cleaning.report_html import empty, note, table


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{value:+.1%}"


def ledger_section(d: ReportData) -> str:
    cleans = d.clean_rows("SELECT * FROM ledger WHERE scope = 'clean' AND {clean} ORDER BY task_type, model")
    runs = d.run_rows("SELECT * FROM ledger WHERE scope = 'generate' AND {runs} ORDER BY run_id, task_type, model")
    if not cleans and not runs:
        return empty("No cost ledger yet (runs from before the ledger, or none finished).")
    out = []
    if cleans:
        rows = [
            (
                r["task_type"],
                r["model"],
                r["llm_calls"],
                r["prompt_tokens"],
                r["completion_tokens"],
                r["generation_gpu_s"],
                (r["embed_s"] or 0) + (r["search_s"] or 0),
                r["train_gpu_s"],
                r["accepted"],
                r["gpu_hours"],
                r["cost_usd"],
                r["cost_per_1k_accepted"],
            )
            for r in cleans
        ]
        t = totals(cleans)
        rows.append(
            (
                "total",
                None,
                t["llm_calls"],
                t["prompt_tokens"],
                t["completion_tokens"],
                t["generation_gpu_s"],
                t["embed_s"] + t["search_s"],
                t["train_gpu_s"],
                t["accepted"],
                t["gpu_hours"],
                t["cost_usd"],
                t["cost_per_1k_accepted"],
            )
        )
        headers = ["task type", "generator", "LLM calls", "prompt tokens", "completion tokens", "generation GPU-s"]
        headers += ["embed + search s", "training GPU-s", "accepted", "GPU-hours", "USD", "USD per 1k accepted"]
        out.append(table(headers, rows, text_cols=(0, 1)))
    out.append(
        note(
            "Generation GPU-seconds = GPUs per endpoint × the generator's endpoints × wall seconds, shared across "
            "its task types in proportion to their tokens; embedding and search seconds are shared by rows "
            "embedded, training seconds by accepted rows; accepted = rows in the export. "
            "Prices and GPU counts: the [cost] settings."
        )
    )
    if runs:
        out.append("<h3>Generation runs: plan vs actual</h3>")
        planned = [
            (
                r["run_id"],
                r["task_type"],
                r["model"],
                r["requests"],
                r["predicted_requests"],
                r["prompt_tokens"] + r["completion_tokens"],
                r["predicted_tokens"],
                r["generation_wall_s"],
                r["predicted_wall_s"],
                r["cost_usd"],
                r["predicted_cost_usd"],
                _pct(relative_error(r["predicted_cost_usd"], r["cost_usd"])),
                r["plan_source"] or "no plan",
            )
            for r in runs
        ]
        headers = [
            "run",
            "task type",
            "generator",
            "requests",
            "predicted",
            "tokens",
            "predicted",
            "wall s",
            "predicted",
        ]
        headers += ["USD", "predicted", "cost error", "plan from"]
        out.append(table(headers, planned, text_cols=(0, 1, 2, 12)))
    return "".join(out)
