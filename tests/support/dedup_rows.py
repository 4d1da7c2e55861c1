"""Hand-made example rows for the dedup tests (cleaning/test_dedup.py, cleaning/test_dask_scaleout.py): random
word texts, rows with every EXAMPLE_SCHEMA column, and a set of near-duplicates with known answers."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import pyarrow as pa

from storage.schemas import EXAMPLE_SCHEMA

CREATED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


WORDS = (
    "river mountain library engine garden violin harbor candle meadow planet circuit lantern "
    "forest bridge market canyon orchard glacier compass theatre island bakery tunnel museum "
    "desert falcon mirror pottery satellite village quarry anchor blossom cathedral"
).split()


def text_of(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_example(
    example_id: str, task_type: str = "retrieval", query: str = "q", positive: str = "p", negative: str | None = "n"
) -> dict:
    """One row with every EXAMPLE_SCHEMA column filled."""
    row = {
        "example_id": example_id,
        "run_id": "run-d",
        "shard_id": "g00-00000",
        "task_type": task_type,
        "instruction": f"instruction for {task_type}",
        "instruction_id": f"{task_type}-000001",
        "persona_id": "p_0001",
        "persona": "A persona.",
        "placeholders": json.dumps({"language": "English"}),
        "prompt_version": "abc",
        "model": "m",
        "sampling": "{}",
        "attempts": 1,
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "latency_s": 0.1,
        "finish_reason": "stop",
        "query": query,
        "positive": positive,
        "negative": negative,
        "parsed": "{}",
        "raw_text": "{}",
        "created_at": CREATED,
    }
    assert set(row) == set(EXAMPLE_SCHEMA.names)
    return row


def table_of(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)


def one_word_changed(text: str, position: int, word: str) -> str:
    words = text.split()
    assert words[position] != word
    words[position] = word
    return " ".join(words)


def near_rows() -> list[dict]:
    base = text_of(40, seed=1)
    return [
        make_example("n3", query=base, positive=text_of(60, seed=10)),
        make_example("n1", query=one_word_changed(base, 20, "telescope"), positive=text_of(60, seed=11)),
        make_example("n2", query=text_of(40, seed=2), positive=text_of(60, seed=12)),  # clearly different
        make_example("n4", query=text_of(40, seed=3), positive=text_of(60, seed=13)),
        # positive near-duplicate of n2's (one word changed), query different
        make_example("n5", query=text_of(40, seed=4), positive=one_word_changed(text_of(60, seed=12), 30, "telescope")),
        # same near-duplicate positive pair in short_short: positives of short types are not near-deduped
        make_example("s1", "short_short", query=text_of(10, seed=5), positive=text_of(60, seed=20)),
        make_example(
            "s2",
            "short_short",
            query=text_of(10, seed=6),
            positive=one_word_changed(text_of(60, seed=20), 10, "telescope"),
        ),
        # the near-duplicate query in another task type: kept
        make_example("x1", "long_long", query=base, positive=text_of(60, seed=30)),
    ]
