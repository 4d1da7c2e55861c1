"""Semantic instruction dedup: hand-written paraphrase sets share an intent under the real MiniLM at the
default threshold; targets count intents; runs written before intents existed still read."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ground.settings import GenerationSettings
from llm.embedder import SentenceTransformerEmbedder
from storage.schemas import INSTRUCTION_SCHEMA
from storage.shards import read_parquet_checked
from tasks.generation.brainstorm import deficits, unique_instructions
from tasks.generation.intents import cluster_intents, intent_summary

# brainstorm-style instructions: each inner list is one intent in different words
PARAPHRASES = [
    [
        "Retrieve vegan dessert recipes that contain no nuts.",
        "Find nut-free vegan dessert recipes.",
        "Retrieve recipes for vegan desserts without nuts.",
    ],
    [
        "Given a laptop error message, retrieve troubleshooting guides that fix it.",
        "Given an error message from a laptop, find troubleshooting guides that resolve it.",
    ],
    [
        "Classify a customer review of a hotel as positive, negative or neutral.",
        "Classify hotel customer reviews as positive, negative or neutral.",
    ],
]
DISTINCT = [
    "Retrieve scholarly articles about coral reef bleaching.",
    "Given a math word problem, retrieve a worked solution.",
    "Classify a tweet by the emotion it expresses.",
    "Retrieve vegan main course recipes for a dinner party.",
]


def brainstorm_table(rows: list[tuple[str, str]]) -> pa.Table:
    return pa.table(
        {
            "shard_id": [f"b000-{i:05d}" for i in range(len(rows))],
            "task_type": [t for t, _ in rows],
            "instruction": [x for _, x in rows],
            "persona_id": ["p"] * len(rows),
            "persona": ["a persona"] * len(rows),
        }
    )


def test_paraphrase_sets_share_an_intent_and_distinct_instructions_do_not():
    texts = [x for group in PARAPHRASES for x in group] + DISTINCT
    group_of = [g for g, group in enumerate(PARAPHRASES) for _ in group] + [100 + i for i in range(len(DISTINCT))]
    vectors = SentenceTransformerEmbedder(batch_size=32).encode(texts)
    threshold = GenerationSettings().intent_threshold
    intents = cluster_intents(["retrieval"] * len(texts), vectors, threshold)
    by_group: dict[int, set[int]] = {}
    for g, intent in zip(group_of, intents.intent, strict=True):
        by_group.setdefault(g, set()).add(intent)
    sims = vectors @ vectors.T
    assert all(len(v) == 1 for v in by_group.values()), (by_group, np.round(sims, 2))
    assert len({next(iter(v)) for v in by_group.values()}) == len(by_group), "two groups merged"
    assert len(set(intents.intent)) == len(PARAPHRASES) + len(DISTINCT)
    summary = intent_summary(["retrieval"] * len(texts), [str(i) for i in intents.intent], intents.nearest)
    assert summary["retrieval"]["intents"] == 7 and summary["retrieval"]["clusters"] == 3
    assert 0 < summary["retrieval"]["mean_nn_similarity"] < 1


def test_blockwise_clustering_equals_the_all_pairs_greedy_across_block_boundaries():
    """The blockwise greedy gives every instruction the intent the plain all-pairs greedy gives it: planted
    near-duplicate groups whose members fall in different blocks, in two task types, blocks of 7 rows."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(40, 16))
    members = rng.integers(0, 40, size=300)
    vectors = centres[members] + rng.normal(scale=0.35, size=(300, 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    types = ["retrieval" if i % 3 else "sts" for i in range(300)]
    threshold = 0.9

    expected_intent, expected_nearest = [0] * 300, [0.0] * 300
    for t in set(types):  # the definition, written out: all pairs, then the first head at or above threshold
        rows = [i for i, x in enumerate(types) if x == t]
        sims = vectors[rows] @ vectors[rows].T
        np.fill_diagonal(sims, -np.inf)
        heads: list[int] = []
        for k, row in enumerate(rows):
            joined = next((j for j, h in enumerate(heads) if sims[k, h] >= threshold), None)
            if joined is None:
                heads.append(k)
                joined = len(heads) - 1
            expected_intent[row], expected_nearest[row] = joined, float(sims[k].max())

    got = cluster_intents(types, vectors, threshold, block=7)
    assert got.intent == expected_intent
    assert np.allclose(got.nearest, expected_nearest, atol=1e-5)
    assert 5 < len(set(zip(types, got.intent, strict=True))) < 300  # some groups merged, not all


def fake_encode(texts: list[str]) -> np.ndarray:
    """Unit vectors where texts with the same first word are identical and others orthogonal."""
    words = sorted({t.split()[0] for t in texts})
    out = np.zeros((len(texts), len(words)), np.float32)
    for i, t in enumerate(texts):
        out[i, words.index(t.split()[0])] = 1.0
    return out


def test_targets_count_intents_not_strings():
    rows = [
        ("retrieval", "Alpha retrieve one thing please"),
        ("retrieval", "Alpha retrieve the same thing again"),
        ("retrieval", "Beta retrieve another thing entirely"),
        ("retrieval", "Gamma retrieve a third thing now"),
        ("retrieval", "Alpha yet another paraphrase here"),
        ("classification", "Delta classify some texts today"),
    ]
    targets = {"retrieval": 2, "classification": 3}
    table = unique_instructions(brainstorm_table(rows), targets, fake_encode, 0.85)
    got = list(zip(table["instruction"].to_pylist(), table["intent_id"].to_pylist(), strict=True))
    assert got == [
        ("Alpha retrieve one thing please", "retrieval-i000001"),
        ("Alpha retrieve the same thing again", "retrieval-i000001"),
        ("Beta retrieve another thing entirely", "retrieval-i000002"),
        ("Alpha yet another paraphrase here", "retrieval-i000001"),
        ("Delta classify some texts today", "classification-i000001"),
    ]
    assert deficits(table, targets) == {"retrieval": 0, "classification": 2}
    plain = unique_instructions(brainstorm_table(rows), targets)  # text dedup only: strings count
    assert plain["instruction"].to_pylist() == [r[1] for r in rows[:2]] + [rows[5][1]]
    assert deficits(plain, targets) == {"retrieval": 0, "classification": 2}


def test_instructions_of_older_runs_read_without_intents(tmp_path):
    old_schema = pa.schema([f for f in INSTRUCTION_SCHEMA if f.name not in ("intent_id", "nearest_similarity")])
    row = {
        "instruction_id": "retrieval-000001",
        "task_type": "retrieval",
        "instruction": "Find x",
        "normalized": "find x",
    }
    pq.write_table(
        pa.Table.from_pylist([{**row, "persona_id": "p", "persona": "q"}], schema=old_schema), tmp_path / "i.parquet"
    )
    table = read_parquet_checked(tmp_path / "i.parquet", INSTRUCTION_SCHEMA)
    assert table.schema.equals(INSTRUCTION_SCHEMA, check_metadata=False)
    assert table["intent_id"].to_pylist() == [None]
    assert deficits(table, {"retrieval": 3}) == {"retrieval": 2}
