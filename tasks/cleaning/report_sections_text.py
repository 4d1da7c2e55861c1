"""The text and generation sections of the corpus report (``report.py``): instruction and persona
diversity with distinct-n of queries and positives, and generation statistics (rejects, attempts,
tokens, latency, finish reasons). Each is a function ``ReportData -> HTML``."""

from __future__ import annotations

import re
from collections.abc import Sequence

from matplotlib.ticker import MaxNLocator

from tasks.cleaning.report_data import DIVERSITY_SAMPLE, SAMPLE_CLAUSE, ReportData
from tasks.cleaning.report_html import (
    PALETTE,
    empty,
    figure,
    img,
    note,
    style_axes,
    table,
    type_color,
    type_order,
)

_TOKEN = re.compile(r"\w+", re.UNICODE)


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Unique n-grams / all n-grams over the texts (lowercased word tokens); distinct-1 is type/token ratio."""
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in texts:
        tokens = _TOKEN.findall((text or "").lower())
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else None


def diversity_section(d: ReportData) -> str:
    out = []
    inst = d.run_rows(
        "SELECT task_type, count(*) AS n, count(DISTINCT lower(trim(instruction))) AS u, "
        "count(DISTINCT persona_id) AS p FROM instructions WHERE {runs} GROUP BY 1"
    )
    source = d.last_stage or "raw"
    if source == "raw":
        used = d.run_rows(
            "SELECT task_type, count(*) AS n, count(DISTINCT instruction) AS i, "
            "count(DISTINCT persona_id) AS p FROM raw WHERE {runs} GROUP BY 1"
        )
        texts = d.run_rows(
            "SELECT task_type, query, positive FROM raw WHERE {runs} QUALIFY row_number() "
            "OVER (PARTITION BY task_type ORDER BY hash(example_id)) <= $n",
            {"n": DIVERSITY_SAMPLE},
        )
    else:
        used = d.clean_rows(
            f"SELECT task_type, count(*) AS n, count(DISTINCT instruction) AS i, "
            f"count(DISTINCT persona_id) AS p FROM {source} WHERE {{clean}} GROUP BY 1"
        )
        texts = d.clean_rows(
            f"SELECT task_type, query, positive FROM {source} WHERE {{clean}} QUALIFY row_number() "
            "OVER (PARTITION BY task_type ORDER BY hash(example_id)) <= $n",
            {"n": DIVERSITY_SAMPLE},
        )
    if not inst and not used:
        return empty("No instructions or examples yet.")
    inst_by = {r["task_type"]: r for r in inst}
    used_by = {r["task_type"]: r for r in used}
    types = type_order(list(inst_by) + list(used_by))
    rows = []
    for t in types:
        q = [r["query"] for r in texts if r["task_type"] == t]
        p = [r["positive"] for r in texts if r["task_type"] == t]
        i, u = inst_by.get(t, {}), used_by.get(t, {})
        rows.append(
            [
                t,
                i.get("n"),
                i.get("p"),
                u.get("n"),
                u.get("i"),
                u.get("p"),
                distinct_n(q, 1),
                distinct_n(q, 2),
                distinct_n(p, 1),
                distinct_n(p, 2),
            ]
        )
    out.append(
        note(
            f"Instructions: the unique-instruction table of the runs. Examples: the {source} table. "
            f"distinct-n = unique n-grams / n-grams over up to {DIVERSITY_SAMPLE:,} texts per task type "
            "(distinct-1 is the type/token ratio; it falls as the sample grows)."
        )
    )
    out.append(
        table(
            [
                "task type",
                "unique instructions",
                "personas (brainstorm)",
                "examples",
                "instructions used",
                "personas used",
                "query distinct-1",
                "query distinct-2",
                "positive distinct-1",
                "positive distinct-2",
            ],
            rows,
        )
    )
    totals = d.run_rows(
        "SELECT count(DISTINCT instruction) AS i, count(DISTINCT persona_id) AS p FROM instructions WHERE {runs}"
    )[0]
    out.append(
        note(f"All task types: {totals['i']:,} unique instructions brainstormed by {totals['p']:,} distinct personas.")
    )
    top = d.run_rows(
        "SELECT persona, count(*) AS n, count(DISTINCT task_type) AS types FROM instructions "
        "WHERE {runs} AND persona IS NOT NULL GROUP BY persona ORDER BY n DESC, persona LIMIT 10"
    )
    if top:
        out.append("<h3>Most productive personas (instructions brainstormed)</h3>")
        out.append(
            table(
                ["persona", "instructions", "task types"],
                [(r["persona"], r["n"], r["types"]) for r in top],
                text_cols=(0,),
            )
        )
    top_inst = (d.run_rows if source == "raw" else d.clean_rows)(
        f"SELECT instruction, task_type, count(*) AS n FROM {source} WHERE "
        f"{'{runs}' if source == 'raw' else '{clean}'} GROUP BY ALL HAVING count(*) > 1 "
        "ORDER BY n DESC, instruction LIMIT 8"
    )
    if top_inst:
        out.append("<h3>Most repeated instructions in the examples</h3>")
        out.append(
            table(
                ["instruction", "task type", "examples"],
                [(r["instruction"], r["task_type"], r["n"]) for r in top_inst],
                text_cols=(0,),
            )
        )
    return "".join(out)


def generation_section(d: ReportData) -> str:
    out = []
    stats = d.run_rows(
        "SELECT task_type, count(*) AS n, avg(attempts) AS att, sum(prompt_tokens)::BIGINT AS pt, "
        "sum(completion_tokens)::BIGINT AS ct, avg(completion_tokens) AS act, avg(latency_s) AS lat, "
        "quantile_cont(latency_s, 0.5) AS p50, quantile_cont(latency_s, 0.95) AS p95, "
        "count(*) FILTER (WHERE finish_reason IS DISTINCT FROM 'stop') AS notstop "
        "FROM raw WHERE {runs} GROUP BY 1"
    )
    rejects = d.run_rows("SELECT stage, reason, count(*) AS n FROM rejects WHERE {runs} GROUP BY ALL ORDER BY n DESC")
    brainstorm = d.run_rows(
        "SELECT count(*) AS n, sum(prompt_tokens)::BIGINT AS pt, "
        "sum(completion_tokens)::BIGINT AS ct, "
        "avg(latency_s) AS lat FROM brainstorm WHERE {runs}"
    )[0]
    if not stats and not rejects and not brainstorm["n"]:
        return empty("No generation data yet.")
    if stats:
        order = {t: i for i, t in enumerate(type_order([r["task_type"] for r in stats]))}
        stats.sort(key=lambda r: order[r["task_type"]])
        out.append("<h3>Examples</h3>")
        out.append(
            table(
                [
                    "task type",
                    "examples",
                    "mean attempts",
                    "prompt tokens",
                    "completion tokens",
                    "completion tokens / example",
                    "latency mean s",
                    "latency p50 s",
                    "latency p95 s",
                    "finish ≠ stop",
                ],
                [
                    (
                        r["task_type"],
                        r["n"],
                        r["att"],
                        r["pt"],
                        r["ct"],
                        r["act"],
                        r["lat"],
                        r["p50"],
                        r["p95"],
                        r["notstop"],
                    )
                    for r in stats
                ],
            )
        )
        latencies = d.run_rows(
            "SELECT task_type, latency_s AS l FROM (SELECT task_type, latency_s FROM raw WHERE {runs} "
            "AND latency_s IS NOT NULL) " + SAMPLE_CLAUSE
        )
        if latencies:
            fig, axes = figure(11, 3.4, ncols=2)
            types = type_order([r["task_type"] for r in latencies])
            axes[0].hist(
                [[r["l"] for r in latencies if r["task_type"] == t] for t in types],
                bins=30,
                stacked=True,
                label=types,
                color=[type_color(t) for t in types],
            )
            axes[0].set_xlabel("request latency (s)")
            axes[0].set_ylabel("examples")
            axes[0].set_title("Latency per example")
            axes[0].legend(fontsize=8, frameon=False, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.18))
            axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
            style_axes(axes[0])
            axes[1].bar(
                [r["task_type"] for r in stats],
                [r["act"] or 0 for r in stats],
                color=[type_color(r["task_type"]) for r in stats],
            )
            axes[1].set_title("Completion tokens per example")
            axes[1].tick_params(axis="x", labelrotation=20)
            style_axes(axes[1])
            out.append(img(fig, "generation latency and tokens"))
    if brainstorm["n"]:
        out.append("<h3>Brainstorm</h3>")
        out.append(
            table(
                ["brainstormed instructions", "prompt tokens", "completion tokens", "mean latency s"],
                [(brainstorm["n"], brainstorm["pt"], brainstorm["ct"], brainstorm["lat"])],
            )
        )
    out.append("<h3>Rejected requests</h3>")
    if not rejects:
        out.append(empty("No rejected requests."))
    else:
        fig, ax = figure(10, max(2.0, 0.34 * len(rejects) + 1.0))
        ax.barh(
            [f"{r['stage']}: {r['reason']}" for r in rejects][::-1], [r["n"] for r in rejects][::-1], color=PALETTE[1]
        )
        ax.set_xlabel("requests")
        ax.set_title("Reject reasons")
        ax.spines[["top", "right"]].set_visible(False)
        out.append(img(fig, "reject reasons"))
        out.append(table(["stage", "reason", "requests"], [(r["stage"], r["reason"], r["n"]) for r in rejects]))
        samples = d.run_rows(
            "SELECT stage, task_type, reason, left(raw_text, 240) AS text FROM rejects "
            "WHERE {runs} ORDER BY hash(example_id) LIMIT 5"
        )
        out.append("<h3>Sample rejects</h3>")
        out.append(
            table(
                ["stage", "task type", "reason", "model output (first 240 chars)"],
                [(r["stage"], r["task_type"], r["reason"], r["text"]) for r in samples],
                text_cols=(3,),
            )
        )
    finish = d.run_rows("SELECT finish_reason, count(*) AS n FROM raw WHERE {runs} GROUP BY 1 ORDER BY n DESC")
    if finish:
        out.append("<h3>Finish reasons</h3>")
        out.append(table(["finish reason", "examples"], [(r["finish_reason"], r["n"]) for r in finish]))
    return "".join(out)
