"""The two prompts of grounded generation (Qwen3-Embedding, 2025): a passage's config, then its query.

1. **Config**: the passage and its top-k candidate personas (nearest by embedding); the model picks the
   persona most likely to ask about it, a question type (:data:`QUESTION_TYPES`) and a difficulty
   (:data:`DIFFICULTIES`), constrained by :func:`config_schema` (the persona as its 1-based number).
2. **Query**: the passage, the chosen persona, type and difficulty, and a sampled length and language;
   the model writes one search query (:data:`QUERY_SCHEMA`) that the passage answers.

The passage is the positive of a ``retrieval`` row. The length and language are the retrieval task
type's own placeholders (``prompts/task_types.py``: ``query_length``, ``language``, with
``generation.placeholder_overrides["retrieval"]``), and the query's characters its query limit
(``ground/task_types.py``), so a grounded query is held to what any retrieval query is.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ground.task_types import TEXT_LIMITS
from prompts.render import RenderedPrompt
from prompts.schemas import object_schema, string_field

#: question type -> what the query is (the description goes into the config and query prompts)
QUESTION_TYPES: dict[str, str] = {
    "keywords": "a few keywords, as typed into a search box",
    "acquire_knowledge": "a question asking for knowledge the passage gives",
    "summary": "a request for a summary or overview of what the passage covers",
    "yes_or_no": "a question the passage answers with yes or no",
    "background": "a question about the background or context of the passage's subject",
}
DIFFICULTIES: tuple[str, ...] = ("high school", "university", "PhD")
#: the retrieval instruction of every grounded row (the export's "Instruct: ..." prefix)
GROUNDED_INSTRUCTION = "Given a search query, retrieve passages that answer the query."
#: the placeholders of the retrieval task type a grounded query samples
QUERY_PLACEHOLDERS: tuple[str, ...] = ("query_length", "language")

CONFIG_TEMPLATE = (
    "Given a passage and candidate characters, choose the character most likely to be interested in the "
    "passage, the type of question that character might ask about it, and the difficulty of that question.\n"
    "Passage:\n{passage}\n\n"
    "Candidate characters:\n{candidates}\n\n"
    "Question types:\n{question_types}\n\n"
    "Difficulties: {difficulties}.\n"
    'Answer with a JSON object only: {{"persona": the number of the chosen character, '
    '"question_type": one of the question types, "difficulty": one of the difficulties}}.'
)
QUERY_TEMPLATE = (
    "You are this character: {persona}\n"
    "Write one search query, as this character would, that the passage below answers and that retrieves it.\n"
    "Passage:\n{passage}\n\n"
    "Requirements:\n"
    "- The query is {question_type_description} (question type: {question_type}).\n"
    "- The query requires {difficulty} level education to understand.\n"
    "- The query is {query_length}.\n"
    "- The query is in {language}.\n"
    "- Do not copy sentences of the passage verbatim.\n"
    'Answer with a JSON object only: {{"query": "..."}}.'
)

QUERY_SCHEMA: dict[str, Any] = object_schema({"query": string_field(*TEXT_LIMITS["query"])})


def config_schema(candidates: int) -> dict[str, Any]:
    """The config answer: the persona's 1-based number among ``candidates``, a question type, a difficulty."""
    return object_schema(
        {
            "persona": {"type": "string", "enum": [str(i) for i in range(1, candidates + 1)]},
            "question_type": {"type": "string", "enum": list(QUESTION_TYPES)},
            "difficulty": {"type": "string", "enum": list(DIFFICULTIES)},
        }
    )


def _version() -> str:
    material = json.dumps(
        {
            "config": CONFIG_TEMPLATE,
            "query": QUERY_TEMPLATE,
            "types": QUESTION_TYPES,
            "difficulties": DIFFICULTIES,
            "schema": QUERY_SCHEMA,
            "instruction": GROUNDED_INSTRUCTION,
        },
        sort_keys=True,
    )
    return "grounded-" + hashlib.sha256(material.encode()).hexdigest()[:12]


#: a short content hash of everything that shapes the grounded prompts (the rows' ``prompt_version``)
PROMPT_VERSION = _version()


def render_config(passage: str, personas: list[str]) -> RenderedPrompt:
    candidates = "\n".join(f"{i}. {text}" for i, text in enumerate(personas, start=1))
    types = "\n".join(f"- {name}: {description}" for name, description in QUESTION_TYPES.items())
    user = CONFIG_TEMPLATE.format(
        passage=passage, candidates=candidates, question_types=types, difficulties=", ".join(DIFFICULTIES)
    )
    return RenderedPrompt(
        messages=[{"role": "user", "content": user}],
        schema=config_schema(len(personas)),
        schema_name="grounded_config",
        prompt_version=PROMPT_VERSION,
    )


def render_query(
    passage: str, persona: str, question_type: str, difficulty: str, placeholders: dict[str, Any]
) -> RenderedPrompt:
    user = QUERY_TEMPLATE.format(
        persona=persona,
        passage=passage,
        question_type=question_type,
        question_type_description=QUESTION_TYPES[question_type],
        difficulty=difficulty,
        query_length=placeholders["query_length"],
        language=placeholders["language"],
    )
    return RenderedPrompt(
        messages=[{"role": "user", "content": user}],
        schema=QUERY_SCHEMA,
        schema_name="grounded_query",
        prompt_version=PROMPT_VERSION,
    )
