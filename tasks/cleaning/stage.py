"""The contract of a cleaning stage, datatrove-style: a small class that says what it is and what it does.

A stage declares its ``name`` (the ``stage`` of every row it drops) and implements ``run(rows) ->
StageResult``: the rows it kept and the rows it dropped (``storage.corpus.StageResult``). Which tables
it reads and writes is the registry's (``storage/stages.py``), not the stage's: the flow
(``flows/clean.py``) reads a stage's input table, calls it and commits what it returns.

Two kinds, which the clean flow's executor (``flows/clean.py``, ``run_stages``) runs in bounded memory:

* a **global** stage needs every row at once (exact and near dedup compare all rows, the ranking search
  ranks each query against the whole corpus): it implements :meth:`Stage.run` over a whole table;
* a **streamed** stage decides each row alone (``streamed = True``): it implements
  :meth:`Stage.run_batch` over one Arrow record batch, and :meth:`Stage.run` is only the concatenation
  of its batches. The executor feeds it batches of its ``batch_rows`` read from its input's Parquet file
  (``storage/stage_io.py``) and appends each result's kept and dropped rows to the stage's writers,
  committed when the stage is done, so memory stays bounded by the batch size.

A :class:`Filter` is a streamed stage that only says which rows go and why (:meth:`Filter.drops`);
the base builds the kept and the dropped tables, once, for every filter (``StageResult.split``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import pyarrow as pa

from storage.corpus import Drops, StageResult
from storage.stage_io import BATCH_ROWS


class Stage(ABC):
    """One cleaning stage: ``name`` and ``run(rows) -> StageResult`` (a streamed one: ``run_batch``)."""

    name: ClassVar[str]
    #: True: each row is decided alone, so the stage may be fed one record batch at a time
    streamed: ClassVar[bool] = False
    #: rows per batch when :meth:`run` feeds a streamed stage a whole table (zero-copy slices)
    batch_rows: ClassVar[int] = BATCH_ROWS

    def run(self, rows: pa.Table) -> StageResult:
        """Kept and dropped rows of a whole table (a streamed stage: its batches', concatenated)."""
        if not self.streamed:
            raise NotImplementedError(f"{type(self).__name__}: a global stage implements run()")
        step = self.batch_rows
        results = [self.run_batch(rows.slice(start, step)) for start in range(0, rows.num_rows, step)]
        if not results:
            return StageResult.keep_all(rows)
        return StageResult(pa.concat_tables([r.kept for r in results]), pa.concat_tables([r.dropped for r in results]))

    def run_batch(self, batch: pa.RecordBatch | pa.Table) -> StageResult:
        """Kept and dropped rows of one record batch (a streamed stage only)."""
        raise NotImplementedError(f"{type(self).__name__} is a global stage: it needs the whole table")


class Filter(Stage):
    """A streamed stage that only drops rows: :meth:`drops` says which and why; the rows are kept as they are."""

    streamed = True

    @abstractmethod
    def drops(self, rows: pa.Table) -> Drops:
        """The positions in ``rows`` to drop, each with its reason and detail."""

    def run_batch(self, batch: pa.RecordBatch | pa.Table) -> StageResult:
        rows = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        return StageResult.split(rows, self.name, self.drops(rows))
