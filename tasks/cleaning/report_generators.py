"""The corpus report's per-generator scorecard: for each model that wrote rows (the rows' ``model``), how many
of its requests parsed, how many of its rows survived each cleaning stage, and what its accepted rows cost.

Row counts come from the stage tables (``storage/funnel.py`` ``generator_funnel``); the cost is the clean run's
ledger rows of that model summed (``ground/costs.py``), divided by the model's rows in the last stage table.
"""

from __future__ import annotations

from typing import Any

from storage.funnel import GENERATED, generator_funnel
from tasks.cleaning.report_data import ReportData
from tasks.cleaning.report_html import as_number, empty, note, table


def generator_rows(d: ReportData) -> list[dict[str, Any]]:
    """One row per generator model: ``requests`` (example requests: parsed + rejected), ``generated``, each
    stage table's rows, ``kept_pct`` (the last stage over generated), ``cost_usd`` and ``cost_per_1k_accepted``."""
    funnel = generator_funnel(d.catalog, d.clean_id, d.runs)
    stages = [s for s in funnel if s != GENERATED]
    rejected = {
        r["model"]: r["n"]
        for r in d.run_rows(
            "SELECT model, count(*) AS n FROM rejects WHERE {runs} AND stage = 'generate' GROUP BY ALL ORDER BY 1"
        )
    }
    costs = {
        r["model"]: as_number(r["usd"])
        for r in d.clean_rows(
            "SELECT model, sum(cost_usd) AS usd FROM ledger WHERE scope = 'clean' AND {clean} GROUP BY ALL"
        )
    }
    models = sorted({m for counts in funnel.values() for m in counts} | set(rejected), key=str)
    rows = []
    for model in models:
        generated = funnel[GENERATED].get(model, 0)
        row: dict[str, Any] = {"model": model, "requests": generated + rejected.get(model, 0), GENERATED: generated}
        row |= {stage: funnel[stage].get(model, 0) for stage in stages}
        accepted = row[stages[-1]] if stages else None
        row["kept_pct"] = round(100.0 * accepted / generated, 1) if stages and generated else None
        usd = row["cost_usd"] = costs.get(model)
        row["cost_per_1k_accepted"] = usd / accepted * 1000 if accepted and usd is not None else None
        rows.append(row)
    return rows


def generators_section(d: ReportData) -> str:
    rows = generator_rows(d)
    if not rows:
        return empty("No generated examples yet.")
    columns = [c for c in rows[0] if c != "model"]
    headers = ["generator (model)", *(c.replace("_", " ") for c in columns)]
    headers = [h.replace("kept pct", "kept %").replace("cost per 1k accepted", "USD per 1k accepted") for h in headers]
    out = [table(headers, [[r["model"], *(r[c] for c in columns)] for r in rows], text_cols=(0,))]
    out.append(
        note(
            "Per model that wrote rows (llm.endpoints, llm.mix): requests = parsed + rejected example requests; "
            "then its rows in each stage table; kept % = the last stage over generated. USD = the clean run's "
            "ledger rows of the model (its generation, its share of embedding, search and training)."
        )
    )
    return "".join(out)
