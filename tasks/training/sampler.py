"""Semi-homogeneous task batches for contrastive training (KaLM-Embedding).

KaLM trains with batches drawn mostly from one task type, so that the in-batch negatives of a
query are texts of the same kind (a retrieval query is contrasted with other passages, not with
bitext sentences). :class:`SemiHomogeneousTaskBatchSampler` makes such batches:

* ``h = round(homogeneous_ratio * batch_size)`` rows of every full batch come from one task (the
  *homogeneous part*), the other ``batch_size - h`` rows are drawn from the remaining rows of any
  task, in a random order (the *mixed part*, which can include more rows of the same task).
  Ratio 1: every batch is one task type; ratio 0: plain random batches.
* The task of a batch is drawn with probability proportional to the rows it has left, so the
  task types are interleaved over the epoch in proportion to their size.
* No text twice in a batch (like sentence-transformers' ``NoDuplicatesBatchSampler``): a text that
  is the anchor, positive or a negative of one row is never any text of another row of the same
  batch (an in-batch "negative" equal to the positive would be a false negative). A row may repeat
  its own texts (e.g. padded negatives).
* Every row is used at most once per epoch. The order depends only on ``seed``, ``epoch``
  (:meth:`set_epoch`) and the inputs.

**Leftovers.** Full batches are built until no task has ``h`` usable rows left, fewer than
``batch_size`` rows are left, or the remaining rows cannot fill a batch without a duplicate text.
With distinct texts this leaves fewer than ``max(batch_size, T * h)`` rows (``T`` task types);
at ratio 1 exactly ``sum(rows_t mod batch_size)``. The leftover rows are

* ``drop_last=False`` (default): yielded at the end of the epoch as smaller *single-task* batches
  (so they still satisfy the ratio and have no duplicate text), so every row is used every epoch;
* ``drop_last=True``: dropped for this epoch (the shuffle differs each epoch, so other rows drop).

:meth:`epoch_stats` reports batches, rows used, rows dropped and leftovers per task; the numbers
are also logged once per epoch.

Use with sentence-transformers (6.2): the trainer calls ``batch_sampler(dataset, batch_size=...,
drop_last=..., valid_label_columns=..., generator=..., seed=...)``; task labels are not a model
input (the data collator tokenizes every column), so pass them separately through
:meth:`SemiHomogeneousTaskBatchSampler.factory`::

    args = SentenceTransformerTrainingArguments(
        ..., batch_sampler=SemiHomogeneousTaskBatchSampler.factory(task_labels, homogeneous_ratio=1.0))

Without explicit ``texts`` the texts of a row are the string columns of the dataset.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sentence_transformers.base.sampler import DefaultBatchSampler

log = logging.getLogger(__name__)

_PAD = -1  # Python's hash() never returns -1, so it can pad rows with fewer texts


@dataclass(frozen=True)
class EpochStats:
    """How one epoch's rows were batched."""

    epoch: int
    rows: int
    batches: int
    full_batches: int
    partial_batches: int  # leftover single-task batches (drop_last=False)
    rows_in_batches: int
    rows_dropped: int  # leftover rows not yielded (drop_last=True)
    leftover_by_task: dict[Any, int] = field(default_factory=dict)  # rows not in a full batch, per task

    @property
    def rows_leftover(self) -> int:
        return sum(self.leftover_by_task.values())


class _Pool:
    """A doubly linked list over row ids in a fixed order, with O(1) removal of any row."""

    __slots__ = ("nxt", "prv", "head", "size")

    def __init__(self, order: np.ndarray, capacity: int):
        self.nxt = np.full(capacity, -1, dtype=np.int64)
        self.prv = np.full(capacity, -1, dtype=np.int64)
        order = np.asarray(order, dtype=np.int64)
        if len(order):
            self.nxt[order[:-1]] = order[1:]
            self.prv[order[1:]] = order[:-1]
        self.head = int(order[0]) if len(order) else -1
        self.size = len(order)

    def __iter__(self) -> Iterator[int]:
        node = self.head
        nxt = self.nxt
        while node != -1:
            following = int(nxt[node])  # read first: the caller may remove `node`
            yield node
            node = following

    def remove(self, row: int) -> None:
        before, after = int(self.prv[row]), int(self.nxt[row])
        if before == -1:
            self.head = after
        else:
            self.nxt[before] = after
        if after != -1:
            self.prv[after] = before
        self.size -= 1


class SemiHomogeneousTaskBatchSampler(DefaultBatchSampler):
    """Batches of ``batch_size`` rows, ``round(homogeneous_ratio * batch_size)`` of them from one task.

    Args:
        dataset: the dataset (only its length and, without ``task_labels``/``texts``, its columns
            are read); may be None when ``task_labels`` is given.
        batch_size: rows per batch.
        drop_last: drop the leftover rows instead of yielding them as smaller single-task batches.
        valid_label_columns, generator: accepted for sentence-transformers compatibility, unused
            (the order comes from a NumPy generator seeded with ``(seed, epoch)``).
        seed: the shuffle seed; with :meth:`set_epoch` it fixes the batches.
        task_labels: the task of each row (any hashable); None: the dataset's ``task_column``.
        homogeneous_ratio: share of each batch from one task, in [0, 1].
        texts: the texts of each row (a sequence of strings per row) that must not repeat within a
            batch; None: the string columns of the dataset (except ``task_column``), or no
            duplicate check when the dataset has no columns.
        task_column: the dataset column holding task labels when ``task_labels`` is None.
        duplicates: which repeated texts keep two rows out of one batch. ``"all"`` (default, like
            ``NoDuplicatesBatchSampler``): any text shared by two rows. ``"false_negatives"``: only
            overlaps that make a false negative, i.e. one of the first ``key_texts`` texts of a row
            (anchor and positive) appearing anywhere in another row; two rows may then share a hard
            negative (it is merely counted twice in the softmax denominator).
        key_texts: how many leading texts of a row are its anchor and positive(s).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        drop_last: bool = False,
        valid_label_columns: list[str] | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
        *,
        task_labels: Sequence[Hashable] | None = None,
        homogeneous_ratio: float = 1.0,
        texts: Sequence[Sequence[str]] | None = None,
        task_column: str = "task_name",
        duplicates: str = "all",
        key_texts: int = 2,
    ) -> None:
        if task_labels is None:
            if dataset is None or task_column not in getattr(dataset, "column_names", ()):
                raise ValueError(f"give task_labels, or a dataset with a {task_column!r} column")
            task_labels = list(dataset[task_column])
        task_labels = list(task_labels)
        n = len(task_labels)
        if dataset is None:
            dataset = range(n)
        if len(dataset) != n:
            raise ValueError(f"{n} task labels for a dataset of {len(dataset)} rows")
        if not 0.0 <= float(homogeneous_ratio) <= 1.0:
            raise ValueError(f"homogeneous_ratio must be in [0, 1], got {homogeneous_ratio}")
        super().__init__(
            dataset,
            batch_size=batch_size,
            drop_last=drop_last,
            valid_label_columns=valid_label_columns,
            generator=generator,
            seed=seed,
        )
        self.dataset = dataset
        self.homogeneous_ratio = float(homogeneous_ratio)
        #: rows of each full batch that come from the batch's task
        self.homogeneous_rows = int(round(self.homogeneous_ratio * self.batch_size))
        self.task_labels = task_labels
        self.tasks: list[Hashable] = list(dict.fromkeys(task_labels))  # first-appearance order
        task_index = {task: i for i, task in enumerate(self.tasks)}
        self._task_ids = np.fromiter((task_index[t] for t in task_labels), dtype=np.int64, count=n)
        if texts is None:
            texts = _dataset_texts(dataset, exclude=(task_column,))
        if duplicates not in ("all", "false_negatives"):
            raise ValueError(f"duplicates must be 'all' or 'false_negatives', got {duplicates!r}")
        self.duplicates = duplicates
        self._hashes = _hash_texts(texts, n)
        self._key_hashes = _hash_texts([row[:key_texts] for row in texts], n) if texts is not None else None
        self._plans: dict[int, tuple[list[list[int]], EpochStats]] = {}

    # --- sentence-transformers integration ---------------------------------------------------
    @classmethod
    def factory(
        cls,
        task_labels: Sequence[Hashable],
        homogeneous_ratio: float = 1.0,
        texts: Sequence[Sequence[str]] | None = None,
        seed: int | None = None,
        duplicates: str = "all",
    ) -> Callable[..., SemiHomogeneousTaskBatchSampler]:
        """A callable for ``SentenceTransformerTrainingArguments(batch_sampler=...)``.

        The trainer calls it with ``(dataset, batch_size=, drop_last=, valid_label_columns=,
        generator=, seed=)``; ``seed`` here (None: the trainer's ``args.seed``) overrides it.
        """
        labels = list(task_labels)
        fixed_seed = seed

        def make(dataset, batch_size, drop_last=False, valid_label_columns=None, generator=None, seed=0):
            return cls(
                dataset,
                batch_size=batch_size,
                drop_last=drop_last,
                valid_label_columns=valid_label_columns,
                generator=generator,
                seed=seed if fixed_seed is None else fixed_seed,
                task_labels=labels,
                homogeneous_ratio=homogeneous_ratio,
                texts=texts,
                duplicates=duplicates,
            )

        return make

    # --- the sampler protocol ------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[int]]:
        batches, _ = self._plan(self.epoch)
        for batch in batches:
            yield list(batch)

    def __len__(self) -> int:
        """The exact number of batches of the current epoch (the epoch is planned to count them)."""
        return len(self._plan(self.epoch)[0])

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """The batches of ``epoch`` (default: the current one), as lists of row indices."""
        return [list(b) for b in self._plan(self.epoch if epoch is None else epoch)[0]]

    def epoch_stats(self, epoch: int | None = None) -> EpochStats:
        """How the rows of ``epoch`` (default: the current one) were batched, dropped or left over."""
        return self._plan(self.epoch if epoch is None else epoch)[1]

    # --- planning ------------------------------------------------------------------------------
    def _plan(self, epoch: int) -> tuple[list[list[int]], EpochStats]:
        if epoch not in self._plans:
            if len(self._plans) > 4:  # keep a few epochs, not all of a long run
                self._plans.pop(next(iter(self._plans)))
            self._plans[epoch] = self._build(epoch)
            stats = self._plans[epoch][1]
            log.info(
                "epoch %d: %d batches (%d full, %d partial) over %d of %d rows; %d rows left over %s, %d dropped",
                epoch,
                stats.batches,
                stats.full_batches,
                stats.partial_batches,
                stats.rows_in_batches,
                stats.rows,
                stats.rows_leftover,
                stats.leftover_by_task,
                stats.rows_dropped,
            )
        return self._plans[epoch]

    def _build(self, epoch: int) -> tuple[list[list[int]], EpochStats]:
        n = len(self.task_labels)
        size, h = self.batch_size, self.homogeneous_rows
        rng = np.random.default_rng(np.random.SeedSequence([int(self.seed or 0) % 2**63, int(epoch) % 2**63]))
        hashes, key_hashes = self._hashes, self._key_hashes
        strict = self.duplicates == "all"

        def texts_of(table: np.ndarray | None, row: int) -> list[int]:
            return [x for x in table[row].tolist() if x != _PAD] if table is not None else []

        class Seen:
            """The texts of a batch so far; which overlaps count depends on ``duplicates``."""

            def __init__(self) -> None:
                self.all: set[int] = set()
                self.key: set[int] = set()

            def admits(self, row: int) -> tuple[bool, list[int], list[int]]:
                row_all = texts_of(hashes, row)
                if strict:
                    return self.all.isdisjoint(row_all), row_all, []
                row_key = texts_of(key_hashes, row)
                ok = self.all.isdisjoint(row_key) and self.key.isdisjoint(row_all)
                return ok, row_all, row_key

            def add(self, row_all: list[int], row_key: list[int]) -> None:
                self.all.update(row_all)
                self.key.update(row_key)

        everything = _Pool(rng.permutation(n), n)
        task_pools = []
        for t in range(len(self.tasks)):
            rows = np.flatnonzero(self._task_ids == t)
            task_pools.append(_Pool(rows[rng.permutation(len(rows))], n))

        def take(row: int) -> None:
            everything.remove(row)
            task_pools[int(self._task_ids[row])].remove(row)

        def fill(pool: _Pool, want: int, batch: list[int], batch_set: set[int], seen: Seen) -> bool:
            """Add up to ``want`` rows of ``pool`` without a repeated text; True if all were found."""
            got = 0
            for row in pool:
                if got == want:
                    break
                if row in batch_set:
                    continue
                ok, row_all, row_key = seen.admits(row)
                if not ok:
                    continue  # deferred: it may fit a later batch
                batch.append(row)
                batch_set.add(row)
                seen.add(row_all, row_key)
                got += 1
            return got == want

        batches: list[list[int]] = []
        blocked: set[int] = set()  # tasks whose rows cannot fill a homogeneous part any more
        while everything.size >= size:
            batch: list[int] = []
            batch_set: set[int] = set()
            seen = Seen()
            if h > 0:
                candidates = [t for t, pool in enumerate(task_pools) if pool.size >= h and t not in blocked]
                if not candidates:
                    break
                weights = np.array([task_pools[t].size for t in candidates], dtype=np.float64)
                task = candidates[int(rng.choice(len(candidates), p=weights / weights.sum()))]
                if not fill(task_pools[task], h, batch, batch_set, seen):
                    blocked.add(task)  # from an empty batch: only its own duplicates stood in the way
                    continue
            if not fill(everything, size - h, batch, batch_set, seen):
                break  # the rows left cannot make a batch without a duplicate text
            for row in batch:
                take(row)
            batches.append(batch)

        full = len(batches)
        leftover = [row for row in everything]
        leftover_by_task = Counter(self.tasks[int(self._task_ids[row])] for row in leftover)
        dropped = 0
        if self.drop_last:
            dropped = len(leftover)
        else:
            # single-task batches of at most batch_size rows, still without a repeated text
            for pool in task_pools:
                while pool.size:
                    batch, batch_set, seen = [], set(), Seen()
                    fill(pool, min(size, pool.size), batch, batch_set, seen)
                    for row in batch:
                        take(row)
                    batches.append(batch)
        stats = EpochStats(
            epoch=epoch,
            rows=n,
            batches=len(batches),
            full_batches=full,
            partial_batches=len(batches) - full,
            rows_in_batches=sum(len(b) for b in batches),
            rows_dropped=dropped,
            leftover_by_task=dict(leftover_by_task),
        )
        return batches, stats


def _dataset_texts(dataset: Any, exclude: Sequence[str] = ()) -> list[list[str]] | None:
    """The string values of each row of a Hugging Face dataset (None: no columns to read)."""
    names = [c for c in getattr(dataset, "column_names", None) or () if c not in exclude]
    features = getattr(dataset, "features", None) or {}
    columns = []
    for name in names:
        dtype = getattr(features.get(name), "dtype", None)
        if dtype in ("string", "large_string"):
            columns.append(list(dataset[name]))
    if not columns:
        return None
    return [[v for v in row if isinstance(v, str)] for row in zip(*columns, strict=True)]


def _hash_texts(texts: Sequence[Sequence[str]] | None, n: int) -> np.ndarray | None:
    """One row of text hashes per dataset row, padded with ``_PAD`` (None: no duplicate check).

    Python's ``hash`` is salted per process, but only equality is used, so the batches do not
    depend on the salt (barring a 64-bit collision, which would merely defer a row).
    """
    if texts is None:
        return None
    if len(texts) != n:
        raise ValueError(f"texts for {len(texts)} rows, but {n} task labels")
    rows = [list(dict.fromkeys(hash(t) for t in row if t is not None)) for row in texts]
    width = max((len(r) for r in rows), default=0)
    out = np.full((n, max(width, 1)), _PAD, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
