"""Prompt templates, the task type registry, prompt versions and placeholder distributions (schemas and
output parsing: ``test_prompt_schemas.py``)."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import string

import pytest

from ground.task_types import ALL_TASK_TYPES, BRAINSTORM_TASK_TYPES, DIRECT_TASK_TYPES
from prompts.placeholders import Choice, PlaceholderSpace
from prompts.render import render_brainstorm, render_example
from prompts.schemas import EXAMPLE_SCHEMAS
from prompts.task_types import TASK_TYPES, check_placeholder_overrides, get_task_type, spec_table

ALL_TYPES = ("retrieval", "classification", "short_short", "long_long", "sts", "bitext")
BRAINSTORMED = ("retrieval", "classification", "short_short", "long_long")
DIRECT = ("sts", "bitext")

#: a ``{name}`` format field left in rendered text (JSON like ``{"tasks": ...}`` does not match)
LEFTOVER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")

PERSONA = "A night-shift nurse in Osaka who collects vintage fountain pens."
INSTRUCTION = "Given a recipe name, retrieve recipes that use similar ingredients."


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


# --- task type registry --------------------------------------------------------------------------


def test_registry_has_exactly_the_six_types():
    assert set(TASK_TYPES) == set(ALL_TYPES)
    for name in ALL_TYPES:
        assert get_task_type(name).name == name


def test_spec_table_has_ground_names_in_ground_order():
    """ground/task_types.py owns the names; the spec table here agrees with it, type for type."""
    assert ALL_TASK_TYPES == ALL_TYPES and BRAINSTORM_TASK_TYPES == BRAINSTORMED and DIRECT_TASK_TYPES == DIRECT
    assert tuple(TASK_TYPES) == ALL_TASK_TYPES
    assert {name for name, spec in TASK_TYPES.items() if spec.brainstorms} == set(BRAINSTORM_TASK_TYPES)


def test_spec_table_rejects_specs_that_disagree_with_ground():
    specs = list(TASK_TYPES.values())
    with pytest.raises(ValueError, match="ALL_TASK_TYPES"):
        spec_table(specs[:-1])  # one type without a spec
    with pytest.raises(ValueError, match="ALL_TASK_TYPES"):
        spec_table([*specs, dataclasses.replace(specs[0], name="poetry")])  # a type ground does not know
    with pytest.raises(ValueError, match="ALL_TASK_TYPES"):
        spec_table([*specs, specs[0]])  # a type twice
    direct_retrieval = dataclasses.replace(TASK_TYPES["retrieval"], brainstorm_template=None)
    with pytest.raises(ValueError, match="BRAINSTORM_TASK_TYPES"):
        spec_table([direct_retrieval if spec.name == "retrieval" else spec for spec in specs])
    assert list(spec_table(specs[::-1])) == list(ALL_TASK_TYPES)  # order from ground, not from the specs


def test_unknown_task_type_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="nope"):
        get_task_type("nope")


@pytest.mark.parametrize("name", BRAINSTORMED)
def test_brainstormed_types_have_template_and_no_fixed_instruction(name):
    spec = get_task_type(name)
    assert spec.brainstorms
    assert spec.fixed_instruction is None


@pytest.mark.parametrize("name", DIRECT)
def test_direct_types_have_fixed_instruction_and_do_not_brainstorm(name):
    spec = get_task_type(name)
    assert not spec.brainstorms
    assert isinstance(spec.fixed_instruction, str) and spec.fixed_instruction.strip()


@pytest.mark.parametrize("name", ALL_TYPES)
def test_template_fields_are_exactly_task_plus_placeholders(name):
    spec = get_task_type(name)
    fields = template_fields(spec.example_template)
    placeholders = set(spec.placeholders.choices)
    # every field of the template is filled ...
    assert fields - {"task"} <= placeholders
    # ... and every sampled placeholder is used by the template
    assert placeholders <= fields


@pytest.mark.parametrize("name", BRAINSTORMED)
def test_brainstormed_example_templates_use_the_task(name):
    assert "task" in template_fields(get_task_type(name).example_template)


@pytest.mark.parametrize("name", ALL_TYPES)
def test_field_map_keys_are_required_schema_keys(name):
    spec = get_task_type(name)
    query, positive, negative = spec.field_map
    required = set(spec.schema["required"])
    assert query in required and positive in required
    assert negative is None or negative in required
    assert len({k for k in spec.field_map if k}) == len([k for k in spec.field_map if k])


# --- rendering -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_TYPES)
def test_every_type_renders_without_leftover_placeholders(name):
    spec = get_task_type(name)
    rng = random.Random(7)
    for _ in range(25):
        placeholders = spec.placeholders.sample(rng)
        instruction = spec.fixed_instruction if not spec.brainstorms else INSTRUCTION
        prompt = render_example(spec, instruction, placeholders)
        content = "\n".join(m["content"] for m in prompt.messages)
        assert not LEFTOVER.findall(content), LEFTOVER.findall(content)
        for value in placeholders.values():
            assert str(value) in content
        if spec.brainstorms:
            assert INSTRUCTION in content


@pytest.mark.parametrize("name", ALL_TYPES)
def test_example_prompt_has_no_system_message_and_no_persona(name):
    spec = get_task_type(name)
    placeholders = spec.placeholders.sample(random.Random(1))
    prompt = render_example(spec, INSTRUCTION if spec.brainstorms else None, placeholders)
    assert [m["role"] for m in prompt.messages] == ["user"]
    assert all(PERSONA not in m["content"] for m in prompt.messages)
    assert prompt.schema == EXAMPLE_SCHEMAS[name]
    assert prompt.prompt_version == spec.prompt_version
    fmt = prompt.response_format
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["schema"] == EXAMPLE_SCHEMAS[name]
    assert fmt["json_schema"]["strict"] is True


@pytest.mark.parametrize("name", BRAINSTORMED)
def test_brainstorm_prompt_puts_persona_in_system_message_only(name):
    spec = get_task_type(name)
    prompt = render_brainstorm(spec, PERSONA, 7)
    roles = [m["role"] for m in prompt.messages]
    assert roles == ["system", "user"]
    assert PERSONA in prompt.messages[0]["content"]
    assert PERSONA not in prompt.messages[1]["content"]
    user = prompt.messages[1]["content"]
    assert not LEFTOVER.findall(user), LEFTOVER.findall(user)
    assert "7" in user  # the requested number of tasks is stated
    # the schema limits the list to the requested number
    assert prompt.schema["properties"]["tasks"]["maxItems"] == 7
    assert prompt.prompt_version == spec.prompt_version
    assert prompt.schema_name != spec.name  # brainstorm and example schemas are named apart


@pytest.mark.parametrize("name", BRAINSTORMED)
def test_brainstorm_persona_with_braces_is_kept_verbatim(name):
    persona = "A {weird} persona with {braces} and {0} in it."
    prompt = render_brainstorm(get_task_type(name), persona, 3)
    assert prompt.messages[0]["content"] == persona


@pytest.mark.parametrize("name", DIRECT)
def test_direct_types_refuse_to_brainstorm(name):
    with pytest.raises(ValueError):
        render_brainstorm(get_task_type(name), PERSONA, 5)


def test_instruction_with_braces_is_inserted_verbatim():
    spec = get_task_type("retrieval")
    tricky = "Find docs about {python} dict literals like {'a': 1}."
    prompt = render_example(spec, tricky, spec.placeholders.sample(random.Random(3)))
    assert tricky in prompt.messages[0]["content"]


# --- prompt_version ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_TYPES)
def test_prompt_version_is_stable(name):
    spec = get_task_type(name)
    copy = dataclasses.replace(spec)
    assert spec.prompt_version == spec.prompt_version == copy.prompt_version
    assert re.fullmatch(r"[0-9a-f]+", spec.prompt_version)


@pytest.mark.parametrize("name", ALL_TYPES)
def test_prompt_version_changes_with_example_template(name):
    spec = get_task_type(name)
    changed = dataclasses.replace(spec, example_template=spec.example_template + " Be concise.")
    assert changed.prompt_version != spec.prompt_version


@pytest.mark.parametrize("name", BRAINSTORMED)
def test_prompt_version_changes_with_brainstorm_template(name):
    spec = get_task_type(name)
    changed = dataclasses.replace(spec, brainstorm_template=spec.brainstorm_template + "- Be bold.\n")
    assert changed.prompt_version != spec.prompt_version


@pytest.mark.parametrize("name", ALL_TYPES)
def test_prompt_version_changes_with_placeholder_distribution(name):
    spec = get_task_type(name)
    key = sorted(spec.placeholders.choices)[0]
    old = spec.placeholders.choices[key]
    new_space = PlaceholderSpace({**spec.placeholders.choices, key: Choice([*old.values, "something new"])})
    changed = dataclasses.replace(spec, placeholders=new_space)
    assert changed.prompt_version != spec.prompt_version
    # weights alone matter too
    weighted = PlaceholderSpace(
        {**spec.placeholders.choices, key: Choice(list(old.values), [i + 1 for i in range(len(old.values))])}
    )
    if old.weights is None and len(old.values) > 1:
        assert dataclasses.replace(spec, placeholders=weighted).prompt_version != spec.prompt_version


@pytest.mark.parametrize("name", ALL_TYPES)
def test_prompt_version_changes_with_field_map_and_instruction(name):
    spec = get_task_type(name)
    q, p, n = spec.field_map
    assert dataclasses.replace(spec, field_map=(p, q, n)).prompt_version != spec.prompt_version
    other = (spec.fixed_instruction or "") + " Extra."
    assert dataclasses.replace(spec, fixed_instruction=other).prompt_version != spec.prompt_version


def test_prompt_versions_differ_between_types():
    versions = [get_task_type(n).prompt_version for n in ALL_TYPES]
    assert len(set(versions)) == len(ALL_TYPES)


# --- placeholders --------------------------------------------------------------------------------


def test_choice_rejects_empty_values_and_mismatched_weights():
    with pytest.raises(ValueError):
        Choice([])
    with pytest.raises(ValueError):
        Choice(["a", "b"], [1.0])


def test_choice_covers_all_values_and_respects_zero_weight():
    rng = random.Random(0)
    uniform = Choice(["a", "b", "c", "d"])
    assert {uniform.sample(rng) for _ in range(400)} == {"a", "b", "c", "d"}
    weighted = Choice(["x", "y", "z"], [1, 0, 1])
    seen = {weighted.sample(rng) for _ in range(400)}
    assert seen == {"x", "z"}


def test_choice_weights_shape_the_distribution():
    rng = random.Random(11)
    skewed = Choice(["common", "rare"], [95, 5])
    draws = [skewed.sample(rng) for _ in range(2000)]
    assert draws.count("common") > 5 * draws.count("rare") > 0


@pytest.mark.parametrize("name", ALL_TYPES)
def test_placeholder_sampling_is_deterministic_for_a_seed(name):
    space = get_task_type(name).placeholders
    a = [space.sample(random.Random(1234)) for _ in range(3)]
    b = [space.sample(random.Random(1234)) for _ in range(3)]
    assert a == b
    seq_a = random.Random(99)
    seq_b = random.Random(99)
    assert [space.sample(seq_a) for _ in range(20)] == [space.sample(seq_b) for _ in range(20)]


@pytest.mark.parametrize("name", ALL_TYPES)
def test_placeholder_sampling_covers_every_value(name):
    space = get_task_type(name).placeholders
    rng = random.Random(5)
    draws = [space.sample(rng) for _ in range(3000)]
    for key, choice in space.choices.items():
        seen = {d[key] for d in draws}
        possible = {v for v, w in zip(choice.values, choice.weights or [1] * len(choice.values), strict=True) if w > 0}
        assert seen == possible, key
    assert all(set(d) == set(space.choices) for d in draws)


def test_placeholder_sampling_does_not_depend_on_declaration_order():
    choices = {"b": Choice([1, 2, 3]), "a": Choice(["x", "y"]), "c": Choice([True, False])}
    forward = PlaceholderSpace(choices)
    backward = PlaceholderSpace(dict(reversed(list(choices.items()))))
    for seed in range(20):
        assert forward.sample(random.Random(seed)) == backward.sample(random.Random(seed))


def test_placeholder_sampling_different_seeds_differ():
    space = get_task_type("retrieval").placeholders
    samples = {json.dumps(space.sample(random.Random(seed)), sort_keys=True) for seed in range(30)}
    assert len(samples) > 1


def test_placeholder_overrides_only_replace_known_names():
    space = PlaceholderSpace({"lang": Choice(["en", "de"]), "n": Choice([1, 2])})
    rng = random.Random(0)
    for _ in range(30):
        out = space.sample(rng, overrides={"lang": Choice(["fr"]), "unknown": Choice(["zzz"])})
        assert out["lang"] == "fr"
        assert set(out) == {"lang", "n"}


def test_check_placeholder_overrides_names_the_setting_and_the_unknown_placeholder():
    check_placeholder_overrides({"retrieval": {"num_words": [10]}})  # a known name passes
    expected = r"generation.placeholder_overrides: retrieval has no placeholder 'word_count'"
    with pytest.raises(ValueError, match=expected):
        check_placeholder_overrides({"retrieval": {"word_count": [10]}})
