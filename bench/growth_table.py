"""The tables ``bench/clean_growth.py`` prints: per stage, a column per size and side, and growth exponents.

A result is the clean child's JSON (``seconds``, ``peak_rss`` and ``peak_anon`` per stage, ``total_s``,
``baseline_rss``, ``flow_stage_seconds``, ``counts``, ``missing_hooks``) or ``{"stopped": "> 12 GiB at mine"}``
for a side its guard stopped. The exponent of a side is log(v1 / v0) / log(n1 / n0) between the smallest and the largest
size it completed: 1 is linear, 2 quadratic.
"""

from __future__ import annotations

import numpy as np

GIB = 2**30


def exponent(side, value) -> str:
    """Growth exponent of ``value(result)`` between the smallest and largest size the side completed."""
    points = [(n, value(r)) for n, r in sorted(side.results.items()) if "stopped" not in r]
    points = [(n, v) for n, v in points if v]
    if len(points) < 2 or points[0][0] == points[-1][0]:
        return "-"
    (n0, v0), (n1, v1) = points[0], points[-1]
    return f"{np.log(v1 / v0) / np.log(n1 / n0):.2f}"


def table(title: str, sides: list, sizes: list[int], rows: list[tuple[str, object]], fmt) -> list[str]:
    """One line per (label, value(result)), a column per size and side, then each side's exponent."""
    width = 16
    names = [s.name for s in sides]
    lines = [title, f"  {'':<14}" + "".join(f"{n:>{width * len(sides)},}" for n in sizes) + "   exponent"]
    lines.append(
        f"  {'stage':<14}" + "".join(f"{name:>{width}}" for _ in sizes for name in names) + "   " + "/".join(names)
    )
    for label, value in rows:
        cells = []
        for n in sizes:
            for side in sides:
                r = side.results.get(n)
                if r is None:
                    cells.append("")
                elif "stopped" in r:
                    cells.append(r["stopped"].replace("> ", ">").replace(" GiB at ", "GiB@").replace(" s at ", "s@"))
                else:
                    v = value(r)
                    cells.append(fmt(v) if v is not None else "-")
        slopes = "/".join(exponent(side, value) for side in sides)
        lines.append(f"  {label:<14}" + "".join(f"{c:>{width}}" for c in cells) + f"   {slopes}")
    return lines


def report(sides: list, sizes: list[int], stages: tuple[str, ...]) -> str:
    """The time and RSS tables of ``sides`` (each with ``name`` and ``results``: rows -> result), side by side."""
    seen = [st for st in stages if any(st in r.get("seconds", {}) for s in sides for r in s.results.values())]
    times = [(st, lambda r, st=st: r["seconds"].get(st)) for st in seen] + [("total", lambda r: r["total_s"])]
    rss = [("baseline", lambda r: r["baseline_rss"] / GIB)]
    rss += [(st, lambda r, st=st: r["peak_rss"][st] / GIB if st in r["peak_rss"] else None) for st in seen]
    rss += [("peak", lambda r: max(r["peak_rss"].values()) / GIB)]
    lines = table(
        "time (s) per stage; model time excluded (hashing embedder; see bench/cleaning.py for the model)",
        sides,
        sizes,
        times,
        lambda v: f"{v:.2f}",
    )
    unseen = [st for st in stages if st not in seen]
    if unseen:
        lines.append(f"  not seen (their functions never ran or are renamed; time in the stage before): {unseen}")
    lines += table(
        "peak RSS (GiB) during each stage (baseline: after imports)", sides, sizes, rss, lambda v: f"{v:.2f}"
    )
    anon = [(st, lambda r, st=st: r["peak_anon"][st] / GIB if st in r.get("peak_anon", {}) else None) for st in seen]
    anon += [("peak", lambda r: max(r["peak_anon"].values()) / GIB if r.get("peak_anon") else None)]
    lines += table(
        "peak anonymous RSS (GiB): RSS less file-backed pages (memory-mapped vectors live in the page cache)",
        sides,
        sizes,
        anon,
        lambda v: f"{v:.2f}",
    )
    lines.append("the flow's own stage_seconds and counts, and hooks not found:")
    for side in sides:
        for n, r in sorted(side.results.items()):
            if "stopped" not in r:
                lines.append(f"  {side.name:>6} {n:>9,}: {r['flow_stage_seconds']}  counts {r['counts']}")
                if r["missing_hooks"]:
                    lines.append(f"  {'':>16} hooks not found: {r['missing_hooks']}")
    return "\n".join(lines)
