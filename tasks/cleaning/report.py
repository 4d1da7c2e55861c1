"""The corpus report: one self-contained HTML page about a generation + cleaning run.

``write_report(catalog, clean_id, out_path)`` queries the DuckDB catalog (``storage/catalog.py``)
and writes a page with no external resources: figures are matplotlib PNGs (Agg canvas, no pyplot
global state) embedded as ``data:image/png;base64``. Sections:

1. overview: runs, clean run, rows at each end of the pipeline, models;
2. funnel: rows per stage (generated → valid → deduped → filtered → mined) per task type;
3. drop reasons: which stage dropped how many rows, and why;
4. positive rank: where the positive ranked for its query (ranking-consistency filter);
5. negative scores: hard-negative similarity vs the positive's similarity;
6. lengths: query and positive characters per task type;
7. diversity: unique instructions and personas, top personas, distinct-n of queries and positives;
8. generation: rejects by reason, attempts, tokens, latency, finish reasons.

``clean_id=None`` takes the most recent clean run, or none: a project where only generation ran gets
the generation sections and a note in the others. Every text that comes from data (personas,
instructions, model output, reasons) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import re
from decimal import Decimal
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from matplotlib import __version__ as mpl_version
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ground.settings import ALL_TASK_TYPES
from storage.catalog import Catalog
from storage.location import as_store_path
from storage.shards import atomic_write_bytes

STAGES = ("generated", "valid", "deduped", "filtered", "mined")
SAMPLE_ROWS = 200_000  # rows pulled into Python for a histogram (reservoir sample, repeatable)
_SAMPLE = f" USING SAMPLE reservoir({SAMPLE_ROWS} ROWS) REPEATABLE (7)"  # a constant: DuckDB takes no parameter here
DIVERSITY_SAMPLE = 5_000  # texts per task type for distinct-n (it depends on the sample size)
_PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]

_CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 color:#222;background:#f6f7f9;margin:0;line-height:1.45}
main{max-width:1120px;margin:0 auto;padding:24px 32px 64px}
header{background:#1f2a44;color:#fff;padding:20px 32px}
header h1{margin:0 0 4px;font-size:26px} header p{margin:0;color:#c9d3e8;font-size:14px}
nav{max-width:1120px;margin:0 auto;padding:10px 32px;font-size:14px}
nav a{margin-right:14px;color:#1f4e9c;text-decoration:none} nav a:hover{text-decoration:underline}
section{background:#fff;border:1px solid #e3e6eb;border-radius:8px;padding:8px 24px 20px;margin:18px 0}
h2{font-size:20px;border-bottom:2px solid #e8ebf0;padding-bottom:6px}
h3{font-size:15px;margin:18px 0 6px;color:#333}
table{border-collapse:collapse;margin:8px 0 12px;font-size:13px;max-width:100%}
th,td{border:1px solid #dde1e7;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600} td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc}
td.text{max-width:640px;overflow-wrap:anywhere}
img{max-width:100%;height:auto;display:block;margin:8px 0}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{background:#f3f6fb;border:1px solid #dfe5ef;border-radius:6px;padding:10px 16px;min-width:140px}
.card .v{font-size:22px;font-weight:600} .card .k{font-size:12px;color:#555;text-transform:uppercase}
.empty{color:#777;font-style:italic}
.note{color:#555;font-size:13px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px} .grid>div{min-width:0}
footer{color:#888;font-size:12px;text-align:center;margin-top:24px}
"""


# --- small HTML helpers ------------------------------------------------------------------------------
def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any) -> Any:
    """DuckDB sums arrive as Decimal (HUGEINT); make them int or float."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _fmt(value: Any, digits: int = 2) -> str:
    value = _num(value)
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        return f"{value:,.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], text_cols: Sequence[int] = ()) -> str:
    """An HTML table; every cell is escaped, numbers right-aligned."""
    if not rows:
        return empty("No rows.")
    numeric = [all(isinstance(r[i], (int, float, Decimal)) or r[i] is None for r in rows) and
               any(r[i] is not None for r in rows) for i in range(len(headers))]
    head = "".join(f'<th class="num">{esc(h)}</th>' if numeric[i] else f"<th>{esc(h)}</th>"
                   for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            cls = "num" if numeric[i] else "text" if i in text_cols else ""
            cells.append(f'<td class="{cls}">{esc(_fmt(value))}</td>' if cls else f"<td>{esc(_fmt(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def kv_table(pairs: Sequence[tuple[str, Any]]) -> str:
    """A two-column table without a header: key, value (escaped)."""
    body = "".join(f"<tr><th>{esc(k)}</th><td class=\"text\">{esc(_fmt(v))}</td></tr>" for k, v in pairs)
    return f"<table><tbody>{body}</tbody></table>"


def empty(message: str) -> str:
    return f'<p class="empty">{esc(message)}</p>'


def note(message: str) -> str:
    return f'<p class="note">{esc(message)}</p>'


def figure(width: float = 9.0, height: float = 3.8, ncols: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def img(fig: Figure, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def _style(ax: Any) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)


def _type_order(types: Sequence[str]) -> list[str]:
    known = [t for t in ALL_TASK_TYPES if t in types]
    return known + sorted(t for t in set(types) if t not in ALL_TASK_TYPES)


def _color(task_type: str) -> str:
    order = list(ALL_TASK_TYPES)
    return _PALETTE[order.index(task_type)] if task_type in order else _PALETTE[-1]


# --- data access ----------------------------------------------------------------------------------
class _Data:
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
        self.stage_counts = {stage: self.count(stage) for stage in STAGES[1:]} if self.clean_id else {}

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

    def count(self, stage: str) -> int:
        return self.clean_rows(f"SELECT count(*) AS n FROM {stage} WHERE {{clean}}")[0]["n"]

    @property
    def last_stage(self) -> str | None:
        """The furthest clean stage that has rows."""
        done = [s for s in STAGES[1:] if self.stage_counts.get(s)]
        return done[-1] if done else None


# --- sections ----------------------------------------------------------------------------------------
def _overview(d: _Data) -> str:
    generated = d.run_rows("SELECT count(*) AS n FROM raw WHERE {runs}")[0]["n"]
    rejects = d.run_rows("SELECT count(*) AS n FROM rejects WHERE {runs}")[0]["n"]
    instructions = d.run_rows("SELECT count(*) AS n FROM instructions WHERE {runs}")[0]["n"]
    cards = [("runs", len(d.runs)), ("unique instructions", instructions), ("generated examples", generated),
             ("rejected requests", rejects)]
    for stage in STAGES[1:]:
        if stage in d.stage_counts:
            cards.append((stage, d.stage_counts[stage]))
    out = ['<div class="cards">']
    out += [f'<div class="card"><div class="v">{esc(_fmt(v))}</div><div class="k">{esc(k)}</div></div>'
            for k, v in cards]
    out.append("</div>")
    facts = [("generation runs", ", ".join(d.runs) or "none"),
             ("clean run", d.clean_id or "none yet"),
             ("clean runs in the project", ", ".join(d.clean_ids) or "none")]
    out.append(kv_table(facts))
    models = d.run_rows("SELECT model, task_type, prompt_version, count(*) AS examples FROM raw WHERE {runs} "
                        "GROUP BY ALL")
    if models:
        order = {t: i for i, t in enumerate(_type_order([r["task_type"] for r in models]))}
        models.sort(key=lambda r: (str(r["model"]), order[r["task_type"]], str(r["prompt_version"])))
        out.append("<h3>Models and prompt versions</h3>")
        out.append(table(["model", "task type", "prompt version", "examples"],
                         [(r["model"], r["task_type"], r["prompt_version"], r["examples"]) for r in models],
                         text_cols=(0,)))
    return "".join(out)


def _funnel(d: _Data) -> str:
    per_stage: dict[str, dict[str, int]] = {}
    per_stage["generated"] = {r["t"]: r["n"] for r in d.run_rows(
        "SELECT task_type AS t, count(*) AS n FROM raw WHERE {runs} GROUP BY 1")}
    if d.clean_id is not None:
        for stage in STAGES[1:]:
            per_stage[stage] = {r["t"]: r["n"] for r in d.clean_rows(
                f"SELECT task_type AS t, count(*) AS n FROM {stage} WHERE {{clean}} GROUP BY 1")}
    if not any(per_stage.values()):
        return empty("No generated examples yet.")
    stages = ["generated"] + [s for s in STAGES[1:] if d.stage_counts.get(s)]
    types = _type_order([t for counts in per_stage.values() for t in counts])
    rows = []
    for t in types:
        counts = [per_stage.get(s, {}).get(t, 0) for s in stages]
        kept = round(100.0 * counts[-1] / counts[0], 1) if counts[0] else None
        rows.append([t, *counts, kept])
    totals = [sum(per_stage.get(s, {}).values()) for s in stages]
    rows.append(["total", *totals, 100.0 * totals[-1] / totals[0] if totals[0] else None])
    out = []
    if d.clean_id is None:
        out.append(note("No cleaning run yet: only the generated rows are counted."))
    else:
        missing = [s for s in STAGES[1:] if not d.stage_counts.get(s)]
        if missing:
            out.append(note(f"No rows yet for stage(s): {', '.join(missing)}."))
    if len(stages) > 1:
        out.append(table(["task type", *stages, f"kept % ({stages[-1]} / generated)"], rows))
    else:
        out.append(table(["task type", *stages], [r[:-1] for r in rows]))
    fig, ax = figure(10, 3.8)
    width = 0.8 / len(stages)
    for j, stage in enumerate(stages):
        xs = [i + (j - (len(stages) - 1) / 2) * width for i in range(len(types))]
        ax.bar(xs, [per_stage.get(stage, {}).get(t, 0) for t in types], width, label=stage,
               color=_PALETTE[j % len(_PALETTE)])
    ax.set_xticks(range(len(types)), types)
    ax.set_ylabel("rows")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Rows per stage and task type")
    ax.legend(ncols=len(stages), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    _style(ax)
    out.append(img(fig, "funnel per task type"))
    return "".join(out)


def _drops(d: _Data) -> str:
    if d.clean_id is None:
        return empty("No cleaning run yet, so nothing was dropped.")
    rows = d.clean_rows("SELECT stage, reason, count(*) AS n, any_value(detail) AS detail FROM dropped "
                        "WHERE {clean} GROUP BY stage, reason ORDER BY n DESC")
    if not rows:
        return empty("No dropped rows recorded for this clean run.")
    by_type = d.clean_rows("SELECT stage, task_type, count(*) AS n FROM dropped WHERE {clean} GROUP BY ALL")
    out = []
    fig, ax = figure(10, max(2.2, 0.34 * len(rows) + 1.0))
    labels = [f"{r['stage']}: {r['reason']}" for r in rows][::-1]
    ax.barh(labels, [r["n"] for r in rows][::-1], color=_PALETTE[3])
    ax.set_xlabel("dropped rows")
    ax.set_title("Drop reasons")
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="x", alpha=0.3)
    out.append(img(fig, "drop reasons"))
    out.append(table(["stage", "reason", "rows", "example detail"],
                     [(r["stage"], r["reason"], r["n"], r["detail"]) for r in rows], text_cols=(3,)))
    if by_type:
        stages = sorted({r["stage"] for r in by_type})
        types = _type_order([r["task_type"] for r in by_type if r["task_type"]])
        cell = {(r["stage"], r["task_type"]): r["n"] for r in by_type}
        out.append("<h3>Dropped rows per stage and task type</h3>")
        out.append(table(["stage", *types], [[s, *[cell.get((s, t), 0) for t in types]] for s in stages]))
    return "".join(out)


def _ranks(d: _Data) -> str:
    if not d.stage_counts.get("filtered"):
        return empty("No ranking-consistency filter output yet.")
    values = d.clean_rows(
        "SELECT task_type, positive_rank AS r FROM (SELECT task_type, positive_rank FROM filtered "
        "WHERE {clean} AND positive_rank IS NOT NULL) " + _SAMPLE)
    summary = d.clean_rows(
        "SELECT task_type, count(*) AS n, min(positive_rank) AS lo, median(positive_rank) AS med, "
        "avg(positive_rank) AS mean, quantile_cont(positive_rank, 0.9) AS p90, max(positive_rank) AS hi, "
        "avg(positive_score) AS score FROM filtered WHERE {clean} GROUP BY 1")
    out = []
    ranks = [r["r"] for r in values]
    if ranks:
        fig, ax = figure(10, 3.4)
        lo, top = min(ranks), max(ranks)
        if top - lo <= 100:  # one bar per rank
            ax.hist(ranks, bins=range(lo, top + 2), color=_PALETTE[0], align="left", rwidth=0.9)
        else:
            ax.hist(ranks, bins=50, color=_PALETTE[0])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("rank of the positive among all documents for its query")
        ax.set_ylabel("rows")
        ax.set_title("Positive rank (rows kept by the filter)")
        _style(ax)
        out.append(img(fig, "positive rank histogram"))
    order = {t: i for i, t in enumerate(_type_order([r["task_type"] for r in summary]))}
    summary.sort(key=lambda r: order[r["task_type"]])
    out.append(table(["task type", "rows", "min", "median", "mean", "p90", "max", "mean positive score"],
                     [(r["task_type"], r["n"], r["lo"], float(r["med"]) if r["med"] is not None else None,
                       r["mean"], r["p90"], r["hi"], r["score"]) for r in summary]))
    return "".join(out)


def _negatives(d: _Data) -> str:
    if not d.stage_counts.get("mined"):
        return empty("No hard-negative mining output yet.")
    pos = [r["s"] for r in d.clean_rows(
        "SELECT positive_score AS s FROM (SELECT positive_score FROM mined WHERE {clean} AND positive_score "
        "IS NOT NULL) " + _SAMPLE)]
    neg = [r["s"] for r in d.clean_rows(
        "SELECT s FROM (SELECT unnest(hard_negative_scores) AS s FROM mined WHERE {clean}) WHERE s IS NOT NULL "
        "" + _SAMPLE)]
    summary = d.clean_rows(
        "SELECT task_type, count(*) AS n, avg(len(coalesce(hard_negatives, []))) AS k, "
        "count(*) FILTER (WHERE len(coalesce(hard_negatives, [])) = 0) AS none, avg(positive_score) AS pos, "
        "avg(list_avg(hard_negative_scores)) AS neg, avg(positive_score - list_max(hard_negative_scores)) AS gap "
        "FROM mined WHERE {clean} GROUP BY 1")
    out = []
    if pos or neg:
        fig, ax = figure(10, 3.4)
        lo = min(pos + neg)
        hi = max(pos + neg)
        bins = [lo + (hi - lo) * i / 40 for i in range(41)] if hi > lo else 10
        if neg:
            ax.hist(neg, bins=bins, alpha=0.6, density=True, label=f"hard negatives (n={len(neg):,})",
                    color=_PALETTE[3])
        if pos:
            ax.hist(pos, bins=bins, alpha=0.6, density=True, label=f"positives (n={len(pos):,})", color=_PALETTE[2])
        ax.set_xlabel("similarity to the query")
        ax.set_ylabel("density")
        ax.set_title("Hard-negative scores vs positive scores")
        ax.legend(frameon=False)
        _style(ax)
        out.append(img(fig, "negative score distribution"))
    order = {t: i for i, t in enumerate(_type_order([r["task_type"] for r in summary]))}
    summary.sort(key=lambda r: order[r["task_type"]])
    out.append(table(["task type", "rows", "hard negatives / row", "rows without", "mean positive score",
                      "mean negative score", "mean gap (positive − best negative)"],
                     [(r["task_type"], r["n"], r["k"], r["none"], r["pos"], r["neg"], r["gap"]) for r in summary]))
    return "".join(out)


def _lengths(d: _Data) -> str:
    source = d.last_stage or "raw"
    if source == "raw":
        values = d.run_rows(
            "SELECT task_type, length(query) AS q, length(positive) AS p FROM raw WHERE {runs} "
            "QUALIFY row_number() OVER (PARTITION BY task_type ORDER BY hash(example_id)) <= $n",
            {"n": SAMPLE_ROWS // 6})
    else:
        values = d.clean_rows(
            f"SELECT task_type, length(query) AS q, length(positive) AS p FROM {source} WHERE {{clean}} "
            "QUALIFY row_number() OVER (PARTITION BY task_type ORDER BY hash(example_id)) <= $n",
            {"n": SAMPLE_ROWS // 6})
    if not values:
        return empty("No examples yet.")
    types = _type_order([r["task_type"] for r in values])
    out = [note(f"Characters of the query (without instruction) and of the positive, in the {source} table.")]
    fig, axes = figure(11, 0.45 * len(types) + 1.6, ncols=2)
    rows = []
    for ax, key, title in ((axes[0], "q", "query characters"), (axes[1], "p", "positive characters")):
        data = [[r[key] or 0 for r in values if r["task_type"] == t] or [0] for t in types]
        parts = ax.boxplot(data, showfliers=False, patch_artist=True, medianprops={"color": "#222"}, **_HBOX)
        ax.set_yticks(range(1, len(types) + 1), types)
        for patch, t in zip(parts["boxes"], types):
            patch.set_facecolor(_color(t))
            patch.set_alpha(0.7)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="x", alpha=0.3)
    for t in types:
        q = sorted(r["q"] or 0 for r in values if r["task_type"] == t)
        p = sorted(r["p"] or 0 for r in values if r["task_type"] == t)
        rows.append([t, len(q), _median(q), q[int(0.9 * (len(q) - 1))], _median(p), p[int(0.9 * (len(p) - 1))]])
    out.append(img(fig, "length distributions"))
    out.append(table(["task type", "rows", "query median", "query p90", "positive median", "positive p90"], rows))
    return "".join(out)


def _median(values: list[int]) -> float:
    n = len(values)
    return float(values[n // 2]) if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2.0


# horizontal boxes: ``orientation`` since matplotlib 3.10, ``vert`` before (deprecated after)
_MPL = tuple(int(x) for x in re.findall(r"\d+", mpl_version)[:2])
_HBOX: dict[str, Any] = {"orientation": "horizontal"} if _MPL >= (3, 10) else {"vert": False}

_TOKEN = re.compile(r"\w+", re.UNICODE)


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Unique n-grams / all n-grams over the texts (lowercased word tokens); distinct-1 is type/token ratio."""
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in texts:
        tokens = _TOKEN.findall((text or "").lower())
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else None


def _diversity(d: _Data) -> str:
    out = []
    inst = d.run_rows("SELECT task_type, count(*) AS n, count(DISTINCT lower(trim(instruction))) AS u, "
                      "count(DISTINCT persona_id) AS p FROM instructions WHERE {runs} GROUP BY 1")
    source = d.last_stage or "raw"
    if source == "raw":
        used = d.run_rows("SELECT task_type, count(*) AS n, count(DISTINCT instruction) AS i, "
                          "count(DISTINCT persona_id) AS p FROM raw WHERE {runs} GROUP BY 1")
        texts = d.run_rows("SELECT task_type, query, positive FROM raw WHERE {runs} QUALIFY row_number() "
                           "OVER (PARTITION BY task_type ORDER BY hash(example_id)) <= $n", {"n": DIVERSITY_SAMPLE})
    else:
        used = d.clean_rows(f"SELECT task_type, count(*) AS n, count(DISTINCT instruction) AS i, "
                            f"count(DISTINCT persona_id) AS p FROM {source} WHERE {{clean}} GROUP BY 1")
        texts = d.clean_rows(f"SELECT task_type, query, positive FROM {source} WHERE {{clean}} QUALIFY row_number() "
                             "OVER (PARTITION BY task_type ORDER BY hash(example_id)) <= $n", {"n": DIVERSITY_SAMPLE})
    if not inst and not used:
        return empty("No instructions or examples yet.")
    inst_by = {r["task_type"]: r for r in inst}
    used_by = {r["task_type"]: r for r in used}
    types = _type_order(list(inst_by) + list(used_by))
    rows = []
    for t in types:
        q = [r["query"] for r in texts if r["task_type"] == t]
        p = [r["positive"] for r in texts if r["task_type"] == t]
        i, u = inst_by.get(t, {}), used_by.get(t, {})
        rows.append([t, i.get("n"), i.get("p"), u.get("n"), u.get("i"), u.get("p"),
                     distinct_n(q, 1), distinct_n(q, 2), distinct_n(p, 1), distinct_n(p, 2)])
    out.append(note(f"Instructions: the unique-instruction table of the runs. Examples: the {source} table. "
                    f"distinct-n = unique n-grams / n-grams over up to {DIVERSITY_SAMPLE:,} texts per task type "
                    "(distinct-1 is the type/token ratio; it falls as the sample grows)."))
    out.append(table(["task type", "unique instructions", "personas (brainstorm)", "examples",
                      "instructions used", "personas used", "query distinct-1", "query distinct-2",
                      "positive distinct-1", "positive distinct-2"], rows))
    totals = d.run_rows("SELECT count(DISTINCT instruction) AS i, count(DISTINCT persona_id) AS p "
                        "FROM instructions WHERE {runs}")[0]
    out.append(note(f"All task types: {totals['i']:,} unique instructions brainstormed by {totals['p']:,} "
                    "distinct personas."))
    top = d.run_rows("SELECT persona, count(*) AS n, count(DISTINCT task_type) AS types FROM instructions "
                     "WHERE {runs} AND persona IS NOT NULL GROUP BY persona ORDER BY n DESC, persona LIMIT 10")
    if top:
        out.append("<h3>Most productive personas (instructions brainstormed)</h3>")
        out.append(table(["persona", "instructions", "task types"],
                         [(r["persona"], r["n"], r["types"]) for r in top], text_cols=(0,)))
    top_inst = (d.run_rows if source == "raw" else d.clean_rows)(
        f"SELECT instruction, task_type, count(*) AS n FROM {source} WHERE "
        f"{'{runs}' if source == 'raw' else '{clean}'} GROUP BY ALL HAVING count(*) > 1 "
        "ORDER BY n DESC, instruction LIMIT 8")
    if top_inst:
        out.append("<h3>Most repeated instructions in the examples</h3>")
        out.append(table(["instruction", "task type", "examples"],
                         [(r["instruction"], r["task_type"], r["n"]) for r in top_inst], text_cols=(0,)))
    return "".join(out)


def _generation(d: _Data) -> str:
    out = []
    stats = d.run_rows(
        "SELECT task_type, count(*) AS n, avg(attempts) AS att, sum(prompt_tokens)::BIGINT AS pt, "
        "sum(completion_tokens)::BIGINT AS ct, avg(completion_tokens) AS act, avg(latency_s) AS lat, "
        "quantile_cont(latency_s, 0.5) AS p50, quantile_cont(latency_s, 0.95) AS p95, "
        "count(*) FILTER (WHERE finish_reason IS DISTINCT FROM 'stop') AS notstop "
        "FROM raw WHERE {runs} GROUP BY 1")
    rejects = d.run_rows("SELECT stage, reason, count(*) AS n FROM rejects WHERE {runs} GROUP BY ALL "
                         "ORDER BY n DESC")
    brainstorm = d.run_rows("SELECT count(*) AS n, sum(prompt_tokens)::BIGINT AS pt, "
                            "sum(completion_tokens)::BIGINT AS ct, "
                            "avg(latency_s) AS lat FROM brainstorm WHERE {runs}")[0]
    if not stats and not rejects and not brainstorm["n"]:
        return empty("No generation data yet.")
    if stats:
        order = {t: i for i, t in enumerate(_type_order([r["task_type"] for r in stats]))}
        stats.sort(key=lambda r: order[r["task_type"]])
        out.append("<h3>Examples</h3>")
        out.append(table(
            ["task type", "examples", "mean attempts", "prompt tokens", "completion tokens",
             "completion tokens / example", "latency mean s", "latency p50 s", "latency p95 s", "finish ≠ stop"],
            [(r["task_type"], r["n"], r["att"], r["pt"], r["ct"], r["act"], r["lat"], r["p50"], r["p95"],
              r["notstop"]) for r in stats]))
        latencies = d.run_rows(
            "SELECT task_type, latency_s AS l FROM (SELECT task_type, latency_s FROM raw WHERE {runs} "
            "AND latency_s IS NOT NULL) " + _SAMPLE)
        if latencies:
            fig, axes = figure(11, 3.4, ncols=2)
            types = _type_order([r["task_type"] for r in latencies])
            axes[0].hist([[r["l"] for r in latencies if r["task_type"] == t] for t in types], bins=30, stacked=True,
                         label=types, color=[_color(t) for t in types])
            axes[0].set_xlabel("request latency (s)")
            axes[0].set_ylabel("examples")
            axes[0].set_title("Latency per example")
            axes[0].legend(fontsize=8, frameon=False, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.18))
            axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
            _style(axes[0])
            axes[1].bar([r["task_type"] for r in stats], [r["act"] or 0 for r in stats],
                        color=[_color(r["task_type"]) for r in stats])
            axes[1].set_title("Completion tokens per example")
            axes[1].tick_params(axis="x", labelrotation=20)
            _style(axes[1])
            out.append(img(fig, "generation latency and tokens"))
    if brainstorm["n"]:
        out.append("<h3>Brainstorm</h3>")
        out.append(table(["brainstormed instructions", "prompt tokens", "completion tokens", "mean latency s"],
                         [(brainstorm["n"], brainstorm["pt"], brainstorm["ct"], brainstorm["lat"])]))
    out.append("<h3>Rejected requests</h3>")
    if not rejects:
        out.append(empty("No rejected requests."))
    else:
        fig, ax = figure(10, max(2.0, 0.34 * len(rejects) + 1.0))
        ax.barh([f"{r['stage']}: {r['reason']}" for r in rejects][::-1], [r["n"] for r in rejects][::-1],
                color=_PALETTE[1])
        ax.set_xlabel("requests")
        ax.set_title("Reject reasons")
        ax.spines[["top", "right"]].set_visible(False)
        out.append(img(fig, "reject reasons"))
        out.append(table(["stage", "reason", "requests"], [(r["stage"], r["reason"], r["n"]) for r in rejects]))
        samples = d.run_rows("SELECT stage, task_type, reason, left(raw_text, 240) AS text FROM rejects "
                             "WHERE {runs} ORDER BY hash(example_id) LIMIT 5")
        out.append("<h3>Sample rejects</h3>")
        out.append(table(["stage", "task type", "reason", "model output (first 240 chars)"],
                         [(r["stage"], r["task_type"], r["reason"], r["text"]) for r in samples], text_cols=(3,)))
    finish = d.run_rows("SELECT finish_reason, count(*) AS n FROM raw WHERE {runs} GROUP BY 1 ORDER BY n DESC")
    if finish:
        out.append("<h3>Finish reasons</h3>")
        out.append(table(["finish reason", "examples"], [(r["finish_reason"], r["n"]) for r in finish]))
    return "".join(out)


SECTIONS: list[tuple[str, str, Callable[[_Data], str]]] = [
    ("overview", "Overview", _overview),
    ("funnel", "Funnel per stage and task type", _funnel),
    ("drops", "Drop reasons", _drops),
    ("ranks", "Positive rank", _ranks),
    ("negatives", "Negative scores", _negatives),
    ("lengths", "Length distributions", _lengths),
    ("diversity", "Instruction and persona diversity", _diversity),
    ("generation", "Generation statistics", _generation),
]


def render_report(catalog: Catalog, clean_id: str | None = None) -> str:
    """The report page as a string."""
    with catalog.session():  # one read-only connection for all the queries
        d = _Data(catalog, clean_id)
        body = [f'<section id="{anchor}"><h2>{esc(title)}</h2>{build(d)}</section>'
                for anchor, title, build in SECTIONS]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    subtitle = f"clean run {d.clean_id}" if d.clean_id else "generation only (no clean run yet)"
    nav = "".join(f'<a href="#{anchor}">{esc(title)}</a>' for anchor, title, _ in SECTIONS)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>embed-factory report: {esc(subtitle)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>embed-factory corpus report</h1><p>{esc(subtitle)} · data {esc(catalog.data_dir)} · "
        f"generated at {esc(now)}</p></header><nav>{nav}</nav><main>{''.join(body)}"
        f"<footer>embed-factory · generated at {esc(now)}</footer></main></body></html>\n"
    )


def write_report(catalog: Catalog, clean_id: str | None, out_path: Path) -> Path:
    """Write the self-contained HTML report to ``out_path`` (atomically) and return the path."""
    out_path = as_store_path(out_path)  # a local file, or an S3 key next to the clean run's tables
    atomic_write_bytes(out_path, render_report(catalog, clean_id).encode("utf-8"))
    return out_path
