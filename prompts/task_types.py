"""The six task types: their templates, placeholder distributions, schemas and field mapping.

The names (and which types brainstorm) come from ``ground/task_types.py``; :func:`spec_table` checks
at import that the specs here are exactly those.

Templates follow the E5-mistral paper (Wang et al., 2024) as used by KaLM-Embedding: the four
asymmetric/matching types first brainstorm task instructions (persona as system prompt), then
generate one example per instruction without the persona; STS and bitext generate directly.
Changing any template, schema or distribution changes the type's ``prompt_version`` hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ground.task_types import ALL_TASK_TYPES, BRAINSTORM_TASK_TYPES
from prompts.placeholders import Choice, PlaceholderSpace
from prompts.schemas import EXAMPLE_SCHEMAS, FIELD_KEYS, brainstorm_schema

LANGUAGES = Choice(
    [
        "English",
        "Chinese",
        "Spanish",
        "French",
        "German",
        "Japanese",
        "Russian",
        "Portuguese",
        "Italian",
        "Korean",
        "Arabic",
        "Hindi",
        "Dutch",
        "Polish",
        "Turkish",
        "Vietnamese",
        "Indonesian",
        "Swedish",
    ],
    [40, 20, 5, 5, 5, 4, 4, 3, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1],
)
DIFFICULTY = Choice(["high school", "college", "PhD"])
CLARITY = Choice(["clear", "understandable with some effort", "ambiguous"])

JSON_ONLY = (
    "Your output must always be a JSON object only, do not explain yourself or output anything else. Be creative!"
)
BRAINSTORM_TAIL = (
    'Your output must always be a JSON object {{"tasks": [...]}} whose list has exactly {n} strings, '
    "each a distinct task in one sentence. Do not explain yourself or output anything else. Be creative!"
)

#: Persona Hub: the persona itself is the system prompt of the brainstorm step (and only of that step).
PERSONA_SYSTEM_TEMPLATE = "{persona}"


@dataclass(frozen=True)
class TaskTypeSpec:
    """Everything one task type needs to be prompted, constrained and mapped to training fields."""

    name: str
    example_template: str
    placeholders: PlaceholderSpace
    #: the parsed JSON's keys that become (query, positive, negative); negative may be None
    field_map: tuple[str, str, str | None]
    brainstorm_template: str | None = None
    #: the task instruction of types that are not brainstormed
    fixed_instruction: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def brainstorms(self) -> bool:
        return self.brainstorm_template is not None

    @property
    def schema(self) -> dict[str, Any]:
        return EXAMPLE_SCHEMAS[self.name]

    def brainstorm_schema(self, n: int) -> dict[str, Any]:
        return brainstorm_schema(n)

    @property
    def prompt_version(self) -> str:
        """A short content hash of everything that shapes this type's prompts and outputs."""
        material = json.dumps(
            {
                "system": PERSONA_SYSTEM_TEMPLATE,
                "brainstorm": self.brainstorm_template,
                "brainstorm_tail": BRAINSTORM_TAIL,
                "example": self.example_template,
                "schema": self.schema,
                "placeholders": self.placeholders.describe(),
                "field_map": self.field_map,
                "instruction": self.fixed_instruction,
            },
            sort_keys=True,
        )
        return hashlib.sha256(material.encode()).hexdigest()[:12]


RETRIEVAL = TaskTypeSpec(
    name="retrieval",
    brainstorm_template=(
        "Brainstorm a list of potentially useful text retrieval tasks.\n"
        "Here are a few examples for your reference:\n"
        "- Provided a scientific claim as query, retrieve documents that help verify or refute the claim.\n"
        "- Search for documents that answers a FAQ-style query on children's nutrition.\n"
        "Please adhere to the following guidelines:\n"
        "- Specify what the query is, and what the desired documents are.\n"
        "- Each retrieval task should cover a wide range of queries, and should not be too specific.\n"
    ),
    example_template=(
        "You have been assigned a retrieval task: {task}\n"
        "Your mission is to write one text retrieval example for this task in JSON format. "
        "The JSON object must contain the following keys:\n"
        '- "user_query": a string, a random user search query specified by the retrieval task.\n'
        '- "positive_document": a string, a relevant document for the user query.\n'
        '- "hard_negative_document": a string, a hard negative document that only appears relevant to the query.\n'
        "Please adhere to the following guidelines:\n"
        '- The "user_query" should be {query_type}, {query_length}, {clarity}, and diverse in topic.\n'
        "- All documents must be created independent of the query. Avoid copying the query verbatim.\n"
        "- All documents should be at least {num_words} words long.\n"
        '- The "hard_negative_document" contains some useful information, but it should be less useful '
        'or comprehensive compared to the "positive_document".\n'
        "- Both the query and documents should be in {language}.\n"
        "- Do not provide any explanation in any form.\n"
        '- The "user_query" should require {difficulty} level education to understand.\n' + JSON_ONLY
    ),
    placeholders=PlaceholderSpace(
        {
            "query_type": Choice(["extremely long-tail", "long-tail", "common"]),
            "query_length": Choice(["less than 5 words", "5 to 15 words", "at least 10 words"]),
            "clarity": CLARITY,
            "num_words": Choice([50, 100, 200, 300, 400]),
            "language": LANGUAGES,
            "difficulty": DIFFICULTY,
        }
    ),
    field_map=FIELD_KEYS["retrieval"],
)

CLASSIFICATION = TaskTypeSpec(
    name="classification",
    brainstorm_template=(
        "Brainstorm a list of potentially useful text classification tasks.\n"
        "Please adhere to the following guidelines:\n"
        "- Tasks should cover a diverse range of domains and task types.\n"
    ),
    example_template=(
        "You have been assigned a text classification task: {task}\n"
        "Your mission is to write one text classification example for this task in JSON format. "
        "The JSON object must contain the following keys:\n"
        '- "input_text": a string, the input text specified by the classification task.\n'
        '- "label": a string, the correct label of the input text.\n'
        '- "misleading_label": a string, an incorrect label that is related to the task.\n'
        "Please adhere to the following guidelines:\n"
        '- The "input_text" should be {num_words} words and diverse in expression.\n'
        '- The "misleading_label" must be a valid label for the given task, but not as appropriate as the '
        '"label" for the "input_text".\n'
        "- The values for all fields should be in {language}.\n"
        '- Avoid including the values of the "label" and "misleading_label" fields in the "input_text", '
        "that would make the task too easy.\n"
        '- The "input_text" is {clarity} and requires {difficulty} level education to comprehend.\n' + JSON_ONLY
    ),
    placeholders=PlaceholderSpace(
        {
            "num_words": Choice(["less than 10", "at least 10", "at least 50", "at least 100", "at least 200"]),
            "language": LANGUAGES,
            "clarity": CLARITY,
            "difficulty": DIFFICULTY,
        }
    ),
    field_map=FIELD_KEYS["classification"],
)

_MATCHING_EXAMPLE = (
    "You have been assigned a text matching task: {task}\n"
    "Your mission is to write one example for this task in JSON format. "
    "The JSON object must contain the following keys:\n"
    '- "input": a string, a random input specified by the task.\n'
    '- "positive_document": a string, a relevant document for the "input" according to the task.\n'
    "Please adhere to the following guidelines:\n"
    "- The values of all fields should be in {language}.\n"
    '- Both the "input" and "positive_document" should be {length_rule}, avoid substantial word overlaps, '
    "otherwise the task would be too easy.\n"
    '- The "input" and "positive_document" should be independent of each other.\n' + JSON_ONLY
)

SHORT_SHORT = TaskTypeSpec(
    name="short_short",
    brainstorm_template=(
        "Brainstorm a list of text matching tasks where both the queries and the groundtruth documents "
        "are very short (one or two sentences, even a short phrase).\n"
        "Here are a few examples:\n"
        "- Given a scientific paper title, retrieve the title of papers that cite the given paper.\n"
        "- Match a word with its definition.\n"
        "- Provided a notable person's name, identify their occupation or achievement.\n"
    ),
    example_template=_MATCHING_EXAMPLE,
    placeholders=PlaceholderSpace(
        {"language": LANGUAGES, "length_rule": Choice(["very short (a sentence or a phrase)"])}
    ),
    field_map=FIELD_KEYS["short_short"],
)

LONG_LONG = TaskTypeSpec(
    name="long_long",
    brainstorm_template=(
        "Brainstorm a list of text matching tasks where the queries are long documents.\n"
        "Here are a few examples:\n"
        "- Given a document that supports a debatable argument, find another document that contains "
        "opposite arguments.\n"
        "- Provided a lengthy business proposal, retrieve competing business proposals in the same industry.\n"
    ),
    example_template=_MATCHING_EXAMPLE,
    placeholders=PlaceholderSpace(
        {"language": LANGUAGES, "length_rule": Choice(["long documents (at least 300 words)"])}
    ),
    field_map=FIELD_KEYS["long_long"],
)

STS = TaskTypeSpec(
    name="sts",
    fixed_instruction="Retrieve semantically similar text.",
    example_template=(
        "Write a {unit} triple with varying semantic similarity scores in JSON format. The semantic "
        "similarity score ranges from 1 to 5, with 1 denotes least similar and 5 denotes most similar.\n"
        "Please adhere to the following guidelines:\n"
        '- The keys in JSON are "S1", "S2", and "S3", the values are all strings in {language}, '
        "do not add any other keys.\n"
        "- There should be some word overlaps between all three {unit}s.\n"
        "- The similarity score between S1 and S2 should be {high_score}.\n"
        "- The similarity score between S1 and S3 should be {low_score}.\n"
        "- The {unit}s require {difficulty} level education to understand and should be diverse in terms "
        "of topic and length.\n" + JSON_ONLY
    ),
    placeholders=PlaceholderSpace(
        {
            "unit": Choice(["sentence", "phrase", "passage"]),
            "high_score": Choice([4, 4.5, 5]),
            "low_score": Choice([2.5, 3, 3.5]),
            "language": LANGUAGES,
            "difficulty": Choice(["elementary school", "high school", "college"]),
        }
    ),
    field_map=FIELD_KEYS["sts"],
)

BITEXT = TaskTypeSpec(
    name="bitext",
    fixed_instruction="Retrieve parallel sentences.",
    example_template=(
        "Write a {unit} triple with one {unit} in {src_lang} and two {unit}s in {tgt_lang}, in JSON format.\n"
        "Please adhere to the following guidelines:\n"
        '- The keys in JSON are "S1", "S2", and "S3", the values are all strings, do not add any other keys.\n'
        "- S1 is in {src_lang}. S2 is a faithful translation of S1 into {tgt_lang} "
        "(similarity score {high_score} of 5).\n"
        "- S3 is a flawed translation of S1 into {tgt_lang} that changes some meaning "
        "(similarity score {low_score} of 5).\n"
        "- The {unit}s require {difficulty} level education to understand and should be diverse in terms "
        "of topic and length.\n" + JSON_ONLY
    ),
    placeholders=PlaceholderSpace(
        {
            "unit": Choice(["sentence", "phrase", "passage"]),
            "src_lang": LANGUAGES,
            "tgt_lang": Choice(["English", "Chinese", "Spanish", "French", "German", "Japanese"], [50, 20, 8, 8, 8, 6]),
            "high_score": Choice([4, 4.5, 5]),
            "low_score": Choice([1.5, 2, 2.5]),
            "difficulty": Choice(["elementary school", "high school", "college"]),
        },
        # a translation into the same language is dropped by validation (positive_equals_query)
        distinct=(("src_lang", "tgt_lang"),),
    ),
    field_map=FIELD_KEYS["bitext"],
)


def spec_table(specs: Sequence[TaskTypeSpec]) -> dict[str, TaskTypeSpec]:
    """Specs by name, in ground's order (``ground/task_types.py`` owns the names).

    Raises ``ValueError`` if the specs are not exactly ground's task types, one spec each, or if a spec
    brainstorms where ground says it does not (or the reverse).
    """
    by_name = {spec.name: spec for spec in specs}
    if len(by_name) != len(specs) or set(by_name) != set(ALL_TASK_TYPES):
        names = [spec.name for spec in specs]
        raise ValueError(f"task type specs {names} do not match ground.task_types.ALL_TASK_TYPES {ALL_TASK_TYPES}")
    brainstormed = sorted(name for name, spec in by_name.items() if spec.brainstorms)
    if brainstormed != sorted(BRAINSTORM_TASK_TYPES):
        raise ValueError(
            f"brainstormed specs {brainstormed} do not match ground.task_types.BRAINSTORM_TASK_TYPES "
            f"{BRAINSTORM_TASK_TYPES}"
        )
    return {name: by_name[name] for name in ALL_TASK_TYPES}


TASK_TYPES: dict[str, TaskTypeSpec] = spec_table((RETRIEVAL, CLASSIFICATION, SHORT_SHORT, LONG_LONG, STS, BITEXT))


def get_task_type(name: str) -> TaskTypeSpec:
    try:
        return TASK_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown task type {name!r}; choose from {', '.join(TASK_TYPES)}") from None


def check_placeholder_overrides(overrides: dict[str, dict[str, Any]]) -> None:
    """Raise ``ValueError`` naming ``generation.placeholder_overrides`` for a placeholder a task type lacks,
    or for overrides that leave two placeholders that must differ (bitext's languages) no way to."""
    for task_type, names in overrides.items():
        space = get_task_type(task_type).placeholders
        for name in names:
            if name not in space.choices:
                raise ValueError(
                    f"generation.placeholder_overrides: {task_type} has no placeholder {name!r}; "
                    f"it has {sorted(space.choices)}"
                )
        merged = space.merged({name: Choice(values) for name, values in names.items()})
        for a, b in space.distinct:
            for value in merged[a].values:
                if not set(merged[b].values) - {value}:
                    raise ValueError(
                        f"generation.placeholder_overrides: {task_type}.{a} and {task_type}.{b} must differ, "
                        f"but with {a} = {value!r} {b} has no other value"
                    )
