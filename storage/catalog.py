"""A DuckDB catalog over every table the factory writes: one file, views with stable names.

``Catalog(data_dir)`` keeps ``<data_dir>/catalog.duckdb``, a persistent DuckDB database that holds
*views* only (no data is copied), so it stays tiny and always reads the current Parquet files::

    duckdb data/catalog.duckdb -c "SELECT task_type, count(*) FROM raw GROUP BY 1"
    python -c "import duckdb; print(duckdb.connect('data/catalog.duckdb', read_only=True).sql('FROM mined LIMIT 5'))"

Views (absolute paths, ``union_by_name`` so shards written by older schema versions still read):

==============  =====================================================  =========================
view            files                                                  extra column
==============  =====================================================  =========================
raw             ``runs/*/examples/*.parquet``                          (rows carry ``run_id``)
rejects         ``runs/*/rejects/*.parquet``
brainstorm      ``runs/*/brainstorm/*.parquet``
instructions    ``runs/*/instructions.parquet``                        ``run_id`` (from the path)
<table>         ``clean/*/<table>.parquet``: one view per stage table   ``clean_id`` (from the path)
                (``storage/stages.py``, in flow order)
judged          ``clean/*/judged/*.parquet`` (the judge's decisions)    ``clean_id``
dropped         ``clean/*/dropped/*.parquet``                          ``clean_id``
clean_inputs    ``clean/*/inputs.json`` (one row per clean id and run)  ``clean_id``, ``run_id``
ledger          ``runs/*/ledger.parquet``, ``clean/*/ledger.parquet``   (rows carry ``scope``, ids)
lineage         ``runs/*/lineage/*.parquet``: imported rows' file, line  (rows carry ``run_id``)
                and grounded rows' document, passage, question type
passages        ``runs/*/passages.parquet``: grounded runs' passages    ``run_id`` (from the path)
==============  =====================================================  =========================

A view whose files do not exist yet is an empty view with the right columns (typed ``NULL`` casts
built from the Arrow schemas in ``storage/``), so ``SELECT count(*) FROM valid`` answers 0 on a
fresh project instead of failing. Because DuckDB binds a ``read_parquet`` glob when the view is
created, a view must be re-created when its first file appears: ``refresh()`` does it, and
``query()`` / ``to_file()`` do it by themselves when the set of tables that have files changed.

DuckDB allows one writing process per database file. ``refresh()`` opens the file read-write for a
moment, retries for ``lock_timeout_s`` when another process holds it (e.g. an open ``duckdb`` CLI
session) and then raises :class:`CatalogLocked` with a clear message. ``query()`` opens the file
read-only, so user SQL cannot drop or change the views; when the file is locked by a writer it
answers from an in-memory database with the same views instead of failing. Errors in user SQL raise
:class:`CatalogError` carrying DuckDB's message.

On S3 (``data_dir`` = ``s3://bucket/prefix``) there is no catalog file: every query builds the views
in an in-memory database that reads the shards through the store's s3fs filesystem, registered with
``register_filesystem`` (DuckDB's own httpfs extension would be downloaded at run time). The views,
their names and columns are the same as locally.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from ground.settings import Settings
from storage.atomic import atomic_path
from storage.location import StorePath, as_store_path, data_root, is_remote
from storage.schemas import (
    BRAINSTORM_SCHEMA,
    DROPPED_SCHEMA,
    EXAMPLE_SCHEMA,
    INSTRUCTION_SCHEMA,
    JUDGED_SCHEMA,
    LEDGER_SCHEMA,
    LINEAGE_SCHEMA,
    PASSAGE_SCHEMA,
    REJECT_SCHEMA,
)
from storage.shards import list_runs
from storage.stages import CLEAN_STAGES

CATALOG_FILE = "catalog.duckdb"
_META_TABLE = "_catalog_state"


class CatalogError(RuntimeError):
    """A query failed (DuckDB's message), or the catalog file could not be opened."""


class CatalogLocked(CatalogError):
    """Another process holds the catalog file open for writing."""


_CLEAN_INPUTS = pa.schema([("clean_id", pa.string()), ("run_id", pa.string())])

#: view name -> (glob relative to the data dir, schema of the files, column derived from the path)
VIEWS: dict[str, tuple[str, pa.Schema, str | None]] = {
    "raw": ("runs/*/examples/*.parquet", EXAMPLE_SCHEMA, None),
    "rejects": ("runs/*/rejects/*.parquet", REJECT_SCHEMA, None),
    "brainstorm": ("runs/*/brainstorm/*.parquet", BRAINSTORM_SCHEMA, None),
    "instructions": ("runs/*/instructions.parquet", INSTRUCTION_SCHEMA, "run_id"),
    **{s.table: (f"clean/*/{s.table}.parquet", s.schema, "clean_id") for s in CLEAN_STAGES},  # storage/stages.py
    "judged": ("clean/*/judged/*.parquet", JUDGED_SCHEMA, "clean_id"),
    "dropped": ("clean/*/dropped/*.parquet", DROPPED_SCHEMA, "clean_id"),
    "clean_inputs": ("clean/*/inputs.json", _CLEAN_INPUTS, None),
    "ledger": ("*/*/ledger.parquet", LEDGER_SCHEMA, None),  # runs/<id>/ and clean/<id>/ (storage/ledger.py)
    "lineage": ("runs/*/lineage/*.parquet", LINEAGE_SCHEMA, None),  # imported runs' file and line (storage/lineage.py)
    "passages": ("runs/*/passages.parquet", PASSAGE_SCHEMA, "run_id"),  # grounded runs' passages (storage/passages.py)
}

# The id that a path column is taken from: the folder right under runs/ or clean/.
_PATH_ID_REGEX = {
    "run_id": r"[/\\]runs[/\\]([^/\\]+)[/\\]",
    "clean_id": r"[/\\]clean[/\\]([^/\\]+)[/\\]",
}


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A view's glob as a regex over keys; ``*`` stays within one path segment, as in a shell."""
    return re.compile("[^/]*".join(re.escape(part) for part in pattern.split("*")))


def duckdb_type(dtype: pa.DataType) -> str:
    """The DuckDB type that ``read_parquet`` gives an Arrow type (for the empty views)."""
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "VARCHAR"
    if pa.types.is_boolean(dtype):
        return "BOOLEAN"
    simple = {
        pa.int8(): "TINYINT",
        pa.int16(): "SMALLINT",
        pa.int32(): "INTEGER",
        pa.int64(): "BIGINT",
        pa.uint8(): "UTINYINT",
        pa.uint16(): "USMALLINT",
        pa.uint32(): "UINTEGER",
        pa.uint64(): "UBIGINT",
        pa.float32(): "FLOAT",
        pa.float64(): "DOUBLE",
        pa.date32(): "DATE",
        pa.binary(): "BLOB",
    }
    if dtype in simple:
        return simple[dtype]
    if pa.types.is_timestamp(dtype):
        return "TIMESTAMP WITH TIME ZONE" if dtype.tz else "TIMESTAMP"
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return duckdb_type(dtype.value_type) + "[]"
    raise TypeError(f"no DuckDB type for Arrow type {dtype}")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    """A SQL string literal (DDL cannot take parameters; paths are the only values that go here)."""
    return "'" + text.replace("'", "''") + "'"


def empty_view_sql(schema: pa.Schema, extra: str | None = None) -> str:
    cols = [f"CAST(NULL AS {duckdb_type(f.type)}) AS {_ident(f.name)}" for f in schema]
    if extra and extra not in schema.names:
        cols.append(f"CAST(NULL AS VARCHAR) AS {_ident(extra)}")
    return "SELECT " + ", ".join(cols) + " WHERE false"


class Catalog:
    """The DuckDB catalog of ``data_dir``: ``refresh()`` the views, ``query()`` them, ``to_file()``."""

    # 30 s: another clean run's report holds a read-only session while it draws its figures (seconds, more
    # under load), and a refresh must wait for it rather than fail the run
    def __init__(self, data_dir: StorePath | str, lock_timeout_s: float = 30.0):
        root = as_store_path(data_dir)
        self.remote = is_remote(root)
        self.data_dir = root if self.remote else Path(root).resolve()
        self.path = None if self.remote else self.data_dir / CATALOG_FILE  # no catalog file on S3
        self.lock_timeout_s = lock_timeout_s
        self._held: duckdb.DuckDBPyConnection | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Catalog:
        return cls(data_root(settings.storage))

    # --- view definitions --------------------------------------------------------------------
    def _pattern(self, view: str) -> str:
        return str(self.data_dir / VIEWS[view][0])

    def _has_files(self, view: str) -> bool:
        return any(True for _ in globlib.iglob(self._pattern(view)))

    def _remote_views(self, fs: Any) -> dict[str, bool]:
        """Which views have files on S3, from one recursive listing of runs/ and clean/ each."""
        root = self.data_dir.path
        keys = [key[len(root) + 1 :] for top in ("runs", "clean") for key in fs.find(f"{root}/{top}")]
        patterns = {view: _glob_regex(VIEWS[view][0]) for view in VIEWS}
        return {view: any(pattern.fullmatch(key) for key in keys) for view, pattern in patterns.items()}

    def _state(self, fs: Any = None) -> dict[str, Any]:
        """What the views were built from: the data dir and which views had files."""
        if not self.remote:
            return {"data_dir": str(self.data_dir), "views": {v: self._has_files(v) for v in VIEWS}}
        bucket = self.data_dir.path.split("/", 1)[0]
        try:
            fs = fs or self.data_dir.fs
            if not fs.exists(bucket):
                raise CatalogError(
                    f"{self.data_dir}: bucket {bucket!r} not found (or not visible with these "
                    "credentials); check storage.data_dir and storage.endpoint_url"
                )
            return {"data_dir": str(self.data_dir), "views": self._remote_views(fs)}
        except CatalogError:
            raise
        except Exception as exc:  # s3fs / botocore: credentials, network, permissions
            raise CatalogError(f"cannot list {self.data_dir}: {type(exc).__name__}: {exc}") from None

    def _snapshot_fs(self) -> Any:
        """For one query on S3: the store's filesystem with listings cached, so DuckDB's many
        metadata calls per file are answered from the one listing (a consistent snapshot, too)."""
        fs = self.data_dir.fs
        return type(fs)(**{**fs.storage_options, "use_listings_cache": True, "skip_instance_cache": True})

    def view_sql(self, view: str, has_files: bool) -> str:
        _, schema, extra = VIEWS[view]
        if not has_files:
            return empty_view_sql(schema, extra)
        path = _literal(self._pattern(view))
        if view == "clean_inputs":
            return (
                f"SELECT regexp_extract(filename, {_literal(_PATH_ID_REGEX['clean_id'])}, 1) AS clean_id, "
                f"unnest(runs) AS run_id FROM read_json({path}, filename = true, "
                "columns = {'runs': 'VARCHAR[]'})"
            )
        if extra is None:
            return f"SELECT * FROM read_parquet({path}, union_by_name = true)"
        return (
            f"SELECT * EXCLUDE (filename), regexp_extract(filename, {_literal(_PATH_ID_REGEX[extra])}, 1) "
            f"AS {_ident(extra)} FROM read_parquet({path}, union_by_name = true, filename = true)"
        )

    def _create_views(self, con: duckdb.DuckDBPyConnection, state: dict[str, Any], persist: bool) -> None:
        for view, has_files in state["views"].items():
            con.execute(f"CREATE OR REPLACE VIEW {_ident(view)} AS {self.view_sql(view, has_files)}")
        if persist:
            con.execute(f"CREATE OR REPLACE TABLE {_META_TABLE} (state VARCHAR)")
            con.execute(f"INSERT INTO {_META_TABLE} VALUES (?)", [json.dumps(state, sort_keys=True)])

    # --- connections ---------------------------------------------------------------------------
    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """Open the catalog file, retrying while another process holds its lock."""
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.05
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except (duckdb.IOException, duckdb.ConnectionException) as exc:
                message = str(exc)
                # "Could not set lock on file": another process; "different configuration": this
                # process has the file open read-write elsewhere (DuckDB allows one configuration).
                if "lock" not in message.lower() and "different configuration" not in message:
                    raise CatalogError(f"cannot open the catalog {self.path}: {message}") from None
                if time.monotonic() >= deadline:
                    raise CatalogLocked(
                        f"the catalog {self.path} is held open for writing by another process "
                        f"({message}). DuckDB allows one writer per file: close the other session "
                        "(for example a duckdb CLI opened without -readonly) and try again."
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    @contextlib.contextmanager
    def _connect(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self._open(read_only)
        try:
            yield con
        finally:
            con.close()

    def refresh(self) -> dict[str, bool]:
        """(Re)create every view in the catalog file; returns which views have files behind them."""
        if self._held is not None:
            raise CatalogError("refresh() inside session(): leave the session first")
        state = self._state(self._snapshot_fs() if self.remote else None)
        if self.remote:  # nothing to persist: every query builds its views
            return dict(state["views"])
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._connect(read_only=False) as con:
            try:
                self._create_views(con, state, persist=True)
            except duckdb.Error as exc:
                raise CatalogError(f"cannot build the catalog views: {exc}") from None
        return dict(state["views"])

    @staticmethod
    def _read_state(con: duckdb.DuckDBPyConnection) -> dict[str, Any] | None:
        try:
            rows = con.execute(f"SELECT state FROM {_META_TABLE}").fetchall()
        except duckdb.Error:  # a catalog file from before the state table, or not ours
            return None
        return json.loads(rows[0][0]) if rows else None

    def is_fresh(self) -> bool:
        """True if the views were built for the tables that have files now."""
        if self.remote:
            return True  # views are built for every query
        if not self.path.exists():
            return False
        with self._connect(read_only=True) as con:
            return self._read_state(con) == self._state()

    @contextlib.contextmanager
    def _query_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection to fresh views: the file, or memory while another process writes it."""
        if self._held is not None:  # inside session(): one connection for many queries
            yield self._held
            return
        if self.remote:
            fs = self._snapshot_fs()
            con = self._memory_connection(self._state(fs), fs)
            try:
                yield con
            finally:
                con.close()
            return
        state = self._state()
        con: duckdb.DuckDBPyConnection | None = None
        try:
            if self.path.exists():
                con = self._open(read_only=True)
                if self._read_state(con) != state:
                    con.close()
                    con = None
            if con is None:
                self.refresh()
                con = self._open(read_only=True)
        except CatalogLocked:
            con = self._memory_connection(state)
        try:
            yield con
        finally:
            con.close()

    def _memory_connection(self, state: dict[str, Any], fs: Any = None) -> duckdb.DuckDBPyConnection:
        """An in-memory database with the views (and, on S3, the store's filesystem registered)."""
        con = duckdb.connect(":memory:")
        try:
            if self.remote:
                con.register_filesystem(fs or self.data_dir.fs)
            self._create_views(con, state, persist=False)
        except duckdb.Error as exc:
            con.close()
            raise CatalogError(f"cannot build the catalog views: {exc}") from None
        return con

    @contextlib.contextmanager
    def session(self) -> Iterator[Catalog]:
        """Run many queries on one read-only connection (opening the file costs tens of ms).

        Inside the block the views are not re-checked; the file stays open read-only, so another
        process cannot ``refresh()`` it meanwhile (it gets :class:`CatalogLocked` after its retry).
        """
        if self._held is not None:
            yield self
            return
        with self._query_connection() as con:
            self._held = con
            try:
                yield self
            finally:
                self._held = None

    # --- queries -----------------------------------------------------------------------------------
    def views(self) -> list[str]:
        return list(VIEWS)

    def query(self, sql: str, params: list[Any] | dict[str, Any] | None = None) -> pa.Table:
        """Run ``sql`` (``?`` or ``$name`` placeholders bound from ``params``) and return an Arrow table."""
        with self._query_connection() as con:
            try:
                rel = con.sql(sql, params=params) if params else con.sql(sql)
                if rel is None:  # a statement without a result set
                    return pa.table({})
                return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.fetch_arrow_table()
            except duckdb.Error as exc:
                raise CatalogError(str(exc)) from None

    def to_file(self, sql: str, path: Path | str, params: list[Any] | dict[str, Any] | None = None) -> Path:
        """Write the result of ``sql`` to ``path`` (.csv, .tsv or .parquet) with DuckDB ``COPY``.

        The path is bound as a parameter (never pasted into the SQL); the file is written atomically
        (``storage/atomic.py``), so a reader never sees half a file.
        """
        path = Path(path).resolve()
        options = {
            ".csv": "FORMAT csv, HEADER true",
            ".tsv": "FORMAT csv, HEADER true, DELIMITER '\t'",
            ".parquet": "FORMAT parquet, COMPRESSION zstd",
        }.get(path.suffix.lower())
        if options is None:
            raise CatalogError(f"{path.name}: choose a .csv, .tsv or .parquet file name")
        inner = sql.strip().rstrip(";").strip()
        with self._query_connection() as con:
            try:
                with atomic_path(path) as tmp:
                    if isinstance(params, dict):
                        statement = f"COPY ({inner}) TO $catalog_out_path ({options})"
                        bound: Any = {**params, "catalog_out_path": str(tmp)}
                    else:
                        statement, bound = f"COPY ({inner}) TO ? ({options})", [*(params or []), str(tmp)]
                    con.execute(statement, bound).fetchall()
            except duckdb.Error as exc:
                raise CatalogError(str(exc)) from None
        return path

    # --- what exists -------------------------------------------------------------------------------
    def run_ids(self) -> list[str]:
        return list_runs(self.data_dir)

    def clean_ids(self) -> list[str]:
        """Clean runs, oldest first (by the modification time of their folder; on S3, of inputs.json)."""
        clean = self.data_dir / "clean"
        if not clean.exists():
            return []
        dirs = [p for p in clean.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if self.remote:  # S3 has no folders: a clean run's inputs.json is its first object

            def started(p: StorePath) -> float:
                inputs = p / "inputs.json"
                return inputs.stat().st_mtime if inputs.exists() else 0.0

            return [p.name for p in sorted(dirs, key=lambda p: (started(p), p.name))]
        return [p.name for p in sorted(dirs, key=lambda p: (p.stat().st_mtime, p.name))]
