"""Persona sources: the bundled seed set, a local Persona Hub JSONL file, or the Hub dataset.

Persona Hub (``proj-persona/PersonaHub``, CC-BY-NC-SA-4.0) ships ``persona.jsonl`` with one
``{"persona": "..."}`` object per line. Every source yields ``Persona`` records with a stable id
(a hash of the normalized text), so the same persona has the same id wherever it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SEED_SOURCE = "seed"
HUB_SOURCE = "hub"


class PersonaFileError(ValueError):
    """A persona file is missing, empty or malformed; the message names the file and line."""


@dataclass(frozen=True)
class Persona:
    persona_id: str
    text: str


def normalize_persona(text: str) -> str:
    return " ".join(text.split()).casefold()


def persona_id(text: str) -> str:
    return "p_" + hashlib.sha1(normalize_persona(text).encode()).hexdigest()[:16]


def make_persona(text: str) -> Persona:
    clean = " ".join(text.split())
    return Persona(persona_id(clean), clean)


def seed_path() -> Path:
    return Path(str(resources.files("personas") / "data" / "seed_personas.jsonl"))


def read_persona_jsonl(path: Path, limit: int | None = None) -> list[Persona]:
    """Read Persona Hub JSONL; duplicates (by normalized text) are dropped, first one wins."""
    path = Path(path) if isinstance(path, (str, os.PathLike)) else path  # a UPath (S3 run store) stays
    if not path.exists():
        raise PersonaFileError(f"{path}: persona file not found")
    if path.is_dir():
        raise PersonaFileError(f"{path}: is a folder, expected a JSONL file")
    personas: dict[str, Persona] = {}
    try:
        with path.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PersonaFileError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                text = record.get("persona") if isinstance(record, dict) else None
                if not isinstance(text, str) or not text.strip():
                    raise PersonaFileError(f'{path}:{lineno}: expected {{"persona": "<non-empty text>"}}')
                persona = make_persona(text)
                personas.setdefault(persona.persona_id, persona)
                if limit is not None and len(personas) >= limit:
                    break
    except UnicodeDecodeError as exc:
        raise PersonaFileError(f"{path}: not UTF-8 text (byte {exc.start}); is it a binary file?") from None
    if not personas:
        raise PersonaFileError(f"{path}: no personas in file")
    return list(personas.values())


def download_persona_hub(repo_id: str, filename: str, revision: str | None = None, cache_dir: Path | None = None) -> Path:
    """Production path: fetch Persona Hub's JSONL through huggingface-hub (cached, resumable)."""
    from huggingface_hub import hf_hub_download

    return Path(
        hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset", revision=revision, cache_dir=cache_dir)
    )


def load_personas(source: str, *, hub_repo: str, hub_file: str, hub_revision: str | None = None,
                  limit: int | None = None) -> list[Persona]:
    """``source`` is ``seed``, ``hub``, or a path to a JSONL file."""
    if source == SEED_SOURCE:
        path = seed_path()
    elif source == HUB_SOURCE:
        path = download_persona_hub(hub_repo, hub_file, hub_revision)
    else:
        path = Path(source).expanduser()
    return read_persona_jsonl(path, limit=limit)
