"""The corpus report: one self-contained HTML page about a generation + cleaning run.

``write_report(catalog, clean_id, out_path)`` queries the DuckDB catalog (``storage/catalog.py``)
and writes a page with no external resources: figures are matplotlib PNGs (Agg canvas, no pyplot
global state) embedded as ``data:image/png;base64``. Sections:

1. overview: runs, clean run, rows at each end of the pipeline, models;
2. funnel: rows per stage (generated, then every stage table of ``storage/stages.py``) per task type;
   generators (``report_generators.py``): the same funnel per generator model, with its cost per 1k accepted;
3. drop reasons: which stage dropped how many rows, and why;
4. positive rank: where the positive ranked for its query (ranking-consistency filter);
5. negative scores: hard-negative similarity vs the positive's similarity;
   LLM judge (``report_judge.py``): verdict rates per task type, negatives replaced, positives relabelled;
6. lengths: query and positive characters per task type;
7. diversity: unique instructions and personas, top personas, distinct-n of queries and positives;
8. generation: rejects by reason, attempts, tokens, latency, finish reasons.
   grounded (``report_grounded.py``): grounded runs' rows per question type and difficulty;
9. costs (``report_ledger.py``): the cost ledger per task type and per 1,000 accepted samples, plan vs actual.

``clean_id=None`` takes the most recent clean run, or none: a project where only generation ran gets
the generation sections and a note in the others. Every text that comes from data (personas,
instructions, model output, reasons) is HTML-escaped.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from storage.atomic import atomic_write_bytes
from storage.catalog import Catalog
from storage.location import as_store_path
from tasks.cleaning.report_data import ReportData
from tasks.cleaning.report_generators import generators_section
from tasks.cleaning.report_grounded import grounded_section
from tasks.cleaning.report_html import CSS, esc
from tasks.cleaning.report_intents import intents_section
from tasks.cleaning.report_judge import judge_section
from tasks.cleaning.report_ledger import ledger_section
from tasks.cleaning.report_sections import (
    drops_section,
    funnel_section,
    lengths_section,
    negatives_section,
    overview_section,
    ranks_section,
)
from tasks.cleaning.report_sections_text import distinct_n, diversity_section, generation_section

__all__ = ["SECTIONS", "distinct_n", "render_report", "write_report"]

SECTIONS: list[tuple[str, str, Callable[[ReportData], str]]] = [
    ("overview", "Overview", overview_section),
    ("funnel", "Funnel per stage and task type", funnel_section),
    ("generators", "Generators: each model's rows through the stages, and their cost", generators_section),
    ("drops", "Drop reasons", drops_section),
    ("ranks", "Positive rank", ranks_section),
    ("negatives", "Negative scores", negatives_section),
    ("judge", "LLM judge: false negatives and relabelled positives", judge_section),
    ("lengths", "Length distributions", lengths_section),
    ("diversity", "Instruction and persona diversity", diversity_section),
    ("generation", "Generation statistics", generation_section),
    ("intents", "Instruction intents (semantic dedup)", intents_section),
    ("grounded", "Grounded rows: question types and difficulties", grounded_section),
    ("costs", "Cost ledger: per task type, per 1,000 accepted samples, plan vs actual", ledger_section),
]


def render_report(catalog: Catalog, clean_id: str | None = None) -> str:
    """The report page as a string."""
    with catalog.session():  # one read-only connection for all the queries
        d = ReportData(catalog, clean_id)
        body = [
            f'<section id="{anchor}"><h2>{esc(title)}</h2>{build(d)}</section>' for anchor, title, build in SECTIONS
        ]
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    subtitle = f"clean run {d.clean_id}" if d.clean_id else "generation only (no clean run yet)"
    nav = "".join(f'<a href="#{anchor}">{esc(title)}</a>' for anchor, title, _ in SECTIONS)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>embed-factory report: {esc(subtitle)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>embed-factory corpus report</h1><p>{esc(subtitle)} · data {esc(catalog.data_dir)} · "
        f"generated at {esc(now)}</p></header><nav>{nav}</nav><main>{''.join(body)}"
        f"<footer>embed-factory · generated at {esc(now)}</footer></main></body></html>\n"
    )


def write_report(catalog: Catalog, clean_id: str | None, out_path: Path) -> Path:
    """Write the self-contained HTML report to ``out_path`` (atomically) and return the path."""
    out_path = as_store_path(out_path)  # a local file, or an S3 key next to the clean run's tables
    atomic_write_bytes(out_path, render_report(catalog, clean_id).encode("utf-8"))
    return out_path
