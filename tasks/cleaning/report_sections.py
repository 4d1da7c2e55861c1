"""The pipeline sections of the corpus report (``report.py``), each a function ``ReportData -> HTML``:
the queries it runs on the catalog and the table and figure it draws from them. The diversity and
generation sections live in ``report_sections_text.py``."""

from __future__ import annotations

from matplotlib.ticker import MaxNLocator

from storage.funnel import GENERATED, drop_reasons
from tasks.cleaning.report_data import SAMPLE_CLAUSE, SAMPLE_ROWS, ReportData
from tasks.cleaning.report_html import (
    HBOX,
    PALETTE,
    empty,
    esc,
    figure,
    fmt,
    img,
    kv_table,
    note,
    style_axes,
    table,
    type_color,
    type_order,
)


def overview_section(d: ReportData) -> str:
    generated = d.run_rows("SELECT count(*) AS n FROM raw WHERE {runs}")[0]["n"]
    rejects = d.run_rows("SELECT count(*) AS n FROM rejects WHERE {runs}")[0]["n"]
    instructions = d.run_rows("SELECT count(*) AS n FROM instructions WHERE {runs}")[0]["n"]
    cards = [
        ("runs", len(d.runs)),
        ("unique instructions", instructions),
        ("generated examples", generated),
        ("rejected requests", rejects),
    ]
    cards += list(d.stage_counts.items())
    out = ['<div class="cards">']
    out += [
        f'<div class="card"><div class="v">{esc(fmt(v))}</div><div class="k">{esc(k)}</div></div>' for k, v in cards
    ]
    out.append("</div>")
    facts = [
        ("generation runs", ", ".join(d.runs) or "none"),
        ("clean run", d.clean_id or "none yet"),
        ("clean runs in the project", ", ".join(d.clean_ids) or "none"),
    ]
    out.append(kv_table(facts))
    models = d.run_rows(
        "SELECT model, task_type, prompt_version, count(*) AS examples FROM raw WHERE {runs} GROUP BY ALL"
    )
    if models:
        order = {t: i for i, t in enumerate(type_order([r["task_type"] for r in models]))}
        models.sort(key=lambda r: (str(r["model"]), order[r["task_type"]], str(r["prompt_version"])))
        out.append("<h3>Models and prompt versions</h3>")
        out.append(
            table(
                ["model", "task type", "prompt version", "examples"],
                [(r["model"], r["task_type"], r["prompt_version"], r["examples"]) for r in models],
                text_cols=(0,),
            )
        )
    return "".join(out)


def funnel_section(d: ReportData) -> str:
    per_stage = d.funnel
    if not any(per_stage.values()):
        return empty("No generated examples yet.")
    stages = [GENERATED] + [s for s, n in d.stage_counts.items() if n]
    types = type_order([t for counts in per_stage.values() for t in counts])
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
        missing = [s for s, n in d.stage_counts.items() if not n]
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
        ax.bar(
            xs, [per_stage.get(stage, {}).get(t, 0) for t in types], width, label=stage, color=PALETTE[j % len(PALETTE)]
        )
    ax.set_xticks(range(len(types)), types)
    ax.set_ylabel("rows")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Rows per stage and task type")
    ax.legend(ncols=len(stages), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    style_axes(ax)
    out.append(img(fig, "funnel per task type"))
    return "".join(out)


def drops_section(d: ReportData) -> str:
    if d.clean_id is None:
        return empty("No cleaning run yet, so nothing was dropped.")
    rows = drop_reasons(d.catalog, d.clean_id)  # the UI artifact's table too
    if not rows:
        return empty("No dropped rows recorded for this clean run.")
    by_type = d.clean_rows("SELECT stage, task_type, count(*) AS n FROM dropped WHERE {clean} GROUP BY ALL")
    out = []
    fig, ax = figure(10, max(2.2, 0.34 * len(rows) + 1.0))
    labels = [f"{r['stage']}: {r['reason']}" for r in rows][::-1]
    ax.barh(labels, [r["n"] for r in rows][::-1], color=PALETTE[3])
    ax.set_xlabel("dropped rows")
    ax.set_title("Drop reasons")
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="x", alpha=0.3)
    out.append(img(fig, "drop reasons"))
    out.append(
        table(
            ["stage", "reason", "rows", "example detail"],
            [(r["stage"], r["reason"], r["n"], r["detail"]) for r in rows],
            text_cols=(3,),
        )
    )
    if by_type:
        stages = sorted({r["stage"] for r in by_type})
        types = type_order([r["task_type"] for r in by_type if r["task_type"]])
        cell = {(r["stage"], r["task_type"]): r["n"] for r in by_type}
        out.append("<h3>Dropped rows per stage and task type</h3>")
        out.append(table(["stage", *types], [[s, *[cell.get((s, t), 0) for t in types]] for s in stages]))
    return "".join(out)


def ranks_section(d: ReportData) -> str:
    if not d.stage_counts.get("filtered"):
        return empty("No ranking-consistency filter output yet.")
    values = d.clean_rows(
        "SELECT task_type, positive_rank AS r FROM (SELECT task_type, positive_rank FROM filtered "
        "WHERE {clean} AND positive_rank IS NOT NULL) " + SAMPLE_CLAUSE
    )
    summary = d.clean_rows(
        "SELECT task_type, count(*) AS n, min(positive_rank) AS lo, median(positive_rank) AS med, "
        "avg(positive_rank) AS mean, quantile_cont(positive_rank, 0.9) AS p90, max(positive_rank) AS hi, "
        "avg(positive_score) AS score FROM filtered WHERE {clean} GROUP BY 1"
    )
    out = []
    ranks = [r["r"] for r in values]
    if ranks:
        fig, ax = figure(10, 3.4)
        lo, top = min(ranks), max(ranks)
        if top - lo <= 100:  # one bar per rank
            ax.hist(ranks, bins=range(lo, top + 2), color=PALETTE[0], align="left", rwidth=0.9)
        else:
            ax.hist(ranks, bins=50, color=PALETTE[0])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("rank of the positive among all documents for its query")
        ax.set_ylabel("rows")
        ax.set_title("Positive rank (rows kept by the filter)")
        style_axes(ax)
        out.append(img(fig, "positive rank histogram"))
    order = {t: i for i, t in enumerate(type_order([r["task_type"] for r in summary]))}
    summary.sort(key=lambda r: order[r["task_type"]])
    out.append(
        table(
            ["task type", "rows", "min", "median", "mean", "p90", "max", "mean positive score"],
            [
                (
                    r["task_type"],
                    r["n"],
                    r["lo"],
                    float(r["med"]) if r["med"] is not None else None,
                    r["mean"],
                    r["p90"],
                    r["hi"],
                    r["score"],
                )
                for r in summary
            ],
        )
    )
    return "".join(out)


def negatives_section(d: ReportData) -> str:
    if not d.stage_counts.get("mined"):
        return empty("No hard-negative mining output yet.")
    pos = [
        r["s"]
        for r in d.clean_rows(
            "SELECT positive_score AS s FROM (SELECT positive_score FROM mined WHERE {clean} AND positive_score "
            "IS NOT NULL) " + SAMPLE_CLAUSE
        )
    ]
    neg = [
        r["s"]
        for r in d.clean_rows(
            "SELECT s FROM (SELECT unnest(hard_negative_scores) AS s FROM mined WHERE {clean}) WHERE s IS NOT NULL "
            "" + SAMPLE_CLAUSE
        )
    ]
    summary = d.clean_rows(
        "SELECT task_type, count(*) AS n, avg(len(coalesce(hard_negatives, []))) AS k, "
        "count(*) FILTER (WHERE len(coalesce(hard_negatives, [])) = 0) AS none, avg(positive_score) AS pos, "
        "avg(list_avg(hard_negative_scores)) AS neg, avg(positive_score - list_max(hard_negative_scores)) AS gap "
        "FROM mined WHERE {clean} GROUP BY 1"
    )
    out = []
    if pos or neg:
        fig, ax = figure(10, 3.4)
        lo = min(pos + neg)
        hi = max(pos + neg)
        bins = [lo + (hi - lo) * i / 40 for i in range(41)] if hi > lo else 10
        if neg:
            ax.hist(neg, bins=bins, alpha=0.6, density=True, label=f"hard negatives (n={len(neg):,})", color=PALETTE[3])
        if pos:
            ax.hist(pos, bins=bins, alpha=0.6, density=True, label=f"positives (n={len(pos):,})", color=PALETTE[2])
        ax.set_xlabel("similarity to the query")
        ax.set_ylabel("density")
        ax.set_title("Hard-negative scores vs positive scores")
        ax.legend(frameon=False)
        style_axes(ax)
        out.append(img(fig, "negative score distribution"))
    order = {t: i for i, t in enumerate(type_order([r["task_type"] for r in summary]))}
    summary.sort(key=lambda r: order[r["task_type"]])
    out.append(
        table(
            [
                "task type",
                "rows",
                "hard negatives / row",
                "rows without",
                "mean positive score",
                "mean negative score",
                "mean gap (positive − best negative)",
            ],
            [(r["task_type"], r["n"], r["k"], r["none"], r["pos"], r["neg"], r["gap"]) for r in summary],
        )
    )
    return "".join(out)


def lengths_section(d: ReportData) -> str:
    source = d.last_stage or "raw"
    if source == "raw":
        values = d.run_rows(
            "SELECT task_type, length(query) AS q, length(positive) AS p FROM raw WHERE {runs} "
            "QUALIFY row_number() OVER (PARTITION BY task_type ORDER BY hash(example_id)) <= $n",
            {"n": SAMPLE_ROWS // 6},
        )
    else:
        values = d.clean_rows(
            f"SELECT task_type, length(query) AS q, length(positive) AS p FROM {source} WHERE {{clean}} "
            "QUALIFY row_number() OVER (PARTITION BY task_type ORDER BY hash(example_id)) <= $n",
            {"n": SAMPLE_ROWS // 6},
        )
    if not values:
        return empty("No examples yet.")
    types = type_order([r["task_type"] for r in values])
    out = [note(f"Characters of the query (without instruction) and of the positive, in the {source} table.")]
    fig, axes = figure(11, 0.45 * len(types) + 1.6, ncols=2)
    rows = []
    for ax, key, title in ((axes[0], "q", "query characters"), (axes[1], "p", "positive characters")):
        data = [[r[key] or 0 for r in values if r["task_type"] == t] or [0] for t in types]
        parts = ax.boxplot(data, showfliers=False, patch_artist=True, medianprops={"color": "#222"}, **HBOX)
        ax.set_yticks(range(1, len(types) + 1), types)
        for patch, t in zip(parts["boxes"], types, strict=True):
            patch.set_facecolor(type_color(t))
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
