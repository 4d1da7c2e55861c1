"""The cleaning funnel and its drop reasons, counted once from the catalog.

Both funnels (the HTML report, ``tasks/cleaning/report_sections.py``, and the Prefect artifact,
``flows/artifacts.py``) render :func:`funnel_counts`; its columns are ``generated`` and then every
stage table of ``storage/stages.py`` in flow order. Both drop-reason tables render :func:`drop_reasons`.
:func:`generator_funnel` is the same funnel per generator model (the rows' ``model`` column) instead of per
task type: the report's per-model scorecard.
"""

from __future__ import annotations

from storage.catalog import Catalog, _ident
from storage.stages import CLEAN_STAGES

GENERATED = "generated"  # the funnel's first column: the generation runs' raw rows


def funnel_counts(
    catalog: Catalog, clean_id: str | None, runs: list[str], by: str = "task_type"
) -> dict[str, dict[str, int]]:
    """``{column: {task_type: rows}}``: ``generated`` (raw rows of ``runs``), then each stage table of
    ``clean_id`` (none without one). A switchable stage (the judge) that wrote no table is left out;
    every other stage is a column, 0 rows included. ``by``: the row column counted by (``model``: per generator)."""
    with catalog.session():
        counts = {GENERATED: _per(catalog, "raw WHERE list_contains($p, run_id)", runs, by)}
        if clean_id is None:
            return counts
        for stage in CLEAN_STAGES:
            per = _per(catalog, f"{stage.table} WHERE clean_id = $p", clean_id, by)
            if per or stage.switch is None:
                counts[stage.table] = per
    return counts


def generator_funnel(catalog: Catalog, clean_id: str | None, runs: list[str]) -> dict[str, dict[str, int]]:
    """``{column: {model: rows}}``: :func:`funnel_counts` per generator model."""
    return funnel_counts(catalog, clean_id, runs, by="model")


COUNTED_BY = ("task_type", "model")  # the row columns a funnel is counted by (a fixed list: names go into SQL)


def _per(catalog: Catalog, source: str, param: object, by: str) -> dict[str, int]:
    if by not in COUNTED_BY:
        raise ValueError(f"a funnel is counted by one of {COUNTED_BY}, not {by!r}")
    sql = f"SELECT {_ident(by)} AS k, count(*) AS n FROM {source} GROUP BY 1 ORDER BY 1"
    return {r["k"]: r["n"] for r in catalog.query(sql, {"p": param}).to_pylist()}


def drop_reasons(catalog: Catalog, clean_id: str) -> list[dict[str, object]]:
    """Per stage and reason of a clean run's dropped rows: ``n`` and one ``detail`` (the smallest example
    id's, so the same on every call), most rows first."""
    return catalog.query(
        "SELECT stage, reason, count(*) AS n, "
        "arg_min(detail, example_id) FILTER (WHERE detail IS NOT NULL) AS detail "
        "FROM dropped WHERE clean_id = $c GROUP BY stage, reason ORDER BY n DESC, stage, reason",
        {"c": clean_id},
    ).to_pylist()
