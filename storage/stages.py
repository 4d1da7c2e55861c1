"""The one registry of cleaning stages: what each writes, under which names, in flow order.

Every other list of stages derives from :data:`CLEAN_STAGES`: the clean flow's steps and their resume
checks (``flows/clean.py``), the catalog views (``storage/catalog.py``), both funnels (the HTML report
and the Prefect artifact, through :func:`storage.funnel.funnel_counts`), the clean summary's counts,
and the ablation's row sources. A stage's ``table`` is at once its file (``<clean>/<table>.parquet``),
its catalog view and its funnel column; its ``drops`` are its files under ``<clean>/dropped/`` (the
``stage`` column of those rows). Adding a stage = one stage class (``tasks/cleaning/``) + one line here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from ground.settings import CleanSettings
from storage.schemas import CANDIDATE_COLUMNS, EXAMPLE_SCHEMA, FILTER_COLUMNS, JUDGE_COLUMNS, MINED_COLUMNS


def with_columns(schema: pa.Schema, extra: list[tuple[str, pa.DataType]]) -> pa.Schema:
    out = schema
    for name, dtype in extra:
        out = out.append(pa.field(name, dtype))
    return out


FILTERED_SCHEMA = with_columns(EXAMPLE_SCHEMA, FILTER_COLUMNS)
MINED_SCHEMA = with_columns(FILTERED_SCHEMA, MINED_COLUMNS)  # + CANDIDATE_COLUMNS in newer files
VERIFIED_SCHEMA = with_columns(MINED_SCHEMA, CANDIDATE_COLUMNS + JUDGE_COLUMNS)


@dataclass(frozen=True)
class StageTable:
    """One committed table of a clean run."""

    name: str  # the stage's name (the ``stage`` of its dropped rows when it has one drop file)
    table: str  # file stem, catalog view and funnel column
    schema: pa.Schema  # the view's columns (an empty view is typed from it)
    drops: tuple[str, ...]  # its dropped-row files (dropped/<name>.parquet), also the rows' ``stage``
    checked: bool = False  # read back checked against (and cast to) ``schema``; else as written
    switch: str | None = None  # the CleanSettings flag that turns it on; None: always on

    def enabled(self, cfg: CleanSettings) -> bool:
        return self.switch is None or bool(getattr(cfg, self.switch))


#: the clean run's tables, in flow order
CLEAN_STAGES: tuple[StageTable, ...] = (
    StageTable("validate", "valid", EXAMPLE_SCHEMA, ("validate",), checked=True),
    StageTable("dedup", "deduped", EXAMPLE_SCHEMA, ("dedup_exact", "dedup_near"), checked=True),
    StageTable("decontaminate", "decontaminated", EXAMPLE_SCHEMA, ("decontaminate",), checked=True),
    StageTable("rank_filter", "filtered", FILTERED_SCHEMA, ("rank_filter",)),
    StageTable("negatives", "mined", MINED_SCHEMA, ("negatives",)),
    StageTable("judge", "verified", VERIFIED_SCHEMA, ("judge",), switch="judge"),
)
STAGE_TABLES = {s.table: s for s in CLEAN_STAGES}
STAGE_NAMES = {s.name: s for s in CLEAN_STAGES}


def enabled_stages(cfg: CleanSettings) -> tuple[StageTable, ...]:
    return tuple(s for s in CLEAN_STAGES if s.enabled(cfg))


def final_table(cfg: CleanSettings) -> str:
    """The last table the settings turn on: what the export is made of."""
    return enabled_stages(cfg)[-1].table


def table_before(table: str) -> str:
    """The table a stage reads: the one before it in flow order (switchable stages come last)."""
    names = [s.table for s in CLEAN_STAGES]
    return names[names.index(table) - 1]
