"""The report's intent section: semantic instruction dedup per task type (``tasks/generation/intents.py``).

From the ``instructions`` view: instructions (distinct strings), distinct intents, paraphrase clusters
(intents with two or more instructions) and the mean nearest-neighbour cosine per task type. Runs made
before intents existed count each instruction as its own intent.
"""

from __future__ import annotations

from tasks.cleaning.report_data import ReportData
from tasks.cleaning.report_html import empty, note, table, type_order

INTENTS_SQL = """
SELECT task_type, count(*) AS instructions, count(DISTINCT intent) AS intents,
       count(DISTINCT intent) FILTER (WHERE members > 1) AS clusters, avg(nearest) AS nn
FROM (
    SELECT task_type, run_id || '/' || coalesce({intent}, instruction_id) AS intent,
           count(*) OVER (PARTITION BY run_id, task_type, coalesce({intent}, instruction_id)) AS members,
           {nearest} AS nearest
    FROM instructions WHERE {runs}
) GROUP BY task_type
"""


def intents_section(d: ReportData) -> str:
    columns = d.catalog.query("SELECT * FROM instructions LIMIT 0").column_names
    has_intents = "intent_id" in columns
    sql = INTENTS_SQL.replace("{intent}", "intent_id" if has_intents else "NULL").replace(
        "{nearest}", "nearest_similarity" if "nearest_similarity" in columns else "CAST(NULL AS DOUBLE)"
    )
    rows = {r["task_type"]: r for r in d.run_rows(sql)}
    if not rows:
        return empty("No brainstormed instructions yet.")
    out = [] if has_intents else [note("These runs predate intent dedup: each instruction counts as one intent.")]
    out.append(
        table(
            [
                "task type",
                "instructions",
                "distinct intents",
                "clusters (2+ instructions)",
                "mean nearest-neighbour cosine",
            ],
            [
                (t, rows[t]["instructions"], rows[t]["intents"], rows[t]["clusters"], rows[t]["nn"])
                for t in type_order(list(rows))
            ],
        )
    )
    return "".join(out)
