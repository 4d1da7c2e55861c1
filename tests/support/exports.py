"""A small KaLM export file for the training tests (training/test_train.py, training/test_decoder_finetune.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TASKS = {
    "retrieval": "Given a catalogue number, retrieve the catalogue entry",
    "classification": "Classify the colour of the numbered item",
    "short_short": "Retrieve the title with the same number",
    "sts": "Retrieve semantically similar text",
}


COLOURS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]


THINGS = ["lamp", "chair", "kettle", "bicycle", "guitar", "teapot", "window", "basket"]


def write_export(path: Path, rows_per_task: int = 8, short_negatives: bool = True) -> Path:
    """A KaLM export (``tasks.cleaning.export`` format): 8 rows per task, 1 or 2 negatives per row."""
    records = []
    i = 0
    for task, instruction in TASKS.items():
        for _ in range(rows_per_task):
            colour, thing = COLOURS[i % 8], THINGS[(i // 8) % 8]
            negatives = [
                f"Entry {i + 500} of the archive is a {COLOURS[(i + 3) % 8]} {thing}.",
                f"Number {i + 900}: a {colour} {THINGS[(i + 5) % 8]} in storage.",
            ]
            records.append(
                {
                    "query": f"Instruct: {instruction}\nQuery: item number {i}",
                    "pos": [f"Catalogue entry {i} is a {colour} {thing}."],
                    "neg": negatives[:1] if short_negatives and i % 3 == 0 else negatives,
                    "task_name": task,
                    "example_id": f"test:{i:04d}",
                }
            )
            i += 1
    schema = pa.schema(
        [
            ("query", pa.string()),
            ("pos", pa.list_(pa.string())),
            ("neg", pa.list_(pa.string())),
            ("task_name", pa.string()),
            ("example_id", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)
    return path
