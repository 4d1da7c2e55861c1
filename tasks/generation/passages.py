"""Passages of a document corpus, and the personas nearest each one: the plan of a grounded run.

* :func:`split_passages` cuts a document into passages of ``passage_min_words`` to ``passage_max_words``
  words: paragraphs (blank-line separated) are gathered until the next would overflow; a paragraph longer
  than the room left is cut at a word; a tail shorter than the minimum joins the passage before it when it
  fits, else is left out (a whole document shorter than the minimum gives no passage).
* A passage's id is a hash of its words (:func:`passage_id`): the same on every machine and re-run, and
  the same text twice in a corpus is one passage.
* :func:`top_personas`: the top-k personas of each passage by cosine similarity of their embeddings
  (Qwen3-Embedding retrieves five candidate characters per document), a block of passages at a time.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from storage.documents import Document

#: the corpus the project ships (tasks/generation/data/README.md): ``generation.corpus = "python-docs"``
SHIPPED_CORPUS = "python-docs"
_PARAGRAPH = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class Passage:
    passage_id: str
    document: str
    position: int  # 1-based within its document
    words: int
    text: str


def shipped_corpus_path() -> Path:
    return Path(str(resources.files("tasks.generation") / "data" / SHIPPED_CORPUS))


def corpus_location(corpus: str) -> str:
    """``generation.corpus`` as a path or URL: the shipped corpus by name, anything else as given."""
    return str(shipped_corpus_path()) if corpus == SHIPPED_CORPUS else corpus


def passage_id(text: str) -> str:
    return "p-" + hashlib.sha256(" ".join(text.split()).encode()).hexdigest()[:16]


def _units(text: str) -> Iterator[tuple[int, str]]:
    """(words, text) of each paragraph (whitespace inside kept)."""
    for paragraph in _PARAGRAPH.split(text):
        n = len(paragraph.split())
        if n:
            yield n, paragraph.strip()


def split_passages(document: Document, min_words: int, max_words: int) -> list[Passage]:
    """The passages of one document, in order (see the module docstring)."""
    pieces: list[str] = []  # texts of the passages so far
    sizes: list[int] = []
    current: list[str] = []
    n = 0

    def flush() -> None:
        nonlocal current, n
        pieces.append("\n\n".join(current))
        sizes.append(n)
        current, n = [], 0

    for words, text in _units(document.text):
        while words:
            room = max_words - n
            if words <= room:
                current.append(text)
                n += words
                break
            if n >= min_words:
                flush()
                continue
            split = text.split()
            current.append(" ".join(split[:room]))
            n += room
            text, words = " ".join(split[room:]), words - room
            flush()
    if n >= min_words:
        flush()
    elif n and sizes and sizes[-1] + n <= max_words:
        pieces[-1] += "\n\n" + "\n\n".join(current)
        sizes[-1] += n
    return [
        Passage(passage_id(text), document.name, i, size, text)
        for i, (text, size) in enumerate(zip(pieces, sizes, strict=True), start=1)
    ]


def corpus_passages(documents: Iterable[Document], min_words: int, max_words: int) -> tuple[list[Passage], int]:
    """Every distinct passage of the documents in order, and how many repeated ones were left out."""
    seen: set[str] = set()
    passages: list[Passage] = []
    repeated = 0
    for document in documents:
        for passage in split_passages(document, min_words, max_words):
            if passage.passage_id in seen:
                repeated += 1
            else:
                seen.add(passage.passage_id)
                passages.append(passage)
    return passages, repeated


def top_personas(
    passage_vectors: np.ndarray, persona_vectors: np.ndarray, k: int, block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosine scores), each ``[passages, min(k, personas)]``, best first (rows are L2-normalised).

    A block of passages at a time, so memory is ``block x personas`` scores whatever the corpus size. The
    product and the selection are torch's (``topk``): numpy's ``argpartition`` over a 1,024 x 100,000 block
    took 5 s where ``topk`` takes 0.25 s (2 CPU cores)."""
    import torch

    k = min(k, len(persona_vectors))
    personas = torch.from_numpy(np.ascontiguousarray(persona_vectors, dtype=np.float32))
    indices = np.empty((len(passage_vectors), k), np.int64)
    scores = np.empty((len(passage_vectors), k), np.float32)
    with torch.inference_mode():
        for start in range(0, len(passage_vectors), block):
            part = torch.from_numpy(np.ascontiguousarray(passage_vectors[start : start + block], dtype=np.float32))
            top = torch.topk(part @ personas.T, k, dim=1, largest=True, sorted=True)
            indices[start : start + len(part)] = top.indices.numpy()
            scores[start : start + len(part)] = top.values.numpy()
    return indices, scores
