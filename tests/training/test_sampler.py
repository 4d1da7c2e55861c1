"""SemiHomogeneousTaskBatchSampler: properties (hypothesis) and sentence-transformers integration."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sentence_transformers.base.sampler import DefaultBatchSampler

from tasks.training.sampler import SemiHomogeneousTaskBatchSampler


@st.composite
def datasets(draw, min_rows: int = 0, max_rows: int = 120, duplicates: bool = True):
    """Task labels and per-row texts; with ``duplicates`` texts are drawn from a small vocabulary."""
    n = draw(st.integers(min_rows, max_rows))
    tasks = draw(st.integers(1, 5))
    labels = draw(st.lists(st.sampled_from([f"task{t}" for t in range(tasks)]), min_size=n, max_size=n))
    if duplicates:
        vocab = draw(st.integers(max(1, n // 2), 4 * n + 4))
        texts = draw(
            st.lists(
                st.lists(st.integers(0, vocab - 1).map(lambda v: f"text {v}"), min_size=1, max_size=4),
                min_size=n,
                max_size=n,
            )
        )
    else:
        texts = [[f"anchor {i}", f"positive {i}", f"negative {i}"] for i in range(n)]
    return labels, texts


common = dict(
    batch_size=st.integers(2, 16),
    ratio=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32),
    drop_last=st.booleans(),
)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make(labels, texts, batch_size, ratio, seed, drop_last, **kw):
    return SemiHomogeneousTaskBatchSampler(
        None,
        batch_size=batch_size,
        drop_last=drop_last,
        seed=seed,
        task_labels=labels,
        texts=texts,
        homogeneous_ratio=ratio,
        **kw,
    )


def shared_texts(batch, texts):
    """Texts that occur in two different rows of the batch (repeats within one row do not count)."""
    count = Counter(t for row in batch for t in set(texts[row]))
    return {t for t, c in count.items() if c > 1}


@SETTINGS
@given(data=datasets(), **common)
def test_batch_properties(data, batch_size, ratio, seed, drop_last):
    labels, texts = data
    sampler = make(labels, texts, batch_size, ratio, seed, drop_last)
    batches = list(sampler)
    share = round(ratio * batch_size)
    stats = sampler.epoch_stats()
    assert len(sampler) == len(batches) == stats.batches

    used = [row for batch in batches for row in batch]
    assert len(used) == len(set(used)), "a row twice in one epoch"
    assert set(used) <= set(range(len(labels)))
    if drop_last:
        assert len(used) + stats.rows_dropped == len(labels)
    else:
        assert sorted(used) == list(range(len(labels))), "drop_last=False uses every row"
        assert stats.rows_dropped == 0

    full = batches[: stats.full_batches]
    for batch in full:
        assert len(batch) == batch_size
        dominant = Counter(labels[row] for row in batch).most_common(1)[0][1]
        assert dominant >= share, (batch, [labels[r] for r in batch])
    for batch in batches[stats.full_batches :]:  # leftovers: smaller, single-task batches
        assert not drop_last
        assert 0 < len(batch) <= batch_size
        assert len({labels[row] for row in batch}) == 1
    for batch in batches:
        assert not shared_texts(batch, texts)
    assert stats.rows_leftover == len(labels) - batch_size * stats.full_batches


@SETTINGS
@given(data=datasets(duplicates=False), **common)
def test_few_rows_left_over_when_texts_are_distinct(data, batch_size, ratio, seed, drop_last):
    """Greedy filling stops only when no task has a homogeneous share or a batch's worth is left."""
    labels, texts = data
    sampler = make(labels, texts, batch_size, ratio, seed, drop_last)
    stats = sampler.epoch_stats()
    share = round(ratio * batch_size)
    tasks = len(set(labels))
    assert stats.rows_leftover < max(batch_size, tasks * share)
    if share == batch_size:  # ratio 1: exactly the per-task remainders
        per_task = Counter(labels)
        assert stats.full_batches == sum(c // batch_size for c in per_task.values())


@SETTINGS
@given(data=datasets(), **common, epoch=st.integers(0, 5))
def test_deterministic_for_seed_and_epoch(data, batch_size, ratio, seed, drop_last, epoch):
    labels, texts = data
    a = make(labels, texts, batch_size, ratio, seed, drop_last)
    b = make(labels, texts, batch_size, ratio, seed, drop_last)
    a.set_epoch(epoch)
    b.set_epoch(epoch)
    assert list(a) == list(b)
    assert a.batches(epoch) == list(b)


def test_epoch_and_seed_change_the_order():
    labels = [f"t{i % 3}" for i in range(300)]
    texts = [[f"q{i}", f"p{i}"] for i in range(300)]
    sampler = make(labels, texts, 8, 0.5, seed=1, drop_last=True)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(make(labels, texts, 8, 0.5, seed=2, drop_last=True)) != first


def test_ratio_one_is_homogeneous_and_zero_mixes():
    labels = ["a"] * 64 + ["b"] * 64
    texts = [[f"q{i}"] for i in range(128)]
    homogeneous = make(labels, texts, 16, 1.0, seed=0, drop_last=True)
    assert all(len({labels[r] for r in b}) == 1 for b in homogeneous)
    assert len(homogeneous) == 8
    # the task of successive batches is drawn at random, not task after task
    order = [labels[b[0]] for b in homogeneous]
    assert order != sorted(order)
    mixed = make(labels, texts, 16, 0.0, seed=0, drop_last=True)
    assert sum(len({labels[r] for r in b}) > 1 for b in mixed) >= 6
    half = make(labels, texts, 16, 0.5, seed=0, drop_last=True)
    for batch in half:
        assert max(Counter(labels[r] for r in batch).values()) >= 8


def test_duplicate_text_is_kept_out_of_a_batch():
    # rows 0 and 1 share a negative; with batch size 2 and one task they can never be together
    labels = ["a"] * 4
    texts = [["q0", "p0", "shared"], ["q1", "p1", "shared"], ["q2", "p2", "x"], ["q3", "p3", "y"]]
    for seed in range(20):
        batches = list(make(labels, texts, 2, 1.0, seed=seed, drop_last=False))
        assert all({0, 1} - set(b) for b in batches)
        assert sorted(r for b in batches for r in b) == [0, 1, 2, 3]


def test_false_negative_mode_allows_shared_negatives_only():
    labels = ["a"] * 4
    texts = [["q0", "p0", "shared"], ["q1", "p1", "shared"], ["q2", "p2", "p0"], ["q3", "p3", "z"]]
    seen_pair = False
    for seed in range(30):
        sampler = make(labels, texts, 2, 1.0, seed=seed, drop_last=False, duplicates="false_negatives")
        for batch in sampler:
            assert {0, 2} - set(batch), "row 2's negative is row 0's positive: a false negative"
            seen_pair |= set(batch) == {0, 1}
    assert seen_pair, "rows that only share a hard negative may share a batch"


def test_validation():
    with pytest.raises(ValueError):
        make(["a", "b"], None, 2, 1.5, seed=0, drop_last=False)
    with pytest.raises(ValueError):
        SemiHomogeneousTaskBatchSampler(list(range(3)), 2, task_labels=["a", "b"])
    with pytest.raises(ValueError):
        make(["a"], [["x"], ["y"]], 2, 1.0, seed=0, drop_last=False)
    with pytest.raises(ValueError):
        make(["a"], None, 2, 1.0, seed=0, drop_last=False, duplicates="some")


def test_factory_matches_the_trainer_call_and_reads_texts_from_the_dataset():
    from datasets import Dataset

    rows = 12
    ds = Dataset.from_dict(
        {
            "anchor": [f"q{i}" for i in range(rows)],
            "positive": [f"p{i}" for i in range(rows)],
            # rows i and i+6 share their negative
            "negative_1": [f"n{i % 6}" for i in range(rows)],
        }
    )
    labels = ["x"] * rows
    make_sampler = SemiHomogeneousTaskBatchSampler.factory(labels, homogeneous_ratio=1.0)
    # exactly how SentenceTransformerTrainer.get_batch_sampler calls a custom callable
    sampler = make_sampler(
        ds, batch_size=6, drop_last=False, valid_label_columns=["label"], generator=torch.Generator(), seed=7
    )
    assert isinstance(sampler, DefaultBatchSampler)
    assert sampler.seed == 7 and sampler.batch_size == 6
    for batch in sampler:
        negatives = [ds[r]["negative_1"] for r in batch]
        assert len(negatives) == len(set(negatives))
    assert sorted(r for b in sampler for r in b) == list(range(rows))
    # a fixed seed in the factory wins over the trainer's
    assert SemiHomogeneousTaskBatchSampler.factory(labels, seed=3)(ds, 6, False, seed=7).seed == 3


def test_task_column_of_the_dataset():
    from datasets import Dataset

    ds = Dataset.from_dict({"anchor": [f"q{i}" for i in range(8)], "task_name": ["a", "b"] * 4})
    sampler = SemiHomogeneousTaskBatchSampler(ds, batch_size=4, drop_last=True, seed=0)
    assert sampler.tasks == ["a", "b"]
    for batch in sampler:
        assert len({ds[r]["task_name"] for r in batch}) == 1
