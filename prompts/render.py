"""Render chat messages for a task type and validate a model's JSON output against its schema."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import jsonschema
import jsonschema.exceptions
import jsonschema.protocols
import jsonschema.validators

from prompts.task_types import BRAINSTORM_TAIL, PERSONA_SYSTEM_TEMPLATE, TaskTypeSpec


class OutputInvalid(ValueError):
    """The model's output is not a JSON object that satisfies the schema."""


@dataclass(frozen=True)
class RenderedPrompt:
    messages: list[dict[str, str]]
    schema: dict[str, Any]
    schema_name: str
    prompt_version: str

    @property
    def response_format(self) -> dict[str, Any]:
        """OpenAI ``response_format``; vLLM turns it into a decoding grammar."""
        return {
            "type": "json_schema",
            "json_schema": {"name": self.schema_name, "schema": self.schema, "strict": True},
        }


def render_brainstorm(spec: TaskTypeSpec, persona: str, n: int) -> RenderedPrompt:
    """The brainstorm step: the persona is the system prompt."""
    if not spec.brainstorms:
        raise ValueError(f"task type {spec.name!r} does not brainstorm instructions")
    user = spec.brainstorm_template + BRAINSTORM_TAIL.format(n=n)
    return RenderedPrompt(
        messages=[
            {"role": "system", "content": PERSONA_SYSTEM_TEMPLATE.format(persona=persona)},
            {"role": "user", "content": user},
        ],
        schema=spec.brainstorm_schema(n),
        schema_name=f"{spec.name}_brainstorm",
        prompt_version=spec.prompt_version,
    )


def render_example(spec: TaskTypeSpec, instruction: str | None, placeholders: dict[str, Any]) -> RenderedPrompt:
    """The generation step: no persona; the instruction and placeholders fill the template."""
    user = spec.example_template.format(task=instruction or "", **placeholders)
    return RenderedPrompt(
        messages=[{"role": "user", "content": user}],
        schema=spec.schema,
        schema_name=spec.name,
        prompt_version=spec.prompt_version,
    )


def parse_output(text: str, schema: dict[str, Any]) -> dict[str, Any]:
    """Parse, strip every string, then validate; a blank string anywhere is invalid."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError) as exc:
        raise OutputInvalid(f"not JSON: {exc}") from None
    cleaned = _strip_strings(value)
    # the same error jsonschema.validate() reports (best_match), without re-checking the schema each call
    error = jsonschema.exceptions.best_match(_validator(json.dumps(schema, sort_keys=True)).iter_errors(cleaned))
    if error is not None:
        where = ".".join(map(str, error.absolute_path)) or "(root)"
        raise OutputInvalid(f"schema: {where}: {error.message}") from None
    if _has_blank(cleaned):
        raise OutputInvalid("blank string in output")
    return cleaned


@functools.lru_cache(maxsize=64)
def _validator(schema_json: str) -> jsonschema.protocols.Validator:
    """One checked validator per schema: jsonschema.validate() re-checks the schema against its metaschema
    on every call (3.1 of parse_output's 4.0 ms of CPU per answer, bench/fleet.py's profile)."""
    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _has_blank(value: Any) -> bool:
    if isinstance(value, str):
        return not value
    if isinstance(value, list):
        return any(_has_blank(v) for v in value)
    if isinstance(value, dict):
        return any(_has_blank(v) for v in value.values())
    return False


def _strip_strings(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        return [_strip_strings(v) for v in value]
    if isinstance(value, dict):
        return {k: _strip_strings(v) for k, v in value.items()}
    return value
