"""The report's grounded section: the rows of grounded runs by question type and difficulty.

From the ``lineage`` view (``source = 'grounded'``: passage, question type, difficulty) joined to ``raw``
(the chosen persona): rows generated, distinct passages and personas, and the rows that reached the clean
run's furthest stage, per question type and difficulty.
"""

from __future__ import annotations

from tasks.cleaning.report_data import ReportData
from tasks.cleaning.report_html import empty, table

GROUNDED_SQL = """
SELECT l.question_type, l.difficulty, count(*) AS generated, count(DISTINCT l.passage_id) AS passages,
       count(DISTINCT r.persona_id) AS personas, count(k.example_id) AS kept
FROM lineage l JOIN raw r USING (example_id)
LEFT JOIN (SELECT example_id FROM {last} WHERE clean_id = $clean) k USING (example_id)
WHERE l.source = 'grounded' AND list_contains($runs, l.run_id)
GROUP BY 1, 2 ORDER BY 1, 2
"""


def grounded_section(d: ReportData) -> str:
    if "passage_id" not in d.catalog.query("SELECT * FROM lineage LIMIT 0").column_names:
        return empty("No grounded run (generation.corpus) among these runs.")
    last = d.last_stage
    sql = GROUNDED_SQL.replace("{last}", last or "raw")
    if last is None:  # no clean stage yet: nothing kept to count
        sql = sql.replace("count(k.example_id)", "CAST(NULL AS BIGINT)").replace(" WHERE clean_id = $clean", "")
    rows = d.rows(sql, {"runs": d.runs, "clean": d.clean_id} if last else {"runs": d.runs})
    if not rows:
        return empty("No grounded run (generation.corpus) among these runs.")
    return table(
        ["question type", "difficulty", "generated", "passages", "personas", f"kept ({last or 'no clean run'})"],
        [(r["question_type"], r["difficulty"], r["generated"], r["passages"], r["personas"], r["kept"]) for r in rows],
    )
