"""A small data folder of runs and clean runs, and the README's catalog queries, for the catalog and S3 tests."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from storage.catalog import Catalog
from storage.schemas import (
    DROPPED_SCHEMA,
    EXAMPLE_SCHEMA,
    FILTER_COLUMNS,
    INSTRUCTION_SCHEMA,
    MINED_COLUMNS,
    REJECT_SCHEMA,
)

CREATED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def row_for(schema: pa.Schema, **values) -> dict:
    """A row with a typed value in every column of ``schema``; ``values`` override."""
    row = {}
    for field in schema:
        t = field.type
        if pa.types.is_string(t):
            row[field.name] = f"{field.name}-x"
        elif pa.types.is_integer(t):
            row[field.name] = 1
        elif pa.types.is_floating(t):
            row[field.name] = 0.5
        elif pa.types.is_timestamp(t):
            row[field.name] = CREATED
        elif pa.types.is_list(t):
            row[field.name] = ["a"] if pa.types.is_string(t.value_type) else [0.25]
        else:  # pragma: no cover
            raise AssertionError(field)
    row.update(values)
    return row


def extend(schema: pa.Schema, columns) -> pa.Schema:
    for name, dtype in columns:
        schema = schema.append(pa.field(name, dtype))
    return schema


FILTERED = extend(EXAMPLE_SCHEMA, FILTER_COLUMNS)


MINED = extend(FILTERED, MINED_COLUMNS)


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_queries() -> list[str]:
    """The SQL of every ``embed-factory query "…"`` line in the README's DuckDB section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Querying with DuckDB") :]
    section = section[: section.index("\n## ")]
    prefix = 'embed-factory query "'
    return [line[len(prefix) : line.rindex('"')] for line in section.splitlines() if line.startswith(prefix)]


def write_small_store(data_dir) -> None:
    """One run (two example shards, rejects, instructions) and one clean run, via RunStore / CleanStore.

    ``data_dir`` may be a local folder or an S3 path: the same writers serve both.
    """
    from storage.corpus import CleanStore, StageResult
    from storage.shards import RunStore

    store = RunStore(data_dir, "r1")

    def ex(shard: str, i: int, task: str, persona: str | None, latency: float, tokens: int) -> dict:
        return row_for(
            EXAMPLE_SCHEMA,
            example_id=f"r1:{shard}-{i}",
            run_id="r1",
            shard_id=shard,
            task_type=task,
            persona_id=persona,
            instruction_id=f"i-{persona}",
            latency_s=latency,
            completion_tokens=tokens,
            attempts=1 + i % 2,
            query=f"q {shard} {i}",
            positive=f"p {shard} {i}",
        )

    g00 = [
        ex("g00", 0, "retrieval", "p1", 1.0, 100),
        ex("g00", 1, "retrieval", "p2", 2.0, 120),
        ex("g00", 2, "sts", None, 3.0, 50),
    ]
    g01 = [ex("g01", 0, "retrieval", "p1", 10.0, 300), ex("g01", 1, "classification", "p3", 8.0, 200)]
    reject = row_for(
        REJECT_SCHEMA, example_id="r1:g00-9", run_id="r1", shard_id="g00", stage="generate", reason="invalid_json"
    )
    store.write_shard("examples", "g00", g00, [reject])
    store.write_shard("examples", "g01", g01, [])
    store.write_instructions(
        pa.Table.from_pylist(
            [row_for(INSTRUCTION_SCHEMA, instruction_id=f"i-{p}", persona_id=p) for p in ("p1", "p2", "p3")],
            schema=INSTRUCTION_SCHEMA,
        )
    )

    clean = CleanStore(data_dir, "c1")
    clean.write_inputs(["r1"])
    rows = g00 + g01
    drop = [
        row_for(
            DROPPED_SCHEMA,
            example_id=r["example_id"],
            run_id="r1",
            task_type=r["task_type"],
            stage=stage,
            reason=reason,
        )
        for r, stage, reason in [(g00[2], "validate", "too_short"), (g01[1], "rank_filter", "positive_rank")]
    ]
    valid = pa.Table.from_pylist([r for r in rows if r is not g00[2]], schema=EXAMPLE_SCHEMA)
    clean.write_stage("valid", StageResult(valid, pa.Table.from_pylist(drop[:1], schema=DROPPED_SCHEMA)))
    clean.write_stage("deduped", StageResult.keep_all(valid))
    kept = [r for r in rows if r is not g00[2] and r is not g01[1]]
    filtered = pa.Table.from_pylist(
        [row_for(FILTERED, **r, positive_rank=1 + i) for i, r in enumerate(kept)], schema=FILTERED
    )
    clean.write_stage("filtered", StageResult(filtered, pa.Table.from_pylist(drop[1:], schema=DROPPED_SCHEMA)))
    mined = pa.Table.from_pylist(
        [row_for(MINED, **r, hard_negatives=[f"neg {r['example_id']}", "other"]) for r in filtered.to_pylist()],
        schema=MINED,
    )
    clean.write_stage("mined", StageResult.keep_all(mined))


#: what each README query answers on ``write_small_store`` (the sample: its rows, in any order)
README_EXPECTED = [
    [
        {"task_type": "retrieval", "examples": 3, "avg_attempts": 1.33},
        {"task_type": "classification", "examples": 1, "avg_attempts": 2.0},
        {"task_type": "sts", "examples": 1, "avg_attempts": 1.0},
    ],
    [
        {"stage": "generate", "reason": "invalid_json", "n": 1},
        {"stage": "rank_filter", "reason": "positive_rank", "n": 1},
        {"stage": "validate", "reason": "too_short", "n": 1},
    ],
    [
        {"run_id": "r1", "shard_id": "g01", "examples": 2, "avg_latency_s": 9.0, "completion_tokens": 500},
        {"run_id": "r1", "shard_id": "g00", "examples": 3, "avg_latency_s": 2.0, "completion_tokens": 270},
    ],
    [
        {"task_type": "retrieval", "personas": 2, "personas_in_corpus": 2, "examples": 3},
        {"task_type": "classification", "personas": 1, "personas_in_corpus": 0, "examples": 1},
    ],
    None,
]


def check_readme_queries(catalog: Catalog) -> None:
    queries = readme_queries()
    assert len(queries) == 5, queries
    for sql, expected in zip(queries, README_EXPECTED, strict=True):
        rows = catalog.query(sql).to_pylist()
        if expected is not None:
            assert rows == expected, sql
    sample = catalog.query(queries[4]).to_pylist()
    assert sorted(r["query"] for r in sample) == ["q g00 0", "q g00 1", "q g01 0"]
    assert all(r["hard_negative"].startswith("neg ") and r["positive_rank"] >= 1 for r in sample)
    assert catalog.query(queries[4]).to_pylist() == sample  # REPEATABLE: the same sample every time
