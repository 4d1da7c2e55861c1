"""The HTML report: built from real-schema fixtures, embedded PNG figures, every section present,
data text escaped, and partial projects (generation only, nothing at all) still render."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.artifacts import clean_facts, funnel_rows
from storage.catalog import Catalog
from storage.schemas import BRAINSTORM_SCHEMA, DROPPED_SCHEMA, EXAMPLE_SCHEMA, INSTRUCTION_SCHEMA, REJECT_SCHEMA
from storage.stages import CLEAN_STAGES, FILTERED_SCHEMA, MINED_SCHEMA, VERIFIED_SCHEMA
from tasks.cleaning.report import distinct_n, write_report

CREATED = datetime(2024, 5, 1, tzinfo=UTC)
EVIL_PERSONA = "<script>alert('persona')</script> a hacker from Lyon"
EVIL_OUTPUT = '<img src=x onerror="alert(1)">{"query": broken'
TYPES = ["retrieval", "classification", "sts"]


def write(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    full = [{name: row.get(name) for name in schema.names} for row in rows]
    pq.write_table(pa.Table.from_pylist(full, schema=schema), path)


def examples(run: str) -> list[dict]:
    rows = []
    for i in range(30):
        t = TYPES[i % 3]
        persona = EVIL_PERSONA if i % 5 == 0 else f"persona {i % 4}"
        rows.append(
            dict(
                example_id=f"{run}:g00-{i:03d}",
                run_id=run,
                shard_id="g00",
                task_type=t,
                instruction=f"instruction {i % 7} for {t}",
                instruction_id=f"i{i % 7}",
                persona_id=f"p{i % 4}",
                persona=persona,
                model="SmolLM2-135M-Instruct",
                prompt_version="v1",
                attempts=1 + i % 2,
                prompt_tokens=100 + i,
                completion_tokens=50 + i,
                latency_s=0.5 + i / 10,
                finish_reason="stop",
                query=f"what is thing {i} about {t}" + " and more" * (i % 4),
                positive=f"thing {i} is " + "x " * i,
                negative=f"not thing {i}",
                created_at=CREATED,
            )
        )
    return rows


def build_generation(data: Path, run: str = "r1") -> list[dict]:
    rows = examples(run)
    write(data / f"runs/{run}/examples/g00.parquet", rows, EXAMPLE_SCHEMA)
    write(
        data / f"runs/{run}/rejects/g00.parquet",
        [
            dict(
                example_id=f"{run}:g00-rej",
                run_id=run,
                shard_id="g00",
                stage="generate",
                task_type="sts",
                reason="invalid_json",
                raw_text=EVIL_OUTPUT,
                created_at=CREATED,
            ),
            dict(
                example_id=f"{run}:b00-rej",
                run_id=run,
                shard_id="b00",
                stage="brainstorm",
                task_type="retrieval",
                reason="empty_list",
                raw_text="[]",
                created_at=CREATED,
            ),
        ],
        REJECT_SCHEMA,
    )
    write(
        data / f"runs/{run}/brainstorm/b00.parquet",
        [
            dict(
                run_id=run,
                task_type="retrieval",
                instruction=f"instruction {k}",
                persona=EVIL_PERSONA,
                prompt_tokens=40,
                completion_tokens=60,
                latency_s=1.5,
                created_at=CREATED,
            )
            for k in range(4)
        ],
        BRAINSTORM_SCHEMA,
    )
    write(
        data / f"runs/{run}/instructions.parquet",
        [
            dict(
                instruction_id=f"i{k}",
                task_type=TYPES[k % 2],
                instruction=f"instruction {k}",
                normalized=f"i {k}",
                persona_id=f"p{k % 3}",
                persona=EVIL_PERSONA if k % 3 == 0 else f"persona {k % 3}",
            )
            for k in range(7)
        ],
        INSTRUCTION_SCHEMA,
    )
    return rows


def build_clean(data: Path, rows: list[dict], clean_id: str = "c1", judge: bool = False) -> None:
    """Every stage table of a clean run (``verified`` with ``judge``), each a prefix of the one before."""
    root = data / "clean" / clean_id
    (root).mkdir(parents=True, exist_ok=True)
    (root / "inputs.json").write_text(json.dumps({"runs": sorted({r["run_id"] for r in rows})}))
    valid, deduped, decontaminated, filtered = rows[:27], rows[:24], rows[:22], rows[:20]
    write(root / "valid.parquet", valid, EXAMPLE_SCHEMA)
    write(root / "deduped.parquet", deduped, EXAMPLE_SCHEMA)
    write(root / "decontaminated.parquet", decontaminated, EXAMPLE_SCHEMA)
    ranked = [dict(r, positive_rank=1 + i % 6, positive_score=0.8 - i / 100) for i, r in enumerate(filtered)]
    write(root / "filtered.parquet", ranked, FILTERED_SCHEMA)
    mined = [
        dict(
            r,
            hard_negatives=[f"hn {k}" for k in range(i % 4)],
            hard_negative_scores=[0.3 + k / 20 for k in range(i % 4)],
        )
        for i, r in enumerate(ranked)
    ]
    write(root / "mined.parquet", mined, MINED_SCHEMA)
    if judge:
        write(
            root / "verified.parquet",
            [dict(r, judge_relabelled=False, judge_replaced=0) for r in mined[:17]],
            VERIFIED_SCHEMA,
        )

    def dropped(rs, stage, reason):
        return [
            dict(
                example_id=r["example_id"],
                run_id=r["run_id"],
                task_type=r["task_type"],
                stage=stage,
                reason=reason,
                detail="<b>detail</b>",
            )
            for r in rs
        ]

    write(root / "dropped/validate.parquet", dropped(rows[27:], "validate", "empty_query"), DROPPED_SCHEMA)
    write(root / "dropped/dedup.parquet", dropped(rows[24:27], "dedup_near", "near_duplicate"), DROPPED_SCHEMA)
    write(root / "dropped/decontaminate.parquet", dropped(rows[22:24], "decontaminate", "contaminated"), DROPPED_SCHEMA)
    write(root / "dropped/rank_filter.parquet", dropped(rows[20:22], "rank_filter", "rank_above_k"), DROPPED_SCHEMA)


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_full_report_has_every_section_figures_and_escapes_data(tmp_path):
    data = tmp_path / "data"
    rows = build_generation(data)
    build_clean(data, rows)
    out = write_report(Catalog(data), None, tmp_path / "report.html")
    page = out.read_text(encoding="utf-8")
    for title in [
        "Funnel per stage and task type",
        "Drop reasons",
        "Positive rank",
        "Negative scores",
        "Length distributions",
        "Instruction and persona diversity",
        "Generation statistics",
    ]:
        assert f"<h2>{title}</h2>" in page
    assert "clean run c1" in page and "generated at" in page
    pngs = images(page)
    assert len(pngs) >= 7 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    # data text is escaped: nothing from the data opens a tag
    assert "<script" not in page.lower() and "<img src=x" not in page and "<b>detail" not in page
    assert "&lt;script&gt;alert(&#x27;persona&#x27;)&lt;/script&gt; a hacker from Lyon" in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    # the funnel table counts every stage per task type (rows 0..29: 10 per type; valid = rows[:27] ...)
    funnel = page.split('id="funnel"')[1].split("</table>")[0]
    assert re.search(r"<td>retrieval</td>(<td class=\"num\">[^<]*</td>){7}", funnel)
    assert (
        '<td>total</td><td class="num">30</td><td class="num">27</td><td class="num">24</td>'
        '<td class="num">22</td><td class="num">20</td><td class="num">20</td>' in funnel
    )
    assert "near_duplicate" in page and "rank_above_k" in page and "invalid_json" in page


def funnel_totals(page: str) -> dict[str, int]:
    """The HTML funnel's total row, by column header."""
    funnel = page.split('id="funnel"')[1].split("</table>")[0]
    heads = re.findall(r"<th[^>]*>([^<]*)</th>", funnel)
    total = re.search(r"<tr><td>total</td>(.*?)</tr>", funnel).group(1)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", total)
    return {h: int(float(c)) for h, c in zip(heads[1:-1], cells[:-1], strict=True)}


@pytest.mark.parametrize("judge", [False, True])
def test_both_funnels_have_a_column_per_stage_table_with_its_rows(tmp_path, judge):
    """The HTML report's funnel and the Prefect artifact's: one column per stage table written, in flow order."""
    data = tmp_path / "data"
    build_clean(data, build_generation(data), judge=judge)
    catalog = Catalog(data)
    page = write_report(catalog, "c1", tmp_path / "r.html").read_text()
    tables = {s.table: data / "clean" / "c1" / f"{s.table}.parquet" for s in CLEAN_STAGES}
    want = {"generated": 30} | {t: pq.read_metadata(p).num_rows for t, p in tables.items() if p.exists()}
    assert ("verified" in want) == judge and "decontaminated" in want
    assert list(funnel_totals(page).items()) == list(want.items())
    artifact = funnel_rows(clean_facts(catalog, "c1", ["r1"])["per_stage"])[-1]
    assert artifact.pop("task type") == "total"
    assert artifact.pop("kept %") == pytest.approx(100 * list(want.values())[-1] / 30, abs=0.05)
    assert list(artifact.items()) == list(want.items())


def test_generation_only_project_says_what_is_missing(tmp_path):
    data = tmp_path / "data"
    build_generation(data)
    page = write_report(Catalog(data), None, tmp_path / "r.html").read_text()
    assert "generation only" in page
    assert "No cleaning run yet" in page and "No hard-negative mining output yet." in page
    assert "No ranking-consistency filter output yet." in page
    assert len(images(page)) >= 3  # funnel, lengths, latency, rejects
    assert "<script" not in page.lower()


def test_empty_project_and_explicit_clean_id(tmp_path):
    data = tmp_path / "data"
    page = write_report(Catalog(data), None, tmp_path / "empty.html").read_text()
    assert "No generated examples yet." in page and "No generation data yet." in page
    rows = build_generation(data)
    build_clean(data, rows, "c1")
    build_clean(data, rows[:12], "c2")
    page = write_report(Catalog(data), "c1", tmp_path / "c1.html").read_text()
    assert "clean run c1" in page
    assert '<td>total</td><td class="num">30</td><td class="num">27</td>' in page


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == 2 / 3
    assert distinct_n([""], 1) is None
