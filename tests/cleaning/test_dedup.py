"""Exact and near-duplicate removal: known answers on hand-made rows, order independence, determinism."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pyarrow as pa
import pytest

from ground.settings import CleanSettings
from storage.schemas import DROPPED_SCHEMA
from support.dedup_rows import make_example, near_rows, one_word_changed, table_of, text_of
from tasks.cleaning import dedup_minhash, dedup_near
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


# --------------------------------------------------------------------------- the signature-matrix engine


def brute_force_clusters(sig: np.ndarray, threshold: float) -> list[int]:
    """The rule written out over all pairs: a pair that agrees on a whole LSH band and on >= threshold of
    the signature is an edge; each row's representative is the smallest row it is joined to."""
    n, num_perm = sig.shape
    rows = num_perm // lsh_bands(num_perm, threshold)
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for i, j in itertools.combinations(range(n), 2):
        same = sig[i] == sig[j]
        candidate = same.reshape(-1, rows).all(axis=1).any()
        if candidate and same.mean() >= threshold:
            ri, rj = find(i), find(j)
            parent[max(ri, rj)] = min(ri, rj)
    return [find(i) for i in range(n)]


def mutated(sig: np.ndarray, positions, rng: np.random.Generator) -> np.ndarray:
    """``sig`` with the values at ``positions`` changed: every other one in its high bytes only, so a
    filter on low bytes alone would miss it."""
    out, positions = sig.copy(), np.asarray(list(positions), dtype=np.int64)
    out[positions] = rng.integers(0, 2**32, len(positions), dtype=np.uint32)
    high_only = positions[::2]
    out[high_only] = sig[high_only] ^ (rng.integers(1, 2**24, len(high_only), dtype=np.uint32) << np.uint32(8))
    return out


def signature_families(rng: np.random.Generator, families: int, per_family: int, num_perm: int = 128) -> np.ndarray:
    """Rows in families: each a base signature with 0-30 random positions replaced, so pairs fall on
    both sides of the threshold, and some are band-candidates and some not."""
    out = []
    for _ in range(families):
        base = rng.integers(0, 2**32, num_perm, dtype=np.uint32)
        for _ in range(per_family):
            out.append(mutated(base, rng.choice(num_perm, rng.integers(0, 31), replace=False), rng))
    return np.stack(out)[rng.permutation(families * per_family)]


@pytest.mark.parametrize("block", [7, dedup_near.PAIR_BLOCK])
def test_clusters_equal_the_all_pairs_reference(monkeypatch, block):
    monkeypatch.setattr(dedup_near, "PAIR_BLOCK", block)  # tiny blocks: a bucket's pairs span several
    rng = np.random.default_rng(5)
    sig = signature_families(rng, families=12, per_family=15)
    expected = brute_force_clusters(sig, 0.85)
    assert len(set(expected)) < len(expected) - 20  # the families do join (the test has something to find)
    assert dedup_near.clusters_of_signatures(sig, 0.85).tolist() == expected


def test_clusters_are_transitive_and_keep_the_smallest_position():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2**32, 128, dtype=np.uint32)
    b = mutated(a, range(0, 16), rng)  # a~b (112/128 >= 0.85)
    c = mutated(b, range(16, 32), rng)  # b~c, but a and c agree on 96/128 only
    other = rng.integers(0, 2**32, 128, dtype=np.uint32)
    assert (a == c).mean() < 0.85
    # c first, a last: the chain still has one representative, the smallest position (c's)
    assert dedup_near.clusters_of_signatures(np.stack([c, other, b, a]), 0.85).tolist() == [0, 1, 0, 0]


def test_candidate_pairs_are_verified_in_blocks_not_one_by_one(monkeypatch):
    """The scaling guard: a bucket of m rows makes m(m-1)/2 candidates, which must reach numpy in blocks
    (a Python loop per pair is what made near dedup superlinear); buckets already one cluster make none."""
    monkeypatch.setattr(dedup_near, "PAIR_BLOCK", 10_000)
    rng = np.random.default_rng(2)
    n = 600
    sig = rng.integers(0, 2**32, (n, 128), dtype=np.uint32)
    sig[:, :8] = 7  # every row shares band 0, and nothing else: 179,700 candidates, no edge
    calls, pairs = [], []
    real = dedup_near.band_pairs

    def counting(*args):
        for left, right in real(*args):
            calls.append(1)
            pairs.append(len(left))
            yield left, right

    monkeypatch.setattr(dedup_near, "band_pairs", counting)
    assert dedup_near.clusters_of_signatures(sig, 0.85).tolist() == list(range(n))
    assert sum(pairs) == n * (n - 1) // 2
    assert len(calls) <= sum(pairs) // 10_000 + 2 and max(pairs) < 10_000 + n
    calls.clear(), pairs.clear()
    same = np.repeat(sig[:1], n, axis=0)  # one cluster after band 0: the other 15 bands make no pairs
    assert dedup_near.clusters_of_signatures(same, 0.85).tolist() == [0] * n
    assert sum(pairs) == n * (n - 1) // 2


def test_near_dedup_keeps_the_smallest_id_of_a_cluster_whatever_the_order(cfg):
    base = text_of(60, seed=40)
    variants = [base] + [one_word_changed(base, pos, "telescope") for pos in (5, 25, 45, 55)]
    ids = ["c4", "c2", "c5", "c1", "c3"]
    rows = [
        make_example(e, query=t, positive=text_of(60, seed=50 + k))
        for k, (e, t) in enumerate(zip(ids, variants, strict=True))
    ]
    random.Random(11).shuffle(rows)
    dropped = dropped_map(near_dedup(table_of(rows), cfg))
    assert set(dropped) == {"c2", "c3", "c4", "c5"}
    assert all("near-duplicate of c1 " in detail for _, detail in dropped.values())


def test_near_dedup_equals_exact_jaccard_where_the_answer_is_clear(cfg):
    """Against the true Jaccard of shingle sets over all pairs, on texts that are either near-copies
    (one word changed, J > 0.93) or unrelated (J < 0.5): MinHash's estimate cannot land on the wrong side."""
    texts, ids = [], []
    for family in range(8):
        base = text_of(100, seed=100 + family)
        for k in range(family % 4 + 1):
            texts.append(base if k == 0 else one_word_changed(base, 7 * k, "telescope"))
            ids.append(f"f{family}-{k}")
    shingles = [{t[i : i + cfg.shingle_size] for i in range(len(t) - cfg.shingle_size + 1)} for t in texts]
    reference = set()
    for i, j in itertools.combinations(range(len(texts)), 2):
        jac = len(shingles[i] & shingles[j]) / len(shingles[i] | shingles[j])
        assert jac > 0.93 or jac < 0.5
        if jac > 0.93:
            reference.add(max(ids[i], ids[j]))
    rows = [make_example(e, query=t) for e, t in zip(ids, texts, strict=True)]
    assert set(dropped_map(near_dedup(table_of(rows), cfg))) == reference


def test_same_drops_as_the_replaced_implementation(cfg):
    """bench/dedup_growth.py keeps the near dedup this engine replaced; on the growth bench's synthetic
    rows (exact and near duplicates, vague queries, shared templates) both drop the same rows, same details."""
    from dedup_growth import old_near_dedup
    from growth_rows import synthetic_rows

    from storage.schemas import EXAMPLE_SCHEMA

    table = pa.Table.from_pylist(synthetic_rows(3000, "bench-run", 3), schema=EXAMPLE_SCHEMA)  # exact dups too
    new, old = near_dedup(table, cfg), old_near_dedup(table, cfg)
    assert new.dropped.num_rows > 50
    assert new.dropped.equals(old.dropped) and new.kept.equals(old.kept)


def test_shingle_hashes_are_rensas_token_hashes():
    """The numpy shingle hash is rensa's str-token hash byte for byte (every length class of the hash:
    1-3, 4-7, 8-16 and over 16 UTF-8 bytes), so signatures equal RMinHash.from_token_sets over the shingles."""
    from rensa import RMinHash

    rng = random.Random(4)
    texts = ["", "a", "ab", "abcde"] + [
        "".join(rng.choice("ab cé中😀") for _ in range(rng.randint(0, 30))) for _ in range(200)
    ]
    for k in (1, 3, 5, 9):
        shingles = [[t[i : i + k] for i in range(len(t) - k + 1)] if len(t) > k else [t] for t in texts]
        flat, offsets = dedup_minhash.shingle_hashes(texts, k)
        per_text = np.split(flat, offsets[1:-1].astype(np.int64))
        assert [h.tolist() for h in per_text] == RMinHash.hash_token_sets(shingles)
        expected = RMinHash.digest_matrix_from_token_sets(shingles, num_perm=32, seed=dedup_minhash.MINHASH_SEED)
        assert dedup_minhash.signatures(texts, 32, k).tolist() == expected.to_rows()
