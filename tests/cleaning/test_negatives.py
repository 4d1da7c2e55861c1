"""Hard-negative mining: exclusions, rank window, margin, determinism, top mode, drops."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ground.settings import CleanSettings
from storage.schemas import DROPPED_SCHEMA
from tasks.cleaning.dedup import dedup_key
from tasks.cleaning.negatives import mine_hard_negatives
from tasks.cleaning.rank_filter import rank_filter


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class Problem:
    """Random corpus; each query a noisy copy of its positive; optionally traps around each positive.

    Traps per row r: a near-duplicate of the positive (cosine > 0.99), the positive's text in other
    case and spacing (vector far enough that only the text test catches it), and a document whose
    text is the query itself (vector = the query vector). All rank at the very top.
    """

    def __init__(
        self, seed: int = 0, nq: int = 80, nc: int = 600, dim: int = 24, traps: bool = False, noise: float = 0.6
    ):
        rng = np.random.default_rng(seed)
        vecs = unit(rng.standard_normal((nc, dim)))
        texts = [f"document {i}" for i in range(nc)]
        self.positive_idx = rng.choice(nc, nq, replace=False)
        self.queries = unit(vecs[self.positive_idx] + noise * unit(rng.standard_normal((nq, dim))))
        self.query_texts = [f"query {r}" for r in range(nq)]
        self.trap_ids: list[set[int]] = [set() for _ in range(nq)]
        if traps:
            extra_vecs, extra_texts = [], []
            for r, p in enumerate(self.positive_idx):
                base = nc + len(extra_texts)
                extra_vecs += [
                    unit(vecs[p] + 0.01 * rng.standard_normal(dim)),
                    unit(vecs[p] + 0.45 * unit(rng.standard_normal(dim))),
                    self.queries[r],
                ]
                extra_texts += [f"document {p} (copy)", f"  DOCUMENT   {p} ", f"Query {r}"]
                self.trap_ids[r] = {base, base + 1, base + 2}
            vecs = np.vstack([vecs, np.array(extra_vecs, dtype=np.float32)])
            texts += extra_texts
        self.corpus, self.texts = vecs, texts
        self.table = pa.table(
            {
                "example_id": [f"run/g00/{i:05d}" for i in range(nq)],
                "run_id": ["run"] * nq,
                "task_type": ["retrieval"] * nq,
                "query": self.query_texts,
                "positive": [texts[p] for p in self.positive_idx],
            }
        )
        self.scores = self.queries @ self.corpus.T

    def filtered(self, cfg: CleanSettings):
        result, found = rank_filter(self.table, self.queries, self.corpus, self.positive_idx, cfg)
        return result.kept, found

    def mine(self, cfg: CleanSettings, table=None, found=None):
        if table is None:
            table, found = self.filtered(cfg)
        ids, scores = found
        return mine_hard_negatives(table, ids, scores, self.texts, self.corpus, self.positive_idx[found.rows], cfg)

    def ids_of(self, texts: list[str]) -> list[int]:
        lookup = {t: i for i, t in enumerate(self.texts)}
        return [lookup[t] for t in texts]

    def rank(self, row: int, corpus_id: int) -> int:
        return 1 + int((self.scores[row] > self.scores[row, corpus_id]).sum())


def row_of(example_id: str) -> int:
    return int(example_id.rsplit("/", 1)[1])


def test_default_window_is_ranks_51_to_100_and_scores_are_exact():
    p = Problem(nq=80, nc=600)
    cfg = CleanSettings()  # k = 50, ranks 50–100, 7 per query, sampled
    mined = p.mine(cfg).kept
    assert mined.num_rows > 30
    assert mined.schema.field("hard_negatives").type == pa.list_(pa.string())
    assert mined.schema.field("hard_negative_scores").type == pa.list_(pa.float32())
    for row in mined.to_pylist():
        r = row_of(row["example_id"])
        negs = p.ids_of(row["hard_negatives"])
        assert len(negs) == 7 == len(set(negs))
        ranks = [p.rank(r, i) for i in negs]
        assert all(51 <= x <= 100 for x in ranks), ranks
        assert ranks == sorted(ranks)  # listed in rank order
        np.testing.assert_allclose(row["hard_negative_scores"], p.scores[r, negs], atol=1e-5)
    # sampling really samples: most rows differ from the 7 best-ranked candidates
    tops = [
        sorted(p.rank(row_of(e), i) for i in p.ids_of(n))
        for e, n in zip(mined.column("example_id").to_pylist(), mined.column("hard_negatives").to_pylist(), strict=True)
    ]
    assert sum(t != list(range(51, 58)) for t in tops) > len(tops) // 2


@pytest.mark.parametrize("mode", ["sample", "top"])
def test_never_positive_query_or_near_duplicate(mode):
    p = Problem(seed=1, traps=True)
    cfg = CleanSettings(rank_top_k=50, negative_rank_min=0, negative_rank_max=30, negative_mode=mode)
    table, found = p.filtered(cfg)
    # the traps do sit inside the window: the test would catch a miner that ignores them
    window = found.ids[:, 0:30]
    in_window = [len(p.trap_ids[r] & set(window[j].tolist())) for j, r in enumerate(found.rows)]
    assert sum(in_window) >= 2 * len(in_window)
    assert all(p.positive_idx[r] in window[j] for j, r in enumerate(found.rows))

    mined = p.mine(cfg, table, found).kept
    assert mined.num_rows == table.num_rows
    for row in mined.to_pylist():
        r = row_of(row["example_id"])
        negs = row["hard_negatives"]
        assert len(negs) == 7
        pos_vec = p.corpus[p.positive_idx[r]]
        for text, i in zip(negs, p.ids_of(negs), strict=True):
            assert i != p.positive_idx[r]
            assert i not in p.trap_ids[r]
            assert dedup_key(text) != dedup_key(row["positive"])
            assert dedup_key(text) != dedup_key(row["query"])
            assert float(p.corpus[i] @ pos_vec) < 0.95


def test_margin_keeps_only_scores_below_margin_times_positive():
    p = Problem(seed=2, noise=0.9)
    base = CleanSettings(negative_rank_min=0, negative_rank_max=60, rank_top_k=60)
    table, found = p.filtered(base)
    margin = 0.8
    pos = table.column("positive_score").to_numpy()
    window_scores = found.scores[:, :60]
    # the margin bites somewhere: some window candidates score >= margin * positive
    assert (window_scores >= margin * pos[:, None]).sum() > 50

    cfg = base.model_copy(update={"negative_margin": margin})
    result = p.mine(cfg, table, found)
    scores_by_id = dict(zip(table.column("example_id").to_pylist(), pos, strict=True))
    for row in result.kept.to_pylist():
        assert row["hard_negative_scores"]
        assert all(s < margin * scores_by_id[row["example_id"]] for s in row["hard_negative_scores"])
    # without the margin the same rows do get such high-scoring negatives
    plain = p.mine(base, table, found).kept.to_pylist()
    assert any(s >= margin * scores_by_id[r["example_id"]] for r in plain for s in r["hard_negative_scores"])


def test_margin_from_search_results_when_table_lacks_positive_score():
    p = Problem(seed=2, noise=0.9)
    cfg = CleanSettings(negative_rank_min=0, negative_rank_max=60, rank_top_k=60, negative_margin=0.8)
    table, found = p.filtered(cfg)
    with_column = p.mine(cfg, table, found).kept
    without = p.mine(cfg, table.drop_columns(["positive_score"]), found).kept
    assert with_column.column("hard_negatives").to_pylist() == without.column("hard_negatives").to_pylist()


def test_sampling_is_deterministic_per_seed_and_row_order_free():
    p = Problem(seed=3)
    cfg = CleanSettings()
    table, found = p.filtered(cfg)
    a = p.mine(cfg, table, found).kept
    b = p.mine(cfg, table, found).kept
    assert a.column("hard_negatives").to_pylist() == b.column("hard_negatives").to_pylist()

    other = p.mine(cfg.model_copy(update={"seed": 7}), table, found).kept
    differ = sum(
        x != y
        for x, y in zip(a.column("hard_negatives").to_pylist(), other.column("hard_negatives").to_pylist(), strict=True)
    )
    assert differ > a.num_rows // 2

    # reversing the rows (and mining in tiny chunks) gives each example the same negatives
    order = np.arange(table.num_rows)[::-1]
    rev = mine_hard_negatives(
        table.take(pa.array(order)),
        found.ids[order],
        found.scores[order],
        p.texts,
        p.corpus,
        p.positive_idx[found.rows][order],
        cfg,
        chunk_rows=3,
    ).kept
    by_id = dict(zip(rev.column("example_id").to_pylist(), rev.column("hard_negatives").to_pylist(), strict=True))
    assert by_id == dict(zip(a.column("example_id").to_pylist(), a.column("hard_negatives").to_pylist(), strict=True))


def test_top_mode_takes_the_best_ranked_usable_candidates():
    p = Problem(seed=4)
    cfg = CleanSettings(negative_mode="top")
    table, found = p.filtered(cfg)
    mined = p.mine(cfg, table, found).kept
    assert mined.num_rows == table.num_rows
    got = [p.ids_of(n) for n in mined.column("hard_negatives").to_pylist()]
    # random data: nothing in the window is excluded, so "top" is exactly result positions 50..56
    assert got == found.ids[:, 50:57].tolist()

    # with traps in a window starting at rank 1, top mode skips them and takes the next ones in order
    q = Problem(seed=5, traps=True)
    cfg0 = CleanSettings(negative_mode="top", negative_rank_min=0, negative_rank_max=40)
    table0, found0 = q.filtered(cfg0)
    mined0 = q.mine(cfg0, table0, found0).kept
    for j, negs in enumerate(mined0.column("hard_negatives").to_pylist()):
        r = int(found0.rows[j])
        usable, seen = [], set()
        for i in found0.ids[j, :40].tolist():
            # other rows' traps repeat texts ("document 8" / "  DOCUMENT   8 "): the better-ranked one counts
            if (
                i != q.positive_idx[r]
                and i not in q.trap_ids[r]
                and dedup_key(q.texts[i]) not in seen
                and float(q.corpus[i] @ q.corpus[q.positive_idx[r]]) < 0.95
            ):
                usable.append(i)
                seen.add(dedup_key(q.texts[i]))
        assert q.ids_of(negs) == usable[:7]


def test_rows_without_usable_negatives_are_dropped():
    p = Problem(seed=6)
    cfg = CleanSettings(negative_margin=0.01)  # nearly everything scores above 1% of the positive
    table, found = p.filtered(cfg)
    positive = table.column("positive_score").to_numpy()
    window = found.scores[:, 50:100]
    expect_drop = ~(window < 0.01 * positive[:, None]).any(axis=1)
    assert expect_drop.any()
    result = p.mine(cfg, table, found)
    dropped = result.dropped
    assert dropped.schema.equals(DROPPED_SCHEMA, check_metadata=False)
    assert sorted(dropped.column("example_id").to_pylist()) == sorted(
        np.array(table.column("example_id").to_pylist())[expect_drop].tolist()
    )
    assert set(dropped.column("stage").to_pylist()) == {"negatives"}
    assert set(dropped.column("reason").to_pylist()) == {"no_hard_negatives"}
    assert result.kept.num_rows + dropped.num_rows == table.num_rows


def test_zero_negatives_per_query_keeps_every_row_with_empty_lists():
    p = Problem(seed=6)
    cfg = CleanSettings(negatives_per_query=0)
    result = p.mine(cfg)
    assert result.dropped.num_rows == 0
    assert all(n == [] for n in result.kept.column("hard_negatives").to_pylist())


def test_repeated_texts_in_window_are_taken_once():
    """Two corpus items with the same normalized text (different vectors) never both become negatives."""
    dim = 6
    e = np.eye(dim, dtype=np.float32)
    # positive e0; candidates in descending score: "b", "B " (same text), "c", "d"
    corpus = unit(np.stack([e[0], e[0] + 1.2 * e[1], e[0] + 1.3 * e[1] + 0.2 * e[3], e[0] + 2 * e[2], e[0] + 3 * e[4]]))
    texts = ["pos", "b", "B ", "c", "d"]
    query = unit(e[0][None, :])
    table = pa.table({"example_id": ["x"], "run_id": ["r"], "task_type": ["sts"], "query": ["q"]})
    cfg = CleanSettings(
        negative_rank_min=1, negative_rank_max=5, negatives_per_query=4, negative_mode="top", rank_top_k=1
    )
    ids = np.argsort(-(query @ corpus.T), axis=1)
    scores = np.take_along_axis(query @ corpus.T, ids, axis=1)
    assert ids[0].tolist() == [0, 1, 2, 3, 4]
    mined = mine_hard_negatives(table, ids, scores, texts, corpus, np.array([0]), cfg).kept
    assert mined.column("hard_negatives").to_pylist() == [["b", "c", "d"]]


@pytest.mark.parametrize("mode", ["sample", "top"])
def test_filter_and_mine_per_block_equals_one_block(mode):
    """Blocks of any size, concatenated, are the one-block result: same rows, order, columns and values
    (mining is seeded per row, the text groups are the corpus's); the corpus texts may be a list or Arrow."""
    from tasks.cleaning.embed import RankingVectors
    from tasks.cleaning.negatives import filter_and_mine

    p = Problem(seed=3, nq=90, nc=500, traps=True, noise=2.0)
    cfg = CleanSettings(negative_mode=mode, rank_top_k=8, negative_rank_min=3, negative_rank_max=40)
    table = p.table.append_column("negative", pa.array([None] * p.table.num_rows, pa.string()))
    listed = RankingVectors(p.queries, p.texts, p.corpus, np.asarray(p.positive_idx, dtype=np.int64))
    whole = filter_and_mine(table, listed, cfg, block_rows=table.num_rows)
    assert 0 < whole[1].kept.num_rows < table.num_rows and whole[0].dropped.num_rows, "the filter must drop some"
    arrow = RankingVectors(p.queries, pa.array(p.texts, pa.large_string()), p.corpus, listed.positive_idx)
    for block_rows, vectors in ((1, listed), (7, arrow), (32, listed), (89, arrow)):
        parts = filter_and_mine(table, vectors, cfg, block_rows=block_rows)
        for got, want in zip(parts, whole, strict=True):
            assert got.kept.equals(want.kept), f"blocks of {block_rows}: kept rows differ"
            assert got.dropped.equals(want.dropped), f"blocks of {block_rows}: dropped rows differ"
