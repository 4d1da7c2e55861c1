"""Flow ``import_data`` (``embed-factory import``): existing training data → the example shards of one run.

Orchestration only: the inputs are resolved and checked (``tasks/importing/readers.py``), the run's
options are recorded on first use and compared on every re-run, and the records are written shard by
shard (``tasks/importing/shards.py``) under the run's lock. The run is then an ordinary run of the
catalog: ``embed-factory clean`` picks it up with the generation runs (validation, dedup,
decontamination, the ranking filter, mining, export), and the ``lineage`` view says where each row came from.

Re-running the same import id resumes it (committed shards are skipped) or, when everything is committed,
finds it done; a re-run with other inputs or options is refused. A bad input (a bad line without
``--skip-invalid``, an empty or unreadable file, an unknown layout) removes the run: nothing is left
half-imported for a clean to pick up. (The flow is ``import_data``: ``import`` is a Python keyword.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger

from ground import progress
from ground.settings import Settings, TaskTypeName, load_settings
from storage.lineage import discard_run
from storage.shards import RunStore, folder_lock, now_utc
from tasks.importing.readers import ImportFileError, resolve_sources
from tasks.importing.shards import SHARD_ROWS, SOURCE, ImportOptions, default_import_id, import_records

PROGRESS_STAGE = "import"


class ImportMismatch(ValueError):
    """The import id names a run made otherwise: a generation run, or an import of other inputs or options."""


@dataclass
class ImportSummary:
    import_id: str
    run_dir: str
    rows: int
    by_type: dict[str, int]
    layouts: dict[str, str]
    bad_lines: int
    first_bad: str | None
    texts_left_out: int
    shards_written: int
    shards_skipped: int
    elapsed_s: float
    rows_per_s: float
    notes: list[str] = field(default_factory=list)


def check_import_id(store: RunStore) -> dict[str, Any] | None:
    """The run info of an earlier import of this id (None: a new run); a run that is no import is refused."""
    info = store.read_run_info()
    if info is None and store.manifest():
        raise ImportMismatch(f"run {store.run_id!r} already holds shards and is no import; choose another --import-id")
    if info is not None and info.get("source") != SOURCE:
        raise ImportMismatch(f"run {store.run_id!r} is a generation run, not an import; choose another --import-id")
    return info


def _recorded(store: RunStore, inputs: dict[str, Any]) -> datetime:
    """Record a new import's inputs and options; for an existing run, check they are the same. Its created_at."""
    info = check_import_id(store)
    if info is None:
        created_at = now_utc()
        store.write_run_info({"source": SOURCE, "import": inputs, "created_at": created_at.isoformat()})
        return created_at
    if info.get("import") != inputs:
        raise ImportMismatch(
            f"run {store.run_id!r} was imported from other inputs or with other options ({store.run_info_path}); "
            "re-run it with the same ones or choose another --import-id"
        )
    return datetime.fromisoformat(info["created_at"])


def import_run(
    settings: Settings, import_id: str, paths: list[str], options: ImportOptions, logger: Any = None
) -> ImportSummary:
    """The body of the flow; callable directly (tests, bench)."""
    logger = logger or logging.getLogger(__name__)
    started = time.monotonic()
    sources = resolve_sources(paths, settings.storage.storage_options())
    store = RunStore.from_settings(settings, import_id)
    inputs = {"inputs": [[s.location, s.kind, s.size] for s in sources], "options": asdict(options)}
    discard = False
    try:
        # the run's lock (store.exclusive()), its error naming this command's option
        with folder_lock(store.root, import_id, option="--import-id", ttl_s=store.lock_ttl_s):
            created_at = _recorded(store, inputs)
            try:

                def shard_done(shard_id: str, rows: int, written: bool) -> None:
                    progress.add_total(PROGRESS_STAGE, rows)  # the total is unknown until the inputs end
                    progress.advance(PROGRESS_STAGE, rows)
                    logger.info("shard %s: %d rows %s", shard_id, rows, "committed" if written else "already committed")

                tally = import_records(store, sources, options, created_at, shard_done)
                if tally.rows == 0:
                    raise ImportFileError(
                        f"no rows imported: every record was invalid "
                        f"({tally.bad_lines} skipped; first: {tally.first_bad})"
                    )
            except ImportFileError:
                discard = True  # these inputs can never complete this run
                raise
    finally:
        if discard:
            discard_run(store)
    elapsed = time.monotonic() - started
    notes = []
    if tally.bad_lines:
        notes.append(f"skipped {tally.bad_lines} invalid line(s) (first: {tally.first_bad})")
    if tally.texts_left_out:
        notes.append(f"{tally.texts_left_out} further pos/neg text(s) not imported (kept in the rows' parsed JSON)")
    if tally.shards_skipped:
        notes.append(f"{tally.shards_skipped} shard(s) already committed by an earlier session")
    summary = ImportSummary(
        import_id=import_id,
        run_dir=str(store.root),
        rows=tally.rows,
        by_type=dict(tally.by_type),
        layouts=tally.layouts,
        bad_lines=tally.bad_lines,
        first_bad=tally.first_bad,
        texts_left_out=tally.texts_left_out,
        shards_written=tally.shards_written,
        shards_skipped=tally.shards_skipped,
        elapsed_s=round(elapsed, 2),
        rows_per_s=round(tally.rows / elapsed, 1) if elapsed > 0 else 0.0,
        notes=notes,
    )
    logger.info("import %s: %d rows %s from %d input(s)", import_id, tally.rows, dict(tally.by_type), len(sources))
    for note in notes:
        (logger.warning if note.startswith("skipped") else logger.info)("import %s: %s", import_id, note)
    return summary


@flow(name="import_data", flow_run_name="{import_id}")
def import_data(
    paths: list[str],
    import_id: str | None = None,
    task_type: TaskTypeName = "retrieval",
    instruction: str | None = None,
    skip_invalid: bool = False,
    shard_rows: int = SHARD_ROWS,
    profile: str | None = None,
) -> ImportSummary:
    """Import existing training data (KaLM JSONL, sentence-transformers columns, Parquet, datasets folders) as a run.

    Args:
        paths: Input files or folders: local paths or s3:// URLs (JSONL, Parquet, a datasets save_to_disk folder).
        import_id: Run id of the import; re-use one to resume it (default: import- and the first input's name).
        task_type: Task type of records whose task_name is not one of the six task types.
        instruction: Instruction for records that carry none (default: none, the query stays bare).
        skip_invalid: Skip (and count) invalid lines instead of stopping at the first.
        shard_rows: Rows per committed shard.
        profile: Settings profile: local or production (default: the environment's).
    """
    options = ImportOptions(task_type, instruction, skip_invalid, shard_rows)
    settings = load_settings(profile=profile)
    return import_run(settings, import_id or default_import_id(paths), paths, options, get_run_logger())
