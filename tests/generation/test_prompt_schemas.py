"""The output side of the prompts: JSON schemas of examples and brainstorm lists, and output parsing
(``prompts.render.parse_output``). Templates, placeholders and versions are in ``test_prompts.py``."""

from __future__ import annotations

import json

import jsonschema
import pytest

from ground.task_types import ALL_TASK_TYPES
from prompts.render import OutputInvalid, parse_output
from prompts.schemas import EXAMPLE_SCHEMAS, brainstorm_schema


def text_of_length(n: int) -> str:
    """A non-blank string of exactly ``n`` characters (``n`` >= 1)."""
    base = ("lorem ipsum dolor sit amet " * (n // 10 + 2)).strip()
    out = base[:n]
    if out[-1] == " ":
        out = out[:-1] + "x"
    return out


def valid_value(schema: dict) -> dict:
    """A minimal object that satisfies ``schema`` (built from the schema, not from any output)."""
    value = {}
    for key, prop in schema["properties"].items():
        if prop["type"] == "string":
            value[key] = text_of_length(max(prop.get("minLength", 1), 3))
        elif prop["type"] == "array":
            item = prop["items"]
            value[key] = [
                text_of_length(max(item.get("minLength", 1), 3)) + f" {i}" for i in range(prop.get("minItems", 1))
            ]
        else:  # pragma: no cover - no other types are used
            raise AssertionError(prop)
    return value


# --- schemas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_TASK_TYPES)
def test_example_schema_accepts_valid_object(name):
    schema = EXAMPLE_SCHEMAS[name]
    value = valid_value(schema)
    jsonschema.validate(value, schema)
    parsed = parse_output(json.dumps(value), schema)
    assert parsed == value


@pytest.mark.parametrize("name", ALL_TASK_TYPES)
def test_example_schema_rejects_missing_keys(name):
    schema = EXAMPLE_SCHEMAS[name]
    for key in schema["properties"]:
        value = valid_value(schema)
        del value[key]
        with pytest.raises(OutputInvalid):
            parse_output(json.dumps(value), schema)


@pytest.mark.parametrize("name", ALL_TASK_TYPES)
def test_example_schema_rejects_extra_keys(name):
    schema = EXAMPLE_SCHEMAS[name]
    value = {**valid_value(schema), "explanation": "I made this up."}
    with pytest.raises(OutputInvalid):
        parse_output(json.dumps(value), schema)


@pytest.mark.parametrize("name", ALL_TASK_TYPES)
@pytest.mark.parametrize("bad", [17, 3.5, None, True, ["a list of words"], {"nested": "object"}])
def test_example_schema_rejects_wrong_types(name, bad):
    schema = EXAMPLE_SCHEMAS[name]
    for key in schema["properties"]:
        value = {**valid_value(schema), key: bad}
        with pytest.raises(OutputInvalid):
            parse_output(json.dumps(value), schema)


@pytest.mark.parametrize("name", ALL_TASK_TYPES)
def test_example_schema_rejects_too_long_strings(name):
    schema = EXAMPLE_SCHEMAS[name]
    key, prop = next(iter(schema["properties"].items()))
    value = {**valid_value(schema), key: text_of_length(prop["maxLength"] + 1)}
    with pytest.raises(OutputInvalid):
        parse_output(json.dumps(value), schema)


def test_brainstorm_schema_bounds_the_list():
    schema = brainstorm_schema(3)
    ok = ["Retrieve legal precedents for a tenancy dispute.", "Classify tweets by sentiment polarity."]
    assert parse_output(json.dumps({"tasks": ok}), schema) == {"tasks": ok}
    with pytest.raises(OutputInvalid):
        parse_output(json.dumps({"tasks": []}), schema)
    with pytest.raises(OutputInvalid):
        parse_output(json.dumps({"tasks": ok * 2}), schema)  # 4 > 3
    with pytest.raises(OutputInvalid):
        parse_output(json.dumps({"tasks": ["too short"]}), schema)  # under 10 characters
    with pytest.raises(OutputInvalid):
        parse_output(json.dumps({"tasks": ok, "more": 1}), schema)
    with pytest.raises(OutputInvalid):
        parse_output(json.dumps({"tasks": "Retrieve legal precedents."}), schema)


# --- parse_output --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", "   ", "not json at all", "{'single': 'quotes'}", '{"user_query": "unterminated', "```json\n{}\n```", None],
)
def test_parse_output_rejects_non_json(text):
    with pytest.raises(OutputInvalid):
        parse_output(text, EXAMPLE_SCHEMAS["retrieval"])


@pytest.mark.parametrize("text", ["[]", '"a string"', "42", "null", "true"])
def test_parse_output_rejects_json_that_is_not_an_object(text):
    with pytest.raises(OutputInvalid):
        parse_output(text, EXAMPLE_SCHEMAS["sts"])


@pytest.mark.parametrize("name", ALL_TASK_TYPES)
def test_parse_output_strips_whitespace(name):
    schema = EXAMPLE_SCHEMAS[name]
    value = valid_value(schema)
    padded = {k: f"  \n\t{v} \n " for k, v in value.items()}
    assert parse_output(json.dumps(padded), schema) == value


@pytest.mark.parametrize("name", ALL_TASK_TYPES)
def test_parse_output_rejects_blank_strings(name):
    schema = EXAMPLE_SCHEMAS[name]
    for key, prop in schema["properties"].items():
        blank = " " * max(prop.get("minLength", 1), 1) + "\n\t"
        value = {**valid_value(schema), key: blank}
        with pytest.raises(OutputInvalid, match=key):
            parse_output(json.dumps(value), schema)


def test_parse_output_strips_list_items():
    schema = brainstorm_schema(4)
    tasks = ["  Retrieve cooking recipes for a given ingredient.  ", "\tMatch a word with its definition.\n"]
    assert parse_output(json.dumps({"tasks": tasks}), schema) == {"tasks": [t.strip() for t in tasks]}


def test_parse_output_rejects_blank_list_items():
    """Strings must not be blank: also inside the brainstorm list."""
    schema = brainstorm_schema(4)
    tasks = ["Retrieve cooking recipes for a given ingredient.", " " * 12]
    with pytest.raises(OutputInvalid):
        parse_output(json.dumps({"tasks": tasks}), schema)


PADDABLE = [
    n for n in ALL_TASK_TYPES if any(p.get("minLength", 1) >= 2 for p in EXAMPLE_SCHEMAS[n]["properties"].values())
]


@pytest.mark.parametrize("name", PADDABLE)
def test_parse_output_result_satisfies_the_schema_after_stripping(name):
    """What parse_output returns must itself be valid: padding must not satisfy minLength."""
    schema = EXAMPLE_SCHEMAS[name]
    for key, prop in schema["properties"].items():
        min_len = prop.get("minLength", 1)
        if min_len < 2:
            continue
        short = "x" + " " * (min_len + 5)  # long enough only thanks to trailing spaces
        value = {**valid_value(schema), key: short}
        try:
            parsed = parse_output(json.dumps(value), schema)
        except OutputInvalid:
            continue
        jsonschema.validate(parsed, schema)


def test_parse_output_keeps_unicode():
    schema = EXAMPLE_SCHEMAS["bitext"]
    value = {"S1": "Der schnelle braune Fuchs.", "S2": "敏捷的棕色狐狸。", "S3": "Быстрая лиса."}
    assert parse_output(json.dumps(value, ensure_ascii=False), schema) == value
