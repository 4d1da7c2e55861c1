"""JSON schemas sent as ``response_format`` so vLLM constrains decoding, and used again to validate.

String lengths come from ``ground/task_types.py``'s limits table, which validation reads too.
"""

from __future__ import annotations

from typing import Any

from ground.task_types import ROLES, TEXT_LIMITS, field_limit


def string_field(min_length: int = 1, max_length: int = 4000) -> dict[str, Any]:
    return {"type": "string", "minLength": min_length, "maxLength": max_length}


def object_schema(fields: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": fields,
        "required": list(fields),
        "additionalProperties": False,
    }


def brainstorm_schema(max_items: int) -> dict[str, Any]:
    return object_schema(
        {
            "tasks": {
                "type": "array",
                "items": string_field(*TEXT_LIMITS["instruction"]),
                "minItems": 1,
                "maxItems": max_items,
            }
        }
    )


def example_schema(task_type: str, field_map: tuple[str, str, str | None]) -> dict[str, Any]:
    """The object of ``field_map``'s keys, each limited as ``ground.task_types.field_limit`` says."""
    fields = {}
    for role, key in zip(ROLES, field_map, strict=True):
        limit = field_limit(task_type, role)
        if key is not None and limit is not None:
            fields[key] = string_field(limit.min_chars, limit.max_chars)
    return object_schema(fields)


#: the JSON keys of (query, positive, negative) per task type; prompts/task_types.py maps them to fields
FIELD_KEYS: dict[str, tuple[str, str, str | None]] = {
    "retrieval": ("user_query", "positive_document", "hard_negative_document"),
    "classification": ("input_text", "label", "misleading_label"),
    "short_short": ("input", "positive_document", None),
    "long_long": ("input", "positive_document", None),
    "sts": ("S1", "S2", "S3"),
    "bitext": ("S1", "S2", "S3"),
}
EXAMPLE_SCHEMAS: dict[str, dict[str, Any]] = {name: example_schema(name, keys) for name, keys in FIELD_KEYS.items()}
