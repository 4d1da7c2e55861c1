"""The documents of a grounded run's corpus (``generation.corpus``), read from local paths or ``s3://``.

A corpus is one of:

* a text file: ``.txt``, ``.md`` (read as they are) or ``.html`` / ``.htm`` (the text of the page: tags,
  scripts and styles left out) — one document;
* a JSONL or Parquet file (``storage/records.py``): one document per record, its text in the column
  ``generation.corpus_text_column`` (``text`` by default);
* a folder of such files, read recursively in path order (other files, e.g. images, are skipped and counted).

:func:`read_documents` yields :class:`Document` s; ``name`` says where a document is *within* the corpus (the
file's path under the folder, ``#<line>`` for a record), so lineage and passage ids do not depend on where
the corpus lies on one machine. A problem raises :class:`~storage.records.RecordFileError`, one line
``<file>[:<line>]: what is wrong`` (not UTF-8, a bad JSONL line, no text column, a text that is no string,
a corpus with no document).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

from storage.location import StorePath, as_store_path, is_url
from storage.records import (
    BadLine,
    RecordFileError,
    batch_records,
    existing_input,
    jsonl_records,
    parquet_batches,
    record_kind,
)

TEXT_SUFFIXES = (".txt", ".md")
HTML_SUFFIXES = (".html", ".htm")


@dataclass(frozen=True)
class Document:
    name: str  # where it is within the corpus: "page.md", "docs.jsonl#12"
    text: str


@dataclass
class CorpusFiles:
    """The files of a corpus, and how many others a folder held (skipped)."""

    files: list[tuple[StorePath, str]] = field(default_factory=list)  # (path, name within the corpus)
    skipped: int = 0


def _kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(TEXT_SUFFIXES):
        return "text"
    if lower.endswith(HTML_SUFFIXES):
        return "html"
    return record_kind(name)


def corpus_files(corpus: str, storage_options: dict[str, Any] | None = None) -> CorpusFiles:
    """The document files of ``corpus`` (a file or a folder, local or s3://); RecordFileError if there are none."""
    root = as_store_path(corpus, storage_options if is_url(corpus) else None)
    is_dir = existing_input(corpus, root)
    found = CorpusFiles()
    if not is_dir:
        if _kind(root.name) is None:
            raise RecordFileError(
                f"{corpus}: unknown file type (expected .txt, .md, .html, .jsonl or .parquet, or a folder of them)"
            )
        found.files.append((root, root.name))
        return found
    for path in sorted((p for p in root.rglob("*") if not p.is_dir()), key=lambda p: str(p)):
        name = str(path)[len(str(root)) :].lstrip("/")
        if _kind(path.name) is None or any(part.startswith(".") for part in name.split("/")):
            found.skipped += 1
        else:
            found.files.append((path, name))
    if not found.files:
        raise RecordFileError(f"{corpus}: a folder with no .txt, .md, .html, .jsonl or .parquet files")
    return found


class _HTMLText(HTMLParser):
    """The visible text of a page: block elements end lines, scripts and styles are left out."""

    BLOCKS = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "pre", "section", "article"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style"):
            self._hidden += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._hidden = max(0, self._hidden - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)


def html_text(page: str) -> str:
    parser = _HTMLText()
    parser.feed(page)
    parser.close()
    return "".join(parser.parts)


def _file_text(path: StorePath, name: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecordFileError(f"{name}: unreadable ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordFileError(f"{name}: not UTF-8 text (byte {exc.start}); is it a binary file?") from None
    return html_text(text) if _kind(name) == "html" else text


def _record_text(record: dict[str, Any], column: str, where: str) -> str:
    if column not in record:
        shown = ", ".join(sorted(record)) or "none"
        raise RecordFileError(f"{where}: no column {column!r} (has {shown}); set generation.corpus_text_column")
    text = record[column]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise RecordFileError(f"{where}: {column!r} must be a string, not {type(text).__name__}")
    return text


def _records(path: StorePath, name: str, column: str) -> Iterator[Document]:
    if record_kind(path.name) == "jsonl":
        for line, record in jsonl_records(path, name):
            if isinstance(record, BadLine):
                raise RecordFileError(f"{name}:{line}: {record.problem}")
            yield Document(f"{name}#{line}", _record_text(record, column, f"{name}:{line}"))
        return
    columns, batches = parquet_batches(path, name)
    if column not in columns:
        raise RecordFileError(
            f"{name}: no column {column!r} (has {', '.join(columns)}); set generation.corpus_text_column"
        )
    for row, record in batch_records(batches, name):
        yield Document(f"{name}#{row}", _record_text(record, column, f"{name}:{row}"))


def read_documents(files: CorpusFiles, text_column: str = "text") -> Iterator[Document]:
    """The corpus' documents in file order (records in file order); RecordFileError on a bad file or record."""
    for path, name in files.files:
        if _kind(name) in ("jsonl", "parquet"):
            yield from _records(path, name, text_column)
        else:
            yield Document(name, _file_text(path, name))
