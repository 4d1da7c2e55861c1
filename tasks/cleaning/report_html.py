"""The HTML and figure pieces of the corpus report (``report.py``): escaping, tables, notes, matplotlib
figures embedded as base64 PNGs, the page's CSS and the colours of the task types. No data access here."""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from matplotlib import __version__ as mpl_version
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ground.task_types import ALL_TASK_TYPES

PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]

CSS = """
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


def as_number(value: Any) -> Any:
    """DuckDB sums arrive as Decimal (HUGEINT); make them int or float."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def fmt(value: Any, digits: int = 2) -> str:
    value = as_number(value)
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
    numeric = [
        all(isinstance(r[i], (int, float, Decimal)) or r[i] is None for r in rows)
        and any(r[i] is not None for r in rows)
        for i in range(len(headers))
    ]
    head = "".join(
        f'<th class="num">{esc(h)}</th>' if numeric[i] else f"<th>{esc(h)}</th>" for i, h in enumerate(headers)
    )
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            cls = "num" if numeric[i] else "text" if i in text_cols else ""
            cells.append(f'<td class="{cls}">{esc(fmt(value))}</td>' if cls else f"<td>{esc(fmt(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def kv_table(pairs: Sequence[tuple[str, Any]]) -> str:
    """A two-column table without a header: key, value (escaped)."""
    body = "".join(f'<tr><th>{esc(k)}</th><td class="text">{esc(fmt(v))}</td></tr>' for k, v in pairs)
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


def style_axes(ax: Any) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)


def type_order(types: Sequence[str]) -> list[str]:
    known = [t for t in ALL_TASK_TYPES if t in types]
    return known + sorted(t for t in set(types) if t not in ALL_TASK_TYPES)


def type_color(task_type: str) -> str:
    order = list(ALL_TASK_TYPES)
    return PALETTE[order.index(task_type)] if task_type in order else PALETTE[-1]


# horizontal boxes: ``orientation`` since matplotlib 3.10, ``vert`` before (deprecated after)
MPL_VERSION = tuple(int(x) for x in re.findall(r"\d+", mpl_version)[:2])
HBOX: dict[str, Any] = {"orientation": "horizontal"} if MPL_VERSION >= (3, 10) else {"vert": False}
