"""The LLM judge's section of the corpus report: verdict rates per task type and role, and what changed.

Reads the ``judged`` view (every decision of ``tasks/cleaning/judge.py``), ``verified`` (rows relabelled,
negatives replaced) and the judge's drops in ``dropped``. A clean run without the judge gets a note.
"""

from __future__ import annotations

from tasks.cleaning.report_data import ReportData
from tasks.cleaning.report_html import empty, fmt, note, table, type_order


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "–"


def judge_section(d: ReportData) -> str:
    if d.clean_id is None:
        return empty("No clean run yet.")
    rates = d.clean_rows(
        "SELECT task_type AS t, count(*) AS asked, "
        "count(*) FILTER (WHERE role IN ('negative', 'replacement')) AS negs, "
        "count(*) FILTER (WHERE role IN ('negative', 'replacement') AND verdict = 'relevant') AS false_negs, "
        "count(*) FILTER (WHERE role = 'top_retrieved') AS tops, "
        "count(*) FILTER (WHERE role = 'top_retrieved' AND verdict = 'relevant') AS tops_relevant, "
        "count(*) FILTER (WHERE role = 'positive') AS positives, "
        "count(*) FILTER (WHERE role = 'positive' AND verdict <> 'relevant' AND verdict <> 'error') AS pos_worse, "
        "count(*) FILTER (WHERE verdict = 'error') AS errors "
        "FROM judged WHERE {clean} GROUP BY 1"
    )
    if not rates:
        return empty("The LLM judge did not run for this clean run (clean.judge is off).")
    changed = {
        r["t"]: r
        for r in d.clean_rows(
            "SELECT task_type AS t, count(*) FILTER (WHERE judge_relabelled) AS relabelled, "
            "sum(judge_replaced) AS replaced FROM verified WHERE {clean} GROUP BY 1"
        )
    }
    drops = {
        (r["t"], r["reason"]): r["n"]
        for r in d.clean_rows(
            "SELECT task_type AS t, reason, count(*) AS n FROM dropped WHERE {clean} AND stage = 'judge' GROUP BY ALL"
        )
    }
    by_type = {r["t"]: r for r in rates}
    rows = []
    for t in type_order(list(by_type)):
        r, c = by_type[t], changed.get(t, {})
        rows.append(
            (
                t,
                r["asked"],
                _share(r["false_negs"], r["negs"]),
                _share(r["tops_relevant"], r["tops"]),
                _share(r["pos_worse"], r["positives"]),
                fmt(c.get("replaced") or 0),
                fmt(c.get("relabelled") or 0),
                drops.get((t, "judged_false_positive"), 0),
                drops.get((t, "judged_no_negatives"), 0),
                r["errors"],
            )
        )
    versions = d.clean_rows("SELECT DISTINCT prompt_version AS v, model FROM judged WHERE {clean} ORDER BY 1")
    return table(
        [
            "task type",
            "pairs judged",
            "negatives judged relevant",
            "top retrieved judged relevant",
            "positive graded below it",
            "negatives removed",
            "relabelled",
            "dropped: positive worse",
            "dropped: no negative left",
            "failed requests",
        ],
        rows,
        text_cols=(0,),
    ) + note(
        "A negative judged relevant is a false negative: removed, and replaced from the spare candidates "
        "(ranks 51-100). The positive is only judged when the top retrieved text is judged relevant. "
        "Judge: " + "; ".join(f"{v['model']} ({v['v']})" for v in versions)
    )
