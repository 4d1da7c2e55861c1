"""Persona texts and a JSONL writer shared by generation/test_personas.py and generation/test_persona_files.py."""

from __future__ import annotations

import json
from pathlib import Path

TEXTS = [
    "A beekeeper in rural Slovenia who writes poetry about pollinators.",
    "A Brazilian data journalist covering deforestation in the Amazon.",
    "A retired train conductor from Kyoto who restores antique clocks.",
    "A Nigerian fintech founder building payment rails for small farmers.",
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
