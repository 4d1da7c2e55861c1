"""Every task type's placeholder space asks only for what validation keeps.

The test walks each type's whole space (the product of its placeholders' values, less the combinations the
space excludes) and rejects a combination that asks for something validation drops: a bitext translation
into its own language (``positive_equals_query``), a language validation cannot check, a length that
runs past the field's limit (``*_too_long``) or a one-word answer under it (``*_too_short``). The sampler is
checked to stay inside the space it declares.
"""

from __future__ import annotations

import itertools
import random

import pytest

from ground.task_types import field_limit
from prompts.budget import MAX_CHARS_PER_WORD, asked_words
from prompts.placeholders import Choice, PlaceholderSpace
from prompts.task_types import TASK_TYPES, check_placeholder_overrides
from tasks.cleaning.text_checks import _requested_languages, language_code


def space_combinations(space: PlaceholderSpace):
    """Every combination the space can produce: the product of its values, minus excluded pairs."""
    names = sorted(space.choices)
    for values in itertools.product(*(space.choices[name].values for name in names)):
        combo = dict(zip(names, values, strict=True))
        if all(combo[a] != combo[b] for a, b in space.distinct):
            yield combo


def contradictions(task_type: str, combo: dict) -> list[str]:
    """What in ``combo`` validation would drop or cannot check, from validation's own functions."""
    import json

    found = []
    query_lang, positive_lang = _requested_languages(json.dumps(combo, sort_keys=True), task_type)
    for lang in (query_lang, positive_lang):
        if lang is not None and language_code(lang) is None:
            found.append(f"language {lang!r} unknown to the language check")
    if task_type == "bitext" and query_lang == positive_lang:
        found.append(f"a translation from {query_lang} into {positive_lang}: positive_equals_query")
    for role, (fewest, most) in asked_words(task_type, combo).items():
        limit = field_limit(task_type, role)  # what validation keeps (and the schema allows)
        if most * MAX_CHARS_PER_WORD > limit.max_chars:
            found.append(f"{role}: up to {most} words may run past {limit.max_chars} chars ({role}_too_long)")
        if fewest == 1 and limit.min_chars > 1 + MAX_CHARS_PER_WORD:  # a one-word answer is allowed
            found.append(f"{role}: a one-word answer is under {limit.min_chars} chars ({role}_too_short)")
    return found


@pytest.mark.parametrize("name", list(TASK_TYPES))
def test_no_combination_asks_for_what_validation_drops(name):
    space = TASK_TYPES[name].placeholders
    bad = {}
    walked = 0
    for combo in space_combinations(space):
        walked += 1
        found = contradictions(name, combo)
        if found:
            bad[tuple(sorted(combo.items()))] = found
    assert walked > 0
    assert not bad, f"{len(bad)} of {walked} combinations of {name}, e.g. {next(iter(bad.items()))}"


def test_the_walk_rejects_same_language_bitext_when_nothing_excludes_it():
    """The walk can fail: the bitext space without its distinct pair has same-language combinations."""
    space = TASK_TYPES["bitext"].placeholders
    unconstrained = PlaceholderSpace(space.choices)
    assert any(contradictions("bitext", combo) for combo in space_combinations(unconstrained))


@pytest.mark.parametrize("name", list(TASK_TYPES))
def test_samples_stay_inside_the_walked_space(name):
    space = TASK_TYPES[name].placeholders
    rng = random.Random(7)
    for _ in range(5000):
        combo = space.sample(rng)
        assert all(combo[a] != combo[b] for a, b in space.distinct), combo
        assert not contradictions(name, combo), combo


def test_bitext_target_keeps_its_weights_without_the_source_language():
    space = TASK_TYPES["bitext"].placeholders
    rng = random.Random(3)
    draws = [space.sample(rng) for _ in range(20000)]
    english_sources = [d for d in draws if d["src_lang"] == "English"]
    assert english_sources and all(d["tgt_lang"] != "English" for d in english_sources)
    # without English, Chinese keeps its 20 of the remaining 50 weight: ~40 % of English sources' targets
    share = sum(d["tgt_lang"] == "Chinese" for d in english_sources) / len(english_sources)
    assert 0.35 < share < 0.45, share


def test_choice_without_the_last_value_refuses():
    with pytest.raises(ValueError, match="no value is left"):
        Choice(["English"]).without("English")


def test_overrides_that_force_the_same_language_are_refused():
    with pytest.raises(ValueError, match="bitext.src_lang and bitext.tgt_lang must differ"):
        check_placeholder_overrides({"bitext": {"src_lang": ["English"], "tgt_lang": ["English"]}})
    check_placeholder_overrides({"bitext": {"src_lang": ["English"], "tgt_lang": ["English", "German"]}})


def test_the_walk_rejects_a_length_past_the_limit():
    """The walk can fail: a retrieval document of 1,000 words is more than a document may hold."""
    combo = dict(next(space_combinations(TASK_TYPES["retrieval"].placeholders)), num_words=1000)
    assert any("positive_too_long" in c for c in contradictions("retrieval", combo))
