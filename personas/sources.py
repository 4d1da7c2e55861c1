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

from ground.settings import PersonaSettings

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


@dataclass
class PersonaLoad:
    """The personas read from a file and what was left out or cut on the way, for the run summary."""

    personas: list[Persona]
    bad_lines: int = 0  # skipped (only with ``skip_bad_lines``)
    first_bad: str | None = None  # the first skipped line's error, e.g. ``persona.jsonl:17: not valid JSON``
    too_long: int = 0  # personas over ``max_chars``: truncated, or skipped
    too_long_action: str = "truncated"

    def notes(self) -> list[str]:
        """One line per thing the user should know, e.g. ``skipped 3 bad lines (first: f.jsonl:17: ...)``."""
        notes = []
        if self.bad_lines:
            notes.append(f"skipped {self.bad_lines} bad line{'s' * (self.bad_lines != 1)} (first: {self.first_bad})")
        if self.too_long:
            notes.append(f"{self.too_long_action} {self.too_long} over-long persona{'s' * (self.too_long != 1)}")
        return notes


def truncate_persona(text: str, max_chars: int) -> str:
    """Cut to at most ``max_chars``, at the last space when one is in the second half."""
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1].rsplit(" ", 1)[0] if " " in text[max_chars // 2 : max_chars + 1] else text[:max_chars]
    return cut.rstrip()


def _parse_line(raw: bytes, path: Path, lineno: int, offset: int) -> str | None:
    """The persona text of one line, None for a blank line; a PersonaFileError names the file and line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PersonaFileError(
            f"{path}:{lineno}: not UTF-8 text (byte {offset + exc.start}); is it a binary file?"
        ) from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PersonaFileError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    text = record.get("persona") if isinstance(record, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise PersonaFileError(f'{path}:{lineno}: expected {{"persona": "<non-empty text>"}}')
    return text


def read_persona_file(
    path: Path,
    limit: int | None = None,
    *,
    skip_bad_lines: bool = False,
    max_chars: int | None = None,
    too_long: str = "truncate",
) -> PersonaLoad:
    """Read Persona Hub JSONL; duplicates (by normalized text) are dropped, first one wins.

    A bad line (not UTF-8, not JSON, no persona) refuses the file, or with ``skip_bad_lines`` is skipped
    and counted. A persona over ``max_chars`` characters is truncated (``too_long="truncate"``) or
    skipped (``"skip"``), and counted; ``limit`` counts the personas kept.
    """
    path = Path(path) if isinstance(path, (str, os.PathLike)) else path  # a UPath (S3 run store) stays
    if not path.exists():
        raise PersonaFileError(f"{path}: persona file not found")
    if path.is_dir():
        raise PersonaFileError(f"{path}: is a folder, expected a JSONL file")
    if too_long not in ("truncate", "skip"):
        raise ValueError(f"too_long must be 'truncate' or 'skip', not {too_long!r}")
    personas: dict[str, Persona] = {}
    load = PersonaLoad([], too_long_action="truncated" if too_long == "truncate" else "skipped")
    offset = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = _parse_line(raw, path, lineno, offset)
            except PersonaFileError as exc:
                if not skip_bad_lines:
                    raise
                load.bad_lines += 1
                load.first_bad = load.first_bad or str(exc)
                text = None
            offset += len(raw)
            if text is None:
                continue
            persona = make_persona(text)
            if max_chars is not None and len(persona.text) > max_chars:
                load.too_long += 1
                if too_long == "skip":
                    continue
                persona = make_persona(truncate_persona(persona.text, max_chars))
            personas.setdefault(persona.persona_id, persona)
            if limit is not None and len(personas) >= limit:
                break
    if not personas:
        skipped = f" ({'; '.join(load.notes())})" if load.notes() else ""
        raise PersonaFileError(f"{path}: no personas in file{skipped}")
    load.personas = list(personas.values())
    return load


def read_persona_jsonl(path: Path, limit: int | None = None) -> list[Persona]:
    """A persona file read strictly: the first bad line refuses it (run folders, ``doctor``)."""
    return read_persona_file(path, limit).personas


def download_persona_hub(
    repo_id: str, filename: str, revision: str | None = None, cache_dir: Path | None = None
) -> Path:
    """Production path: fetch Persona Hub's JSONL through huggingface-hub (cached, resumable)."""
    from huggingface_hub import hf_hub_download

    return Path(
        hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset", revision=revision, cache_dir=cache_dir)
    )


def source_path(source: str, *, hub_repo: str, hub_file: str, hub_revision: str | None = None) -> Path:
    """The local file of ``source``: ``seed``, ``hub`` (downloaded once), or a path to a JSONL file."""
    if source == SEED_SOURCE:
        return seed_path()
    if source == HUB_SOURCE:
        return download_persona_hub(hub_repo, hub_file, hub_revision)
    return Path(source).expanduser()


def load_personas(
    source: str, *, hub_repo: str, hub_file: str, hub_revision: str | None = None, limit: int | None = None
) -> list[Persona]:
    """``source`` is ``seed``, ``hub``, or a path to a JSONL file; read strictly, nothing cut."""
    return read_persona_jsonl(
        source_path(source, hub_repo=hub_repo, hub_file=hub_file, hub_revision=hub_revision), limit=limit
    )


def load_persona_pool(settings: PersonaSettings) -> PersonaLoad:
    """The personas of ``settings.source`` as the settings say to read them (bad lines, over-long personas)."""
    path = source_path(
        settings.source, hub_repo=settings.hub_repo, hub_file=settings.hub_file, hub_revision=settings.hub_revision
    )
    return read_persona_file(
        path,
        settings.limit,
        skip_bad_lines=settings.skip_bad_lines,
        max_chars=settings.max_chars,
        too_long=settings.too_long,
    )
