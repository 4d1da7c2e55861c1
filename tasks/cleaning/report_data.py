"""What the corpus report reads: the DuckDB catalog seen through one clean run (or none) and the
generation runs it read, with the sample sizes the report's figures use."""

from __future__ import annotations

from typing import Any

from storage.catalog import Catalog
from storage.funnel import GENERATED, funnel_counts

SAMPLE_ROWS = 200_000  # rows pulled into Python for a histogram (reservoir sample, repeatable)
# a constant in the SQL text: DuckDB takes no parameter here
SAMPLE_CLAUSE = f" USING SAMPLE reservoir({SAMPLE_ROWS} ROWS) REPEATABLE (7)"
DIVERSITY_SAMPLE = 5_000  # texts per task type for distinct-n (it depends on the sample size)


class ReportData:
    """The catalog seen through one clean run (or none) and the generation runs it read."""

    def __init__(self, catalog: Catalog, clean_id: str | None):
        self.catalog = catalog
        self.clean_ids = catalog.clean_ids()
        self.clean_id = clean_id if clean_id is not None else (self.clean_ids[-1] if self.clean_ids else None)
        self.all_runs = catalog.run_ids()
        runs: list[str] = []
        if self.clean_id is not None:
            rows = self.rows(
                "SELECT DISTINCT run_id FROM (SELECT run_id FROM clean_inputs WHERE clean_id = $c "
                "UNION SELECT run_id FROM valid WHERE clean_id = $c) WHERE run_id IS NOT NULL ORDER BY 1",
                {"c": self.clean_id},
            )
            runs = [r["run_id"] for r in rows]
        self.runs = runs or self.all_runs
        #: ``{column: {task_type: rows}}``, ``generated`` first, then the clean run's stage tables in flow order
        self.funnel = funnel_counts(catalog, self.clean_id, self.runs)
        #: rows per stage table of the clean run (the funnel's columns after ``generated``)
        self.stage_counts = {stage: sum(n.values()) for stage, n in self.funnel.items() if stage != GENERATED}

    def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return self.catalog.query(sql, params).to_pylist()

    def run_rows(self, sql: str, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """``sql`` over a run-level view; ``{runs}`` becomes the filter on this report's runs."""
        return self.rows(sql.replace("{runs}", "list_contains($runs, run_id)"), {"runs": self.runs, **(extra or {})})

    def clean_rows(self, sql: str, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """``sql`` over a clean-level view; ``{clean}`` becomes the filter on this report's clean id."""
        if self.clean_id is None:
            return []
        return self.rows(sql.replace("{clean}", "clean_id = $clean"), {"clean": self.clean_id, **(extra or {})})

    @property
    def last_stage(self) -> str | None:
        """The furthest clean stage that has rows."""
        done = [s for s, n in self.stage_counts.items() if n]
        return done[-1] if done else None
