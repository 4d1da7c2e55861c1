"""The cost ledger's files: ``LEDGER_SCHEMA`` rows in Parquet, and a run's plan as JSON (written atomically).

Where they live is the stores' business: ``RunStore.ledger_path`` / ``plan_path`` (``runs/<run_id>/``)
and ``CleanStore.ledger_path`` (``clean/<clean_id>/``); the catalog's ``ledger`` view reads both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from storage.atomic import atomic_write_bytes, atomic_write_parquet, read_json_file
from storage.location import StorePath
from storage.schemas import LEDGER_SCHEMA
from storage.shards import read_parquet_checked, rows_to_table


def write_ledger(path: StorePath, rows: Iterable[Mapping[str, Any]], compression: str = "zstd") -> None:
    """Replace the ledger file with ``rows`` (columns they lack are null)."""
    table = rows_to_table([{name: row.get(name) for name in LEDGER_SCHEMA.names} for row in rows], LEDGER_SCHEMA)
    atomic_write_parquet(table, path, compression)


def read_ledger(path: StorePath) -> list[dict[str, Any]]:
    """The ledger rows of ``path``; none when it does not exist."""
    return read_parquet_checked(path, LEDGER_SCHEMA).to_pylist() if path.exists() else []


def write_plan(path: StorePath, plan: Mapping[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(plan, indent=1, sort_keys=True).encode())


def read_plan(path: StorePath) -> dict[str, Any] | None:
    return read_json_file(path, "plan")
