"""JSON schemas sent as ``response_format`` so vLLM constrains decoding, and used again to validate."""

from __future__ import annotations

from typing import Any


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
                "items": string_field(10, 300),
                "minItems": 1,
                "maxItems": max_items,
            }
        }
    )


SHORT = string_field(1, 300)
LONG = string_field(20, 3000)
LABEL = string_field(1, 100)

EXAMPLE_SCHEMAS: dict[str, dict[str, Any]] = {
    "retrieval": object_schema({"user_query": SHORT, "positive_document": LONG, "hard_negative_document": LONG}),
    "classification": object_schema({"input_text": LONG, "label": LABEL, "misleading_label": LABEL}),
    "short_short": object_schema({"input": SHORT, "positive_document": SHORT}),
    "long_long": object_schema({"input": LONG, "positive_document": LONG}),
    "sts": object_schema({"S1": string_field(1, 1500), "S2": string_field(1, 1500), "S3": string_field(1, 1500)}),
    "bitext": object_schema({"S1": string_field(1, 1500), "S2": string_field(1, 1500), "S3": string_field(1, 1500)}),
}
