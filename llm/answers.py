"""Read a model's JSON answer against its flat schema at a fraction of jsonschema's cost: the lean path's
``parse_output`` (``prompts/render.py``), with the same result and, on failure, the same error.

The answer schemas are flat (``prompts/schemas.py``: an object of strings with length bounds, or of an array
of such strings), so each is compiled once into a small checker that strips every string, checks types,
required and extra keys, enums, lengths, item counts and numeric bounds, and refuses blank strings, in one
pass. A schema using anything else is not compiled (jsonschema checks it). When an answer fails the checker,
or is not JSON orjson reads, ``prompts.render.parse_output`` reads it again and raises its own ``OutputInvalid``:
jsonschema words every error, so a rejected answer's reason is the same on both paths; the checker's
verdicts agree with jsonschema's (``tests/generation/test_llm_client.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from prompts.render import parse_output

Checker = Callable[[Any], Any]  # the cleaned value, or _BAD


class _Bad:
    __slots__ = ()


_BAD: Any = _Bad()
_ANNOTATIONS = {"title", "description", "default", "$comment", "examples"}
_CACHE_SIZE = 256
_by_id: dict[int, tuple[dict[str, Any], Checker | None]] = {}  # id(schema) -> (schema, its checker)
_by_text: dict[bytes, Checker | None] = {}


def parse_answer(text: str, schema: dict[str, Any]) -> dict[str, Any]:
    """Parse, strip every string, validate: ``parse_output``'s result; its ``OutputInvalid`` when invalid."""
    check = checker(schema)
    if check is not None:
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            value = _BAD
        if value is not _BAD:
            cleaned = check(value)
            if cleaned is not _BAD:
                return cleaned
    return parse_output(text, schema)  # raises with jsonschema's words (or accepts what orjson could not read)


def checker(schema: dict[str, Any]) -> Checker | None:
    """The compiled checker of ``schema`` (cached), or None where it uses a keyword this module does not know."""
    hit = _by_id.get(id(schema))
    if hit is not None and hit[0] is schema:
        return hit[1]
    text = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    if text not in _by_text:
        if len(_by_text) >= _CACHE_SIZE:
            _by_text.clear()
        _by_text[text] = compile_schema(schema)
    if len(_by_id) >= _CACHE_SIZE:
        _by_id.clear()
    _by_id[id(schema)] = (schema, _by_text[text])  # holding the schema keeps its id from being reused
    return _by_text[text]


def compile_schema(schema: Any) -> Checker | None:
    """A checker for ``schema``: value -> cleaned value (strings stripped) or ``_BAD``; None: not compilable."""
    if not isinstance(schema, dict) or not isinstance(schema.get("type"), str):
        return None
    kind = schema["type"]
    known = {"type", "enum"} | _ANNOTATIONS | _KEYWORDS.get(kind, set())
    if set(schema) - known:
        return None
    enum = schema.get("enum")
    if enum is not None and not (isinstance(enum, list) and all(isinstance(v, str) for v in enum)):
        return None  # jsonschema's enum equality across types (1 == 1.0, True != 1) is not worth copying
    build = _BUILDERS.get(kind)
    check = build(schema) if build else None
    if check is None or enum is None:
        return check
    allowed = set(enum)

    def in_enum(value: Any) -> Any:
        value = check(value)
        return value if value is not _BAD and value in allowed else _BAD

    return in_enum


def _string(schema: dict[str, Any]) -> Checker:
    low, high = schema.get("minLength", 0), schema.get("maxLength")

    def string(value: Any) -> Any:
        if type(value) is not str:
            return _BAD
        value = value.strip()
        n = len(value)  # code points, as jsonschema counts them
        return value if n and n >= low and (high is None or n <= high) else _BAD  # a blank string is invalid

    return string


def _object(schema: dict[str, Any]) -> Checker | None:
    properties = schema.get("properties", {})
    fields = {key: compile_schema(sub) for key, sub in properties.items()}
    if any(check is None for check in fields.values()) or not isinstance(schema.get("required", []), list):
        return None
    required = frozenset(schema.get("required", []))
    extra = schema.get("additionalProperties", True)
    if extra not in (True, False):
        return None
    closed = extra is False

    def obj(value: Any) -> Any:
        if type(value) is not dict or not required.issubset(value):
            return _BAD
        out = {}
        for key, item in value.items():
            check = fields.get(key)
            if check is None:
                if closed:
                    return _BAD
                item = _strip_any(item)
            else:
                item = check(item)
            if item is _BAD:
                return _BAD
            out[key] = item
        return out

    return obj


def _array(schema: dict[str, Any]) -> Checker | None:
    items = schema.get("items")
    check = compile_schema(items) if items is not None else _strip_any
    if check is None:
        return None
    low, high = schema.get("minItems", 0), schema.get("maxItems")

    def array(value: Any) -> Any:
        if type(value) is not list or len(value) < low or (high is not None and len(value) > high):
            return _BAD
        out = [check(v) for v in value]
        return _BAD if any(v is _BAD for v in out) else out

    return array


def _number(integer: bool) -> Callable[[dict[str, Any]], Checker]:
    def build(schema: dict[str, Any]) -> Checker:
        low, high = schema.get("minimum"), schema.get("maximum")

        def number(value: Any) -> Any:
            if type(value) not in (int, float) or (integer and type(value) is float and not value.is_integer()):
                return _BAD
            return value if (low is None or value >= low) and (high is None or value <= high) else _BAD

        return number

    return build


def _plain(kinds: tuple[type, ...]) -> Callable[[dict[str, Any]], Checker]:
    return lambda schema: lambda value: value if type(value) in kinds else _BAD


def _strip_any(value: Any) -> Any:
    """An unconstrained value: strings stripped; a blank string anywhere is invalid (as ``parse_output`` says)."""
    if isinstance(value, str):
        value = value.strip()
        return value if value else _BAD
    if isinstance(value, list):
        out = [_strip_any(v) for v in value]
        return _BAD if any(v is _BAD for v in out) else out
    if isinstance(value, dict):
        out = {k: _strip_any(v) for k, v in value.items()}
        return _BAD if any(v is _BAD for v in out.values()) else out
    return value


_KEYWORDS = {
    "string": {"minLength", "maxLength"},
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "integer": {"minimum", "maximum"},
    "number": {"minimum", "maximum"},
}
_BUILDERS: dict[str, Callable[[dict[str, Any]], Checker | None]] = {
    "string": _string,
    "object": _object,
    "array": _array,
    "integer": _number(integer=True),
    "number": _number(integer=False),
    "boolean": _plain((bool,)),
    "null": _plain((type(None),)),
}
