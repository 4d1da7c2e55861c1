"""Ablation variants of one clean run, and the table that compares them.

Which cleaning stages pay? Train the same base model, with the same steps and seeds, on variants of
one clean run and compare STS Spearman and held-out nDCG@10 per Matryoshka dim. A variant is a pure
transformation of the clean run's rows (:func:`variant_rows`) plus the fine-tune settings it changes
(:func:`variant_settings`); training and evaluation are the usual ``train`` / ``evaluate`` modules.

Row sources (mined-like tables: ``example_id``, ``task_type``, ``instruction``, ``query``,
``positive``, ``negative``, ``hard_negatives``), prepared by the flow:

* ``unfiltered``: the rows the ranking-consistency filter reads (``decontaminated``), before it, with hard negatives
  mined the same way (the same search, ranks 51-100, the same seeded sampling) but without the filter.
  A row the filter kept gets exactly the negatives it has in ``mined``; a row with no usable candidate
  is dropped, as in mining.
* ``filtered``: the ``mined`` rows, i.e. what the export is made of (before any LLM judge).
* ``judged``: the rows after the LLM judge (false negatives replaced, positives relabelled or
  dropped), when the clean run has judge results.

Every variant leaves out the export's held-out rows, so all are evaluated on the same held-out split
the model never saw.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ground.settings import FinetuneSettings
from storage.schemas import ABLATION_RUN_SCHEMA, ABLATION_SCHEMA
from storage.summaries import Evaluation

SOURCES = ("unfiltered", "filtered", "judged")
#: the untrained model's row in the table
BASE = "base"
#: the progress stage: one step per training run
PROGRESS_STAGE = "ablate"


class AblationError(ValueError):
    """A user-facing problem (an unknown variant, too few seeds): the message says what."""


@dataclass(frozen=True)
class Variant:
    name: str
    source: str  # one of SOURCES
    description: str
    hard_negatives: bool = True  # False: in-batch negatives only (finetune.hard_negatives = 0, neg cleared)
    homogeneous_ratio: float | None = None  # None: finetune.homogeneous_ratio as configured


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "unfiltered",
            "unfiltered",
            "deduped rows, no ranking-consistency filter; hard negatives mined the same way (same search and window)",
        ),
        Variant("filtered", "filtered", "the export: rank-filtered rows with their mined hard negatives"),
        Variant("filtered+judge", "judged", "filtered rows after the LLM judge (false negatives replaced)"),
        Variant(
            "no-hard-negatives",
            "filtered",
            "filtered rows, in-batch negatives only (hard_negatives = 0)",
            hard_negatives=False,
        ),
        Variant("homogeneous-0", "filtered", "filtered rows, randomly mixed batches (homogeneous_ratio 0)", True, 0.0),
        Variant("homogeneous-1", "filtered", "filtered rows, one task type per batch (homogeneous_ratio 1)", True, 1.0),
    )
}


def parse_variants(names: Iterable[str] | None) -> list[Variant]:
    """The named variants in table order (None or empty: all); an unknown name is an :class:`AblationError`."""
    wanted = [n.strip() for name in (names or []) for n in str(name).split(",") if n.strip()]
    unknown = [n for n in wanted if n not in VARIANTS]
    if unknown:
        raise AblationError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return [v for name, v in VARIANTS.items() if not wanted or name in wanted]


def seed_list(seeds: int, base_seed: int) -> list[int]:
    """``seeds`` training seeds from ``base_seed`` on: at least 2, so the table has a spread."""
    if seeds < 2:
        raise AblationError(f"--seeds must be at least 2 (a spread needs two runs), not {seeds}")
    return [base_seed + i for i in range(seeds)]


# --- the variants' rows and settings --------------------------------------------------------------
def without_ids(table: pa.Table, ids: set[str]) -> pa.Table:
    """The rows whose ``example_id`` is not in ``ids`` (the held-out split)."""
    if not ids or table.num_rows == 0:
        return table
    keep = pc.invert(pc.is_in(table["example_id"], value_set=pa.array(sorted(ids), type=pa.string())))
    return table.filter(keep)


def without_negatives(table: pa.Table) -> pa.Table:
    """Every row's generated and mined negatives removed: only in-batch negatives remain."""
    out = table
    for name, typ in (("negative", pa.string()), ("hard_negatives", pa.list_(pa.string()))):
        empty = pa.nulls(table.num_rows, typ) if name == "negative" else pa.array([[]] * table.num_rows, typ)
        if name in out.column_names:
            out = out.set_column(out.schema.get_field_index(name), pa.field(name, typ), empty)
    return out


def variant_rows(variant: Variant, sources: Mapping[str, pa.Table], heldout_ids: set[str]) -> pa.Table:
    """The rows ``variant`` trains on: its source without the held-out rows, its negatives as it says."""
    if variant.source not in sources:
        raise AblationError(f"variant {variant.name}: no {variant.source} rows in this clean run")
    table = without_ids(sources[variant.source], heldout_ids)
    return table if variant.hard_negatives else without_negatives(table)


def variant_settings(variant: Variant, cfg: FinetuneSettings, seed: int) -> FinetuneSettings:
    """``cfg`` with the variant's changes and the run's training seed."""
    updates: dict[str, Any] = {"seed": seed}
    if not variant.hard_negatives:
        updates["hard_negatives"] = 0
    if variant.homogeneous_ratio is not None:
        updates["homogeneous_ratio"] = variant.homogeneous_ratio
    return cfg.model_copy(update=updates)


def run_key(variant: Variant, cfg: FinetuneSettings) -> tuple[str, bool, str]:
    """Runs with the same key train on the same rows with the same settings: one result serves them all."""
    return variant.source, variant.hard_negatives, cfg.model_dump_json()


# --- results --------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """One training run (or the base model, seed None) and its scores per dim: ``{dim: (sts, ndcg)}``."""

    variant: str
    seed: int | None
    scores: dict[int, tuple[float | None, float | None]]
    train_rows: int = 0
    negatives: int = 0
    steps: int = 0
    train_seconds: float = 0.0
    same_as: str | None = None


def scores_by_dim(evaluation: Evaluation) -> dict[int, tuple[float | None, float | None]]:
    """``{dim: (mean STS Spearman, held-out nDCG@10)}`` from a ``tasks.training.evaluate.evaluate_model`` result."""
    sts, ndcg = evaluation.sts_mean, evaluation.ndcg
    dims = sorted({int(d) for d in (*sts, *ndcg)}, reverse=True)
    return {d: (_num(sts.get(str(d))), _num(ndcg.get(str(d)))) for d in dims}


def _num(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def runs_table(runs: Sequence[RunResult]) -> pa.Table:
    """One row per run and dim (``ABLATION_RUN_SCHEMA``)."""
    rows = [
        {
            "variant": r.variant,
            "seed": r.seed,
            "dim": dim,
            "sts_spearman": sts,
            "heldout_ndcg10": ndcg,
            "train_rows": r.train_rows,
            "negatives": r.negatives,
            "steps": r.steps,
            "train_seconds": r.train_seconds,
            "same_as": r.same_as,
        }
        for r in runs
        for dim, (sts, ndcg) in r.scores.items()
    ]
    return pa.Table.from_pylist(rows, schema=ABLATION_RUN_SCHEMA)


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    got = [v for v in values if v is not None]
    if not got:
        return None, None
    mean = sum(got) / len(got)
    std = math.sqrt(sum((v - mean) ** 2 for v in got) / (len(got) - 1)) if len(got) > 1 else None
    return mean, std


def summary_table(runs: pa.Table) -> pa.Table:
    """Variant x dim (in run order, dims descending): mean and sample std over seeds (``ABLATION_SCHEMA``)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in runs.to_pylist():
        groups.setdefault((row["variant"], row["dim"]), []).append(row)
    order = list(dict.fromkeys(row["variant"] for row in runs.to_pylist()))
    out = []
    for (variant, dim), rows in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), -kv[0][1])):
        sts_mean, sts_std = _mean_std([r["sts_spearman"] for r in rows])
        ndcg_mean, ndcg_std = _mean_std([r["heldout_ndcg10"] for r in rows])
        out.append(
            {
                "variant": variant,
                "dim": dim,
                "seeds": sum(r["seed"] is not None for r in rows),
                "sts_spearman_mean": sts_mean,
                "sts_spearman_std": sts_std,
                "heldout_ndcg10_mean": ndcg_mean,
                "heldout_ndcg10_std": ndcg_std,
                "train_rows": rows[0]["train_rows"],
                "negatives": rows[0]["negatives"],
                "steps": rows[0]["steps"],
            }
        )
    return pa.Table.from_pylist(out, schema=ABLATION_SCHEMA)


def _cell(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


@dataclass
class TableText:
    """The table as rows of display strings (for markdown, HTML and the flow artifact)."""

    header: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def records(self) -> list[dict[str, str]]:
        return [dict(zip(self.header, row, strict=True)) for row in self.rows]


def display_rows(summary: pa.Table) -> TableText:
    """``variant | dim | seeds | STS Spearman (mean ± std) | held-out nDCG@10 (mean ± std) | rows | negatives``."""
    text = TableText(["variant", "dim", "seeds", "STS Spearman", "held-out nDCG@10", "train rows", "negatives"])
    for r in summary.to_pylist():
        text.rows.append(
            [
                r["variant"],
                str(r["dim"]),
                str(r["seeds"]),
                _cell(r["sts_spearman_mean"], r["sts_spearman_std"]),
                _cell(r["heldout_ndcg10_mean"], r["heldout_ndcg10_std"]),
                str(r["train_rows"]),
                str(r["negatives"]),
            ]
        )
    return text


def to_markdown(summary: pa.Table, title: str, notes: Sequence[str] = ()) -> str:
    """The table as markdown (cells: mean ± sample std over seeds), with notes below it."""
    text = display_rows(summary)
    lines = [f"# {title}", "", "| " + " | ".join(text.header) + " |", "|" + "---|" * len(text.header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in text.rows]
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def to_html(summary: pa.Table, title: str, notes: Sequence[str] = ()) -> str:
    """A self-contained HTML page of the table (every text escaped)."""
    text = display_rows(summary)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in text.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in text.rows)
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><table><tr>{head}</tr>{body}</table><ul>{items}</ul></body></html>\n"
    )
