"""The column layouts an import understands, and how one input record becomes one example row.

=================  ==========================================================  ===============================
layout             columns                                                     example row
=================  ==========================================================  ===============================
``kalm``           ``query``, ``pos`` (list), ``neg`` (list, optional),         query, ``pos[0]``, ``neg[0]``
                   ``task_name``, ``instruction`` or ``prompt`` (optional)
                   (KaLM-Embedding / FlagEmbedding; our own export)
``triplet``        ``anchor``, ``positive``, ``negative`` or ``negative_1``..   anchor, positive, first negative
                   (optional) (sentence-transformers; our ``_st.parquet``)
``query_positive`` ``query`` and ``positive`` or ``answer``, ``negative``        query, positive, negative
                   (optional) (sentence-transformers question-answer pairs)
=================  ==========================================================  ===============================

A record with several positives or negatives gives **one** row: the first positive and the first negative.
The clean's exact dedup would keep one row per query anyway (``duplicate_query``), and its mining adds hard
negatives afresh; the texts left out are kept in the row's ``parsed`` JSON (``more_pos`` / ``more_neg``) and
counted in the import summary.

The task type is ``task_name`` when it is one of the six (``ground/task_types.py``), else the import's
default (``retrieval`` unless ``--task-type`` says otherwise). A query in the KaLM form
``Instruct: <instruction>\\nQuery: <query>`` (as our export writes it) is split into the two, so a
re-exported row is not instructed twice; otherwise the instruction is the record's ``instruction`` /
``prompt``, else the import's ``--instruction`` (None: the export keeps the bare query).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ground.task_types import ALL_TASK_TYPES

LAYOUTS = ("kalm", "triplet", "query_positive")
EXPECTED = "query/pos/neg (KaLM), anchor/positive[/negative] or query/positive|answer[/negative]"
_INSTRUCT, _QUERY = "Instruct: ", "\nQuery: "


class RecordProblem(ValueError):
    """One record cannot be a training row (the message says what is wrong, without file and line)."""


class LayoutProblem(ValueError):
    """A file's columns fit no layout (the message names the columns, without the file)."""


@dataclass(frozen=True)
class Triple:
    """One input record as the parts of an example row."""

    query: str
    positive: str
    negative: str | None
    task_name: str | None
    instruction: str | None
    more_pos: tuple[str, ...] = ()
    more_neg: tuple[str, ...] = ()


def detect_layout(columns: Sequence[str]) -> str:
    """The layout of a file with these columns (field names); :class:`LayoutProblem` naming what is missing."""
    cols = set(columns)
    shown = ", ".join(sorted(cols)) or "none"
    if "pos" in cols or ("query" in cols and "neg" in cols):
        if "query" not in cols or "pos" not in cols:
            missing = "query" if "query" not in cols else "pos"
            raise LayoutProblem(f"missing column '{missing}' (KaLM layout; has {shown})")
        return "kalm"
    if "anchor" in cols:
        if "positive" not in cols:
            raise LayoutProblem(f"missing column 'positive' beside 'anchor' (has {shown})")
        return "triplet"
    if "query" in cols:
        if "positive" not in cols and "answer" not in cols:
            raise LayoutProblem(f"missing column 'positive' or 'answer' beside 'query' (has {shown})")
        return "query_positive"
    raise LayoutProblem(f"unknown layout (columns: {shown}); expected {EXPECTED}")


def _text(record: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = record.get(name)
    if value is None:
        if required:
            raise RecordProblem(f"missing '{name}'" if name not in record else f"'{name}' is null")
        return None
    if not isinstance(value, str):
        raise RecordProblem(f"'{name}' must be a string, not {type(value).__name__}")
    return value


def _texts(record: dict[str, Any], name: str, *, required: bool) -> list[str]:
    value = record.get(name)
    if value is None:
        if required:
            raise RecordProblem(f"missing '{name}'" if name not in record else f"'{name}' is null")
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise RecordProblem(f"'{name}' must be a list of strings, not {type(value).__name__}")
    if not all(isinstance(text, str) for text in value):
        raise RecordProblem(f"'{name}' must be a list of strings (an item is not a string)")
    if required and not value:
        raise RecordProblem(f"'{name}' is an empty list")
    return list(value)


def split_instructed(query: str) -> tuple[str | None, str]:
    """``Instruct: X\\nQuery: Y`` -> (X, Y); any other query -> (None, query)."""
    if query.startswith(_INSTRUCT) and _QUERY in query:
        instruction, _, rest = query[len(_INSTRUCT) :].partition(_QUERY)
        if instruction.strip() and rest.strip():
            return instruction.strip(), rest
    return None, query


def _kalm(record: dict[str, Any]) -> Triple:
    query = _text(record, "query", required=True)
    pos, neg = _texts(record, "pos", required=True), _texts(record, "neg", required=False)
    instruction = _text(record, "instruction", required=False) or _text(record, "prompt", required=False)
    task_name = _text(record, "task_name", required=False)
    return Triple(query, pos[0], neg[0] if neg else None, task_name, instruction, tuple(pos[1:]), tuple(neg[1:]))


def _triplet(record: dict[str, Any]) -> Triple:
    negatives = [_text(record, "negative", required=False)]
    negatives += [_text(record, f"negative_{i}", required=False) for i in range(1, 1 + _numbered(record))]
    present = [text for text in negatives if text is not None]
    return Triple(
        _text(record, "anchor", required=True),
        _text(record, "positive", required=True),
        present[0] if present else None,
        None,
        None,
        (),
        tuple(present[1:]),
    )


def _numbered(record: dict[str, Any]) -> int:
    n = 0
    while f"negative_{n + 1}" in record:
        n += 1
    return n


def _query_positive(record: dict[str, Any]) -> Triple:
    positive_name = "positive" if "positive" in record else "answer"
    return Triple(
        _text(record, "query", required=True),
        _text(record, positive_name, required=True),
        _text(record, "negative", required=False),
        None,
        None,
    )


MAPPERS: dict[str, Callable[[dict[str, Any]], Triple]] = {
    "kalm": _kalm,
    "triplet": _triplet,
    "query_positive": _query_positive,
}


@dataclass(frozen=True)
class RowDefaults:
    """What an import fills in where a record says nothing: the task type and the instruction."""

    task_type: str = "retrieval"
    instruction: str | None = None

    def __post_init__(self) -> None:
        if self.task_type not in ALL_TASK_TYPES:
            raise ValueError(f"task type {self.task_type!r} is not one of {', '.join(ALL_TASK_TYPES)}")


def to_row_fields(triple: Triple, defaults: RowDefaults) -> dict[str, Any]:
    """The example-row fields of one triple: task type, instruction, query, positive, negative, parsed."""
    instruction, query = split_instructed(triple.query)
    extra = {k: list(v) for k, v in (("more_pos", triple.more_pos), ("more_neg", triple.more_neg)) if v}
    return {
        "task_type": triple.task_name if triple.task_name in ALL_TASK_TYPES else defaults.task_type,
        "instruction": instruction or triple.instruction or defaults.instruction,
        "query": query,
        "positive": triple.positive,
        "negative": triple.negative,
        "parsed": json.dumps(extra, ensure_ascii=False) if extra else "{}",
    }
