"""Good example rows of every task type, as validation's tests and its screen tests build them."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pyarrow as pa

from storage.schemas import EXAMPLE_SCHEMA

CREATED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


EN_QUERY = "How do heat pumps keep a house warm during a very cold winter?"


EN_DOC = (
    "A heat pump moves heat from the outside air into the house. Even when it is cold outside, "
    "the air still holds some energy, which the pump concentrates with a compressor."
)


EN_NEG = (
    "Gas boilers burn fuel to heat water, which then circulates through radiators in every room "
    "of the building and keeps the inside temperature comfortable."
)


GOOD = {
    "retrieval": dict(
        query=EN_QUERY,
        positive=EN_DOC,
        negative=EN_NEG,
        instruction="Given a home heating question, retrieve documents that answer it.",
    ),
    "classification": dict(
        query="The battery died after two days and support never answered my emails.",
        positive="negative",
        negative="neutral",
        instruction="Classify the sentiment of a product review.",
    ),
    "short_short": dict(
        query="photosynthesis",
        positive="The process plants use to turn light into sugar.",
        negative=None,
        instruction="Match a scientific term with its definition.",
    ),
    "long_long": dict(
        query=EN_DOC + " " + EN_NEG,
        positive=EN_NEG + " " + EN_DOC,
        negative=None,
        instruction="Given an essay about home heating, retrieve essays on the same topic.",
    ),
    "sts": dict(
        query="A man is playing a guitar on the stage.",
        positive="A man plays guitar on stage.",
        negative="A woman is cooking dinner in the kitchen.",
        instruction="Retrieve semantically similar text.",
    ),
    "bitext": dict(
        query="The weather is beautiful today and the children are playing outside in the park.",
        positive="Das Wetter ist heute wunderschön und die Kinder spielen draußen im Park.",
        negative="Das Wetter ist heute schlecht und die Kinder bleiben zu Hause im Haus.",
        instruction="Retrieve parallel sentences.",
    ),
}


def placeholders(task_type: str, language: str = "English", tgt: str = "German") -> str:
    if task_type == "bitext":
        return json.dumps({"src_lang": language, "tgt_lang": tgt, "unit": "sentence"})
    return json.dumps({"language": language})


def make_example(i: int, task_type: str = "retrieval", **overrides) -> dict:
    """A good example row of ``task_type`` with every EXAMPLE_SCHEMA column filled."""
    row = {
        "example_id": f"run-v:g00-00000-{i:06d}",
        "run_id": "run-v",
        "shard_id": "g00-00000",
        "task_type": task_type,
        "instruction": GOOD[task_type]["instruction"],
        "instruction_id": f"{task_type}-{i:06d}",
        "persona_id": "p_0001",
        "persona": "A retired engineer who renovates old houses.",
        "placeholders": placeholders(task_type),
        "prompt_version": "abc123def456",
        "model": "test-model",
        "sampling": json.dumps({"temperature": 0.9}),
        "attempts": 1,
        "prompt_tokens": 100,
        "completion_tokens": 50,
        "latency_s": 0.5,
        "finish_reason": "stop",
        "query": GOOD[task_type]["query"],
        "positive": GOOD[task_type]["positive"],
        "negative": GOOD[task_type]["negative"],
        "parsed": "{}",
        "raw_text": "{}",
        "created_at": CREATED,
    }
    assert set(row) == set(EXAMPLE_SCHEMA.names)
    row.update(overrides)
    return row


def table_of(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)
