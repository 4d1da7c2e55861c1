"""The names of the six task types: the one list every layer takes them from.

``prompts/task_types.py`` holds a spec (templates, placeholders, schema) for exactly these names and
checks it at import; settings validate ``generation.task_types`` against :data:`TaskTypeName`.
The four brainstormed types first brainstorm task instructions (persona as system prompt), then
generate one example per instruction; the direct types (STS, bitext) generate at once.
Each field's character limits (:data:`TEXT_LIMITS`, :data:`FIELD_KINDS`) live here too, below both
the prompts' JSON schemas and validation, so the two cannot disagree.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

TaskTypeName = Literal["retrieval", "classification", "short_short", "long_long", "sts", "bitext"]
#: every task type, in the KaLM-Embedding / E5-mistral order used by reports and defaults
ALL_TASK_TYPES: tuple[str, ...] = get_args(TaskTypeName)
#: the task types whose instructions are brainstormed
BRAINSTORM_TASK_TYPES: tuple[str, ...] = ("retrieval", "classification", "short_short", "long_long")
#: the task types generated directly, with a fixed instruction
DIRECT_TASK_TYPES: tuple[str, ...] = tuple(t for t in ALL_TASK_TYPES if t not in BRAINSTORM_TASK_TYPES)


class CharLimit(NamedTuple):
    """The characters a generated field may have: the JSON schema's min/maxLength and validation's bounds."""

    min_chars: int
    max_chars: int


#: what a field holds decides its limits: the one table that ``prompts/schemas.py`` (what the model may
#: write) and ``tasks/cleaning/validate.py`` (what is kept) both read. A document of 600 words at 8
#: characters a word (the longest the prompts ask for, see ``prompts/budget.py``) fits ``document``.
TEXT_LIMITS: dict[str, CharLimit] = {
    "query": CharLimit(2, 300),  # a search query, a short matching input or output
    "text": CharLimit(2, 6000),  # a classification input: a phrase or a long text
    "document": CharLimit(20, 6000),
    "label": CharLimit(1, 100),
    "sentence": CharLimit(1, 2000),  # an STS or bitext unit: a phrase, a sentence or a passage
    "instruction": CharLimit(10, 300),  # a brainstormed task
}
#: per task type, the kind of its (query, positive, negative); None: the type has no negative
FIELD_KINDS: dict[str, tuple[str, str, str | None]] = {
    "retrieval": ("query", "document", "document"),
    "classification": ("text", "label", "label"),
    "short_short": ("query", "query", None),
    "long_long": ("document", "document", None),
    "sts": ("sentence", "sentence", "sentence"),
    "bitext": ("sentence", "sentence", "sentence"),
}
ROLES: tuple[str, ...] = ("query", "positive", "negative")


def field_limit(task_type: str, role: str) -> CharLimit | None:
    """The limits of ``role`` (query, positive, negative) of ``task_type``; None if the type has no such field."""
    kind = FIELD_KINDS[task_type][ROLES.index(role)]
    return TEXT_LIMITS[kind] if kind is not None else None
