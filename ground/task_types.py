"""The names of the six task types: the one list every layer takes them from.

``prompts/task_types.py`` holds a spec (templates, placeholders, schema) for exactly these names and
checks it at import; settings validate ``generation.task_types`` against :data:`TaskTypeName`.
The four brainstormed types first brainstorm task instructions (persona as system prompt), then
generate one example per instruction; the direct types (STS, bitext) generate at once.
"""

from __future__ import annotations

from typing import Literal, get_args

TaskTypeName = Literal["retrieval", "classification", "short_short", "long_long", "sts", "bitext"]
#: every task type, in the KaLM-Embedding / E5-mistral order used by reports and defaults
ALL_TASK_TYPES: tuple[str, ...] = get_args(TaskTypeName)
#: the task types whose instructions are brainstormed
BRAINSTORM_TASK_TYPES: tuple[str, ...] = ("retrieval", "classification", "short_short", "long_long")
#: the task types generated directly, with a fixed instruction
DIRECT_TASK_TYPES: tuple[str, ...] = tuple(t for t in ALL_TASK_TYPES if t not in BRAINSTORM_TASK_TYPES)
