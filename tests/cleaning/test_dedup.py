"""Exact and near-duplicate removal: known answers on hand-made rows, order independence, determinism."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from ground.settings import CleanSettings
from storage.schemas import DROPPED_SCHEMA
from support.dedup_rows import make_example, near_rows, one_word_changed, table_of, text_of
from tasks.cleaning.dedup import (
    dedup_key,
    exact_dedup,
    instruction_clusters,
    near_dedup,
)
from tasks.cleaning.dedup_near import lsh_bands
from tasks.generation.brainstorm import instruction_key


def dropped_map(result) -> dict[str, tuple[str, str]]:
    d = result.dropped
    return {
        e: (r, det)
        for e, r, det in zip(
            d.column("example_id").to_pylist(),
            d.column("reason").to_pylist(),
            d.column("detail").to_pylist(),
            strict=False,
        )
    }


@pytest.fixture(scope="module")
def cfg() -> CleanSettings:
    return CleanSettings()


def test_dedup_key_ignores_case_space_and_punctuation():
    base = dedup_key("what is minhash")
    assert dedup_key("What is MinHash?") == base
    assert dedup_key("  WHAT   is\tminhash!!! ") == base
    assert dedup_key("What, is... MinHash") == base
    assert dedup_key("Ｗhat is ＭinHash") == base  # full-width letters (NFKC)
    assert dedup_key("what is simhash") != base
    assert dedup_key("Straße") == dedup_key("STRASSE")  # full case folding
    assert dedup_key(None) is None


def test_dedup_key_and_instruction_key_are_different_keys():
    """Examples are compared without any punctuation; brainstormed instructions keep their inner punctuation."""
    with_comma, without = (
        "Retrieve recipes, that use a given ingredient",
        "Retrieve recipes that use a given ingredient",
    )
    assert dedup_key(with_comma) == dedup_key(without)
    assert instruction_key(with_comma) != instruction_key(without)
    assert instruction_key("Ｘ-ray") != dedup_key("Ｘ-ray")  # no NFKC, hyphen kept


# --------------------------------------------------------------------------- exact


def exact_rows() -> list[dict]:
    return [
        make_example("e03", query="What is MinHash?", positive="doc a"),
        make_example("e01", query="  what is   minhash ", positive="doc b"),
        make_example("e02", query="WHAT IS MINHASH!!!", positive="doc c"),
        make_example("e04", query="What is SimHash?", positive="doc d"),
        # same query text in another task type: a different task, kept
        make_example("e05", task_type="sts", query="What is MinHash?", positive="sts doc"),
    ]


@pytest.mark.parametrize("order", ["given", "reversed", "shuffled"])
def test_exact_duplicates_keep_the_smallest_example_id_whatever_the_order(order):
    rows = exact_rows()
    if order == "reversed":
        rows = rows[::-1]
    elif order == "shuffled":
        random.Random(7).shuffle(rows)
    table = table_of(rows)
    result = exact_dedup(table)
    dropped = dropped_map(result)
    assert set(dropped) == {"e02", "e03"}
    for eid in ("e02", "e03"):
        reason, detail = dropped[eid]
        assert reason == "duplicate_query"
        assert "e01" in detail
    # kept rows: input order, input schema
    assert result.kept.column("example_id").to_pylist() == [
        r["example_id"] for r in rows if r["example_id"] not in dropped
    ]
    assert result.kept.schema == table.schema
    assert result.dropped.schema.equals(DROPPED_SCHEMA)
    assert set(result.dropped.column("stage").to_pylist()) == {"dedup_exact"}


def test_classification_labels_repeat_but_document_positives_do_not():
    rows = [
        make_example(
            "c1", "classification", query="The food was cold and late.", positive="negative", negative="positive"
        ),
        make_example(
            "c2", "classification", query="Great service, friendly staff!", positive="Negative.", negative="positive"
        ),
        make_example(
            "c3", "classification", query="Terrible parking, never again.", positive="negative", negative="neutral"
        ),
        make_example("r2", "retrieval", query="best hiking boots", positive="Hiking boots: a buyer's guide."),
        make_example("r1", "retrieval", query="waterproof trail shoes", positive="hiking boots -- a buyer's guide"),
        make_example("s1", "short_short", query="cat", positive="A small domesticated feline."),
        make_example("s2", "short_short", query="kitten", positive="a small domesticated feline"),
    ]
    result = exact_dedup(table_of(rows))
    dropped = dropped_map(result)
    assert set(dropped) == {"r2", "s2"}
    assert dropped["r2"][0] == "duplicate_positive" and "r1" in dropped["r2"][1]
    assert dropped["s2"][0] == "duplicate_positive" and "s1" in dropped["s2"][1]


def test_positive_pass_only_compares_rows_the_query_pass_kept():
    # b repeats a's query; c repeats b's positive. b goes for its query; c stays, because the row
    # it would duplicate is gone.
    rows = [
        make_example("a", query="how to prune roses", positive="Pruning roses in spring."),
        make_example("b", query="How to prune roses?", positive="Feeding roses in summer."),
        make_example("c", query="rose fertilizer", positive="feeding roses in summer"),
    ]
    dropped = dropped_map(exact_dedup(table_of(rows)))
    assert dropped == {"b": ("duplicate_query", dropped["b"][1])}


def test_exact_dedup_is_deterministic_and_handles_nulls_and_empty():
    rows = exact_rows() + [make_example("n1", query=None, positive=None), make_example("n2", query=None, positive=None)]
    table = table_of(rows)
    first, second = exact_dedup(table), exact_dedup(table)
    assert first.kept.equals(second.kept) and first.dropped.equals(second.dropped)
    assert {"n1", "n2"} <= set(first.kept.column("example_id").to_pylist())
    empty = exact_dedup(table_of([]))
    assert empty.kept.num_rows == 0 and empty.dropped.num_rows == 0


# --------------------------------------------------------------------------- near


@pytest.mark.parametrize("order", ["given", "reversed", "shuffled"])
def test_near_duplicates_go_and_different_texts_stay(cfg, order):
    rows = near_rows()
    if order == "reversed":
        rows = rows[::-1]
    elif order == "shuffled":
        random.Random(3).shuffle(rows)
    table = table_of(rows)
    result = near_dedup(table, cfg)
    dropped = dropped_map(result)
    assert set(dropped) == {"n3", "n5"}
    assert dropped["n3"][0] == "near_duplicate_query" and "n1" in dropped["n3"][1]
    assert dropped["n5"][0] == "near_duplicate_positive" and "n2" in dropped["n5"][1]
    assert set(result.dropped.column("stage").to_pylist()) == {"dedup_near"}
    assert result.kept.column("example_id").to_pylist() == [
        r["example_id"] for r in rows if r["example_id"] not in dropped
    ]
    assert result.kept.schema == table.schema


def test_short_queries_are_left_to_exact_dedup(cfg):
    rows = [make_example("a", query="red shoes"), make_example("b", query="red shoe")]
    assert near_dedup(table_of(rows), cfg).dropped.num_rows == 0


def test_threshold_decides(cfg):
    base = text_of(40, seed=1)
    # eight words changed: far below 0.85 Jaccard
    changed = base
    for pos in range(0, 40, 5):
        changed = one_word_changed(changed, pos, "telescope" if changed.split()[pos] != "telescope" else "comet")
    rows = [make_example("a", query=base), make_example("b", query=changed)]
    assert near_dedup(table_of(rows), cfg).dropped.num_rows == 0
    loose = cfg.model_copy(update={"near_dup_threshold": 0.3})
    assert set(dropped_map(near_dedup(table_of(rows), loose))) == {"b"}


def test_near_dedup_is_deterministic(cfg):
    table = table_of(near_rows())
    first, second = near_dedup(table, cfg), near_dedup(table, cfg)
    assert first.kept.equals(second.kept) and first.dropped.equals(second.dropped)
    empty = near_dedup(table_of([]), cfg)
    assert empty.kept.num_rows == 0 and empty.dropped.num_rows == 0


def test_lsh_bands_divide_num_perm_and_reach_recall():
    for num_perm, threshold in [(128, 0.85), (100, 0.85), (64, 0.5), (16, 0.95)]:
        bands = lsh_bands(num_perm, threshold)
        assert num_perm % bands == 0
        rows = num_perm // bands
        assert 1 - (1 - threshold**rows) ** bands >= 0.99
    assert lsh_bands(128, 0.85) == 16


# --------------------------------------------------------------------------- instructions


def test_instruction_clusters_map_to_the_smallest_id_within_task_type(cfg):
    base = "Given a scientific claim as the query, retrieve documents that help verify or refute the claim."
    rows = [
        ("retrieval-000003", "retrieval", base),
        ("retrieval-000001", "retrieval", base.replace("help", "can help")),
        ("retrieval-000002", "retrieval", "Search for recipes that use a given seasonal vegetable."),
        ("retrieval-000004", "retrieval", "search for recipes that use a given seasonal vegetable"),
        ("retrieval-000005", "retrieval", "Find songs."),
        ("retrieval-000006", "retrieval", "find songs"),
        ("classification-000001", "classification", base),
    ]
    table = pa.table(
        {
            "instruction_id": [r[0] for r in rows],
            "task_type": [r[1] for r in rows],
            "instruction": [r[2] for r in rows],
        }
    )
    mapping = instruction_clusters(table, cfg)
    assert mapping == {
        "retrieval-000003": "retrieval-000001",
        "retrieval-000001": "retrieval-000001",
        "retrieval-000002": "retrieval-000002",
        "retrieval-000004": "retrieval-000002",
        "retrieval-000005": "retrieval-000005",
        "retrieval-000006": "retrieval-000005",
        "classification-000001": "classification-000001",
    }
    assert len(set(mapping.values())) == 4
