"""How long an answer a prompt asks for: words per field from its placeholders, and the tokens that holds.

Each task type's placeholders say how long its fields should be ("at least 300 words", "5 to 15 words",
"a passage"). :func:`asked_words` turns them into a (fewest, most) word range per field: "at least N"
reads as N to ``AT_LEAST_SLACK`` x N (a model that follows the prompt writes past N, rarely 1.5 N).
:func:`answer_tokens` is the budget such an answer needs: the most words, ``TOKENS_PER_WORD`` tokens each,
plus the JSON's own tokens. :func:`fit_placeholders` lowers a length placeholder to the largest of its
values whose answer fits a token budget (the "placeholder capped to what fits" rule).
:func:`request_max_tokens` is one request's ``max_tokens``: what it asks for, at least ``llm.max_tokens``,
at most what the server's context leaves after the prompt (:func:`answer_room`).

The factors are stated, not measured per tokenizer: BPE tokenizers of the Qwen2 / Llama family spend
~1.3 tokens on an English word and up to ~2 on German, Russian or Arabic ones; a Chinese or Japanese
"word" is a character or two, 1-2 tokens. 2.0 holds all of them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from ground.settings import Settings
from ground.task_types import ALL_TASK_TYPES, ROLES, TEXT_LIMITS
from prompts.placeholders import PlaceholderSpace

TOKENS_PER_WORD = 2.0
#: the JSON object's keys, quotes and escapes around the fields
JSON_OVERHEAD_TOKENS = 48
#: "at least N words" is answered with N to this many times N words
AT_LEAST_SLACK = 1.5
#: the most characters a word takes, spaces and punctuation included (German compounds, URLs)
MAX_CHARS_PER_WORD = 8

#: lengths of placeholder values that are not "N words" phrases
UNIT_WORDS: dict[str, tuple[int, int]] = {
    "phrase": (1, 10),
    "sentence": (3, 40),
    "passage": (40, 200),
    "very short (a sentence or a phrase)": (1, 30),
}
#: what a label is: a word or a few
LABEL_WORDS = (1, 5)

#: per task type and field (query, positive, negative): the placeholder that sets its length, or fixed words
LENGTH_SOURCES: dict[str, tuple[str | tuple[int, int], ...]] = {
    "retrieval": ("query_length", "num_words", "num_words"),
    "classification": ("num_words", LABEL_WORDS, LABEL_WORDS),
    "short_short": ("length_rule", "length_rule"),
    "long_long": ("length_rule", "length_rule"),
    "sts": ("unit", "unit", "unit"),
    "bitext": ("unit", "unit", "unit"),
}
if set(LENGTH_SOURCES) != set(ALL_TASK_TYPES):
    raise ValueError(f"LENGTH_SOURCES covers {sorted(LENGTH_SOURCES)}, not the task types {ALL_TASK_TYPES}")

_LESS_THAN = re.compile(r"less than (\d+)")
_RANGE = re.compile(r"(\d+) to (\d+)")
_AT_LEAST = re.compile(r"at least (\d+)")


def value_words(value: Any) -> tuple[int, int]:
    """The (fewest, most) words a placeholder value asks for: 300, "at least 50", "5 to 15 words", "phrase"."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value), math.ceil(AT_LEAST_SLACK * value)
    text = str(value)
    if text in UNIT_WORDS:
        return UNIT_WORDS[text]
    if m := _RANGE.search(text):
        return int(m[1]), int(m[2])
    if m := _LESS_THAN.search(text):
        return 1, int(m[1])
    if m := _AT_LEAST.search(text):
        return int(m[1]), math.ceil(AT_LEAST_SLACK * int(m[1]))
    raise ValueError(f"no length in placeholder value {value!r}")


def asked_words(task_type: str, placeholders: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Per field (query, positive, negative) the (fewest, most) words ``placeholders`` ask for."""
    words = {}
    for role, source in zip(ROLES, LENGTH_SOURCES[task_type], strict=False):
        words[role] = source if isinstance(source, tuple) else value_words(placeholders[source])
    return words


def answer_tokens(task_type: str, placeholders: Mapping[str, Any]) -> int:
    """The completion tokens an answer that follows ``placeholders`` may need."""
    most = sum(high for _low, high in asked_words(task_type, placeholders).values())
    return math.ceil(most * TOKENS_PER_WORD) + JSON_OVERHEAD_TOKENS


def length_placeholders(task_type: str) -> list[str]:
    """The placeholders that set a field's length."""
    return sorted({s for s in LENGTH_SOURCES[task_type] if isinstance(s, str)})


def fit_placeholders(
    task_type: str, space: PlaceholderSpace, placeholders: Mapping[str, Any], budget: int
) -> dict[str, Any]:
    """``placeholders`` with each length placeholder lowered, where the answer would not fit ``budget``
    tokens, to the largest of its distribution's values that fits (the smallest if none does)."""
    fitted = dict(placeholders)
    for name in length_placeholders(task_type):
        if answer_tokens(task_type, fitted) <= budget:
            break
        values = sorted(space.choices[name].values, key=lambda v: value_words(v)[1], reverse=True)
        fits = [v for v in values if answer_tokens(task_type, {**fitted, name: v}) <= budget]
        fitted[name] = fits[0] if fits else values[-1]
    return fitted


def smallest_answer_tokens(task_type: str, space: PlaceholderSpace) -> int:
    """The budget the shortest answer of this type needs (every length placeholder at its shortest)."""
    shortest = {
        name: min(space.choices[name].values, key=lambda v: value_words(v)[1])
        for name in length_placeholders(task_type)
    }
    return answer_tokens(task_type, shortest)


def largest_answer_tokens(task_type: str, space: PlaceholderSpace) -> int:
    """The budget the longest answer of this type needs."""
    longest = {
        name: max(space.choices[name].values, key=lambda v: value_words(v)[1])
        for name in length_placeholders(task_type)
    }
    return answer_tokens(task_type, longest)


#: bytes per token of a prompt, counted low (English runs ~4 bytes a token, CJK ~3): prompts are overestimated
PROMPT_BYTES_PER_TOKEN = 3


def prompt_allowance() -> int:
    """Tokens an example prompt may take: the longest template, instruction at its longest, counted low."""
    from prompts.task_types import TASK_TYPES

    longest = max(len(spec.example_template.encode()) for spec in TASK_TYPES.values())
    instruction = 3 * TEXT_LIMITS["instruction"].max_chars  # CJK: 3 bytes a character
    return math.ceil((longest + instruction) / PROMPT_BYTES_PER_TOKEN)


def context_tokens(settings: Settings) -> int | None:
    """The server's context: ``llm.context_tokens``, else the embedded server's max_model_len when it is the
    endpoint; None (unknown, no bound) for other servers."""
    if settings.llm.context_tokens is not None:
        return settings.llm.context_tokens
    return settings.embedded_llm.max_model_len if settings.uses_embedded_llm else None


def answer_cap(settings: Settings) -> int | None:
    """The embedded model's own bound on an answer (``embedded_llm.max_answer_tokens``), when it is the endpoint."""
    return settings.embedded_llm.max_answer_tokens if settings.uses_embedded_llm else None


def answer_room(settings: Settings, extra_prompt_chars: int = 0, capped: bool = True) -> int | None:
    """The most completion tokens one example request may ask for: the context less the prompt allowance
    (and less ``extra_prompt_chars`` more characters of prompt: a brainstorm's persona), at most the
    embedded model's :func:`answer_cap` (``capped=False``: what the context alone leaves)."""
    context, cap = context_tokens(settings), (answer_cap(settings) if capped else None)
    if context is None:
        return cap
    extra = math.ceil(3 * extra_prompt_chars / PROMPT_BYTES_PER_TOKEN)
    room = max(context - prompt_allowance() - extra, 16)
    return room if cap is None else min(room, cap)


def request_max_tokens(task_type: str, placeholders: Mapping[str, Any], floor: int, room: int | None) -> int:
    """``max_tokens`` of one request: what its placeholders ask for (at least ``floor``), at most ``room``."""
    wanted = max(floor, answer_tokens(task_type, placeholders))
    return wanted if room is None else min(wanted, room)


def budget_problems(settings: Settings) -> list[str]:
    """One line per task type whose shortest answer cannot fit the server's context (empty: all fit), each
    saying what to change. Where the embedded model's own cap (:func:`answer_cap`) is below what the context
    leaves, it binds, and it is a choice, not a problem: ``plan`` and ``doctor`` show it."""
    from prompts.task_types import get_task_type

    room, cap = answer_room(settings, capped=False), answer_cap(settings)
    if room is None or (cap is not None and cap <= room):  # the embedded model's own cap binds: a choice
        return []
    setting = (
        "llm.context_tokens"
        if settings.llm.context_tokens is not None or not settings.uses_embedded_llm
        else ("embedded_llm.max_model_len")
    )
    problems = []
    for task_type in settings.generation.task_types:
        need = smallest_answer_tokens(task_type, get_task_type(task_type).placeholders)
        if need > room:
            problems.append(
                f"{task_type}: its shortest answer needs ~{need} tokens ({TOKENS_PER_WORD:g} a word), a "
                f"{context_tokens(settings)}-token context leaves {room} after the prompt (requests are capped "
                f"there); raise {setting} to >= {need + prompt_allowance()} or drop {task_type} from "
                "generation.task_types"
            )
    return problems


def budget_summary(settings: Settings, task_types: list[str]) -> str:
    """One line for ``plan``: per type, the ``max_tokens`` its requests ask for (after capping to the context)."""
    from prompts.task_types import get_task_type

    room, floor = answer_room(settings), settings.llm.max_tokens
    parts = []
    for task_type in task_types:
        space = get_task_type(task_type).placeholders
        shortest, longest = smallest_answer_tokens(task_type, space), largest_answer_tokens(task_type, space)
        asked = (min(max(floor, shortest), room or shortest), min(max(floor, longest), room or longest))
        capped = f", capped from {longest:,}" if room is not None and longest > room else ""
        parts.append(f"{task_type} {asked[0]:,}-{asked[1]:,}{capped}")
    context = context_tokens(settings)
    where = f"{context:,}-token context" if context else "context unknown (llm.context_tokens)"
    return f"max_tokens per request ({TOKENS_PER_WORD:g} tokens a word asked, {where}): " + "; ".join(parts)
