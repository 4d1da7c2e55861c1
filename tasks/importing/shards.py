"""An import's records as the example shards of one run: rows in ``EXAMPLE_SCHEMA``, lineage beside them.

Records are read in order (input by input, line by line) and cut into shards of ``shard_rows`` rows
(``imp-00000``, ``imp-00001``, ...). Each shard is committed as the generate flow commits its own:
lineage first (``storage/lineage.py``), then ``RunStore.write_shard`` (rejects, then the data file: the
commit point, then the manifest). Because the cut depends only on the inputs and the options, a re-run
of the same import after a crash reads the inputs again and skips every shard already committed, so the
run ends equal to an uninterrupted import, without a lost or doubled row.

An imported row has no generation lineage: ``model`` is ``imported``, ``prompt_version`` ``import``;
persona, instruction id, finish reason and raw text are null; placeholders and sampling ``{}``; tokens,
attempts and latency 0. Validation reads none of those but ``placeholders`` (the language check, which
then has no requested language) and ``instruction`` (the leak check, which skips a null one).

A bad line (not a JSON object, a missing or mistyped field) stops the import with one ``file:line: what``
error, or with ``skip_invalid`` is counted and kept as a reject (stage ``import``, the location and the
problem in ``raw_text``) in the shard it would have been part of.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from storage.lineage import write_lineage
from storage.shards import RunStore, reject_row
from tasks.importing.layouts import MAPPERS, LayoutProblem, RecordProblem, RowDefaults, detect_layout, to_row_fields
from tasks.importing.readers import BadLine, ImportFileError, Source, read_records

SOURCE = "imported"
MODEL = "imported"
PROMPT_VERSION = "import"
STAGE = "import"
#: rows per shard by default: a few tens of MB of Python rows while one is built
SHARD_ROWS = 20_000

ShardDone = Callable[[str, int, bool], None]


@dataclass(frozen=True)
class ImportOptions:
    """How records become rows (stored with the run: resuming with other options is refused)."""

    task_type: str = "retrieval"  # for records whose task_name is not one of the six task types
    instruction: str | None = None  # for records without one
    skip_invalid: bool = False
    shard_rows: int = SHARD_ROWS

    def __post_init__(self) -> None:
        RowDefaults(self.task_type, self.instruction)  # checks the task type
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows must be at least 1, not {self.shard_rows}")


@dataclass
class ImportTally:
    """What an import read and wrote (a resumed import counts the shards it skipped, too)."""

    rows: int = 0
    by_type: Counter = field(default_factory=Counter)
    layouts: dict[str, str] = field(default_factory=dict)  # input -> layout
    bad_lines: int = 0
    first_bad: str | None = None
    texts_left_out: int = 0  # positives and negatives after the first of a record
    shards_written: int = 0
    shards_skipped: int = 0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "by_type": dict(self.by_type)}


def default_import_id(paths: list[str]) -> str:
    """``import-<name of the first input>``: the same command again resumes (or finds done) the same run."""
    name = paths[0].rstrip("/").rsplit("/", 1)[-1] if paths else "data"
    for suffix in (".gz", ".jsonl", ".json", ".ndjson", ".parquet"):
        name = name.removesuffix(suffix)
    return "import-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:60] or "data")


class _ShardWriter:
    """Collects rows, lineage and rejects of the shard being built; commits it unless already committed."""

    def __init__(self, store: RunStore, created_at: datetime, tally: ImportTally, on_shard: ShardDone):
        self.store, self.created_at, self.tally, self.on_shard = store, created_at, tally, on_shard
        self.index = 0
        self.rows: list[dict[str, Any]] = []
        self.lineage: list[dict[str, Any]] = []
        self.rejects: list[dict[str, Any]] = []

    @property
    def shard_id(self) -> str:
        return f"imp-{self.index:05d}"

    def next_example_id(self) -> str:
        return f"{self.store.run_id}:{self.shard_id}-{len(self.rows):06d}"

    def add(self, fields: dict[str, Any], source: Source, line: int, layout: str) -> None:
        example_id = self.next_example_id()
        self.rows.append(
            {
                "example_id": example_id,
                "run_id": self.store.run_id,
                "shard_id": self.shard_id,
                "instruction_id": None,
                "persona_id": None,
                "persona": None,
                "placeholders": "{}",
                "prompt_version": PROMPT_VERSION,
                "model": MODEL,
                "sampling": "{}",
                "attempts": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "latency_s": 0.0,
                "finish_reason": None,
                "raw_text": None,
                "created_at": self.created_at,
                **fields,
            }
        )
        self.lineage.append(
            {
                "example_id": example_id,
                "run_id": self.store.run_id,
                "source": SOURCE,
                "file": source.location,
                "line": line,
                "layout": layout,
            }
        )

    def reject(self, where: str, problem: str, task_type: str) -> None:
        self.rejects.append(
            reject_row(
                example_id=f"{self.store.run_id}:{self.shard_id}-x{len(self.rejects):06d}",
                run_id=self.store.run_id,
                shard_id=self.shard_id,
                stage=STAGE,
                task_type=task_type,
                instruction=None,
                persona_id=None,
                prompt_version=PROMPT_VERSION,
                model=MODEL,
                attempts=0,
                reason="invalid record",
                finish_reason=None,
                raw_text=f"{where}: {problem}",
                created_at=self.created_at,
            )
        )

    def commit(self) -> None:
        if not self.rows and not self.rejects:
            return
        written = not self.store.is_complete("examples", self.shard_id)
        if written:
            write_lineage(self.store, self.shard_id, self.lineage)
            self.store.write_shard("examples", self.shard_id, self.rows, self.rejects)
        self.tally.shards_written += written
        self.tally.shards_skipped += not written
        self.on_shard(self.shard_id, len(self.rows), written)
        self.index += 1
        self.rows, self.lineage, self.rejects = [], [], []


def import_records(
    store: RunStore,
    sources: list[Source],
    options: ImportOptions,
    created_at: datetime,
    on_shard: ShardDone = lambda shard_id, rows, written: None,
) -> ImportTally:
    """Read ``sources`` into shards of ``store`` (skipping committed ones); ImportFileError on a bad input.

    ``on_shard(shard_id, rows, written)`` after each shard (``written``: False for one committed earlier)."""
    tally = ImportTally()
    defaults = RowDefaults(options.task_type, options.instruction)
    shard = _ShardWriter(store, created_at, tally, on_shard)

    def bad(where: str, problem: str) -> None:
        if not options.skip_invalid:
            raise ImportFileError(f"{where}: {problem} (--skip-invalid skips such lines)")
        tally.bad_lines += 1
        tally.first_bad = tally.first_bad or f"{where}: {problem}"
        shard.reject(where, problem, defaults.task_type)

    for source in sources:
        layout: str | None = None
        for line, record in read_records(source):
            where = f"{source.shown}:{line}"
            if isinstance(record, BadLine):
                bad(where, record.problem)
                continue
            try:
                layout = layout or detect_layout(list(record))
                triple = MAPPERS[layout](record)
            except (LayoutProblem, RecordProblem) as exc:
                bad(where, str(exc))
                continue
            fields = to_row_fields(triple, defaults)
            tally.layouts.setdefault(source.shown, layout)
            shard.add(fields, source, line, layout)
            tally.rows += 1
            tally.by_type[fields["task_type"]] += 1
            tally.texts_left_out += len(triple.more_pos) + len(triple.more_neg)
            if len(shard.rows) >= options.shard_rows:
                shard.commit()
    shard.commit()
    return tally
