"""The token budget: each request's max_tokens covers what its placeholders ask for, bounded by the context;
placeholders are capped to what fits; doctor and plan say when a type cannot fit; a run with a type far
below its target ends Failed with one line."""

from __future__ import annotations

import pyarrow as pa
import pytest

from flows.generate import targets_missed
from ground.settings import load_settings
from llm.client import Sampling
from prompts.budget import (
    TOKENS_PER_WORD,
    answer_room,
    answer_tokens,
    asked_words,
    budget_problems,
    budget_summary,
    largest_answer_tokens,
    prompt_allowance,
    smallest_answer_tokens,
    value_words,
)
from prompts.render import render_example
from prompts.task_types import TASK_TYPES
from tasks.generation.generate import plan_examples, request_sampling, split_targets

INSTRUCTIONS = pa.table(
    {
        "task_type": [t for t in TASK_TYPES if TASK_TYPES[t].brainstorms],
        "instruction": ["Given a question about houses, find documents that answer it."] * 4,
        "instruction_id": ["i1", "i2", "i3", "i4"],
        "persona_id": ["p"] * 4,
        "persona": ["a persona"] * 4,
    }
)


def test_value_words_reads_what_the_prompts_say():
    assert value_words(400) == (400, 600)
    assert value_words("at least 50") == (50, 75)
    assert value_words("less than 10") == (1, 10)
    assert value_words("5 to 15 words") == (5, 15)
    assert value_words("long documents (at least 300 words)") == (300, 450)
    assert value_words("passage") == (40, 200)
    with pytest.raises(ValueError, match="no length"):
        value_words("clear")


def test_a_400_word_retrieval_request_asks_for_two_documents_of_tokens():
    """Issue 28: two 400-word documents and the JSON do not fit 1,024 tokens; the request now asks for them."""
    words = asked_words("retrieval", {"query_length": "at least 10 words", "num_words": 400})
    assert words["positive"] == words["negative"] == (400, 600)
    need = answer_tokens("retrieval", {"query_length": "at least 10 words", "num_words": 400})
    assert need > 2 * 400 * TOKENS_PER_WORD > 1024
    sampling = Sampling(0.9, 0.95, max_tokens=1024, max_tokens_ceiling=30000)
    planned = plan_examples("r", 0, {"retrieval": 200}, INSTRUCTIONS, 42, 500, answer_room=30000)
    requests = [r for shard in planned for r in shard.requests]
    long_ones = [r for r in requests if r.placeholders["num_words"] == 400]
    assert long_ones, "some requests ask for 400-word documents"
    for request in requests:
        asked = request_sampling(request, sampling).max_tokens
        assert asked == max(1024, answer_tokens("retrieval", request.placeholders))


def test_placeholders_are_capped_to_what_the_context_holds():
    room = 1360  # the embedded server's 2,048-token context less the prompt allowance
    planned = plan_examples("r", 0, {"retrieval": 300}, INSTRUCTIONS, 42, 500, answer_room=room)
    requests = [r for shard in planned for r in shard.requests]
    assert {r.placeholders["num_words"] for r in requests} <= {50, 100, 200}
    assert all(answer_tokens("retrieval", r.placeholders) <= room for r in requests)
    sampling = Sampling(0.9, 0.95, max_tokens=256, max_tokens_ceiling=room)
    assert all(request_sampling(r, sampling).max_tokens <= room for r in requests)
    uncapped = plan_examples("r", 0, {"retrieval": 300}, INSTRUCTIONS, 42, 500)
    assert 400 in {r.placeholders["num_words"] for shard in uncapped for r in shard.requests}


def test_the_embedded_models_answers_are_capped_and_its_requests_ask_for_what_fits(monkeypatch):
    """SmolLM2 loops until the limit: its answers are capped (embedded_llm.max_answer_tokens), the
    placeholders fitted to the cap; another server's answers are bounded by its context alone."""
    from prompts.budget import answer_room

    for name in ("EMBED_FACTORY_LLM__BASE_URL", "EMBED_FACTORY_LLM__BASE_URLS"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.uses_embedded_llm and settings.embedded_llm.max_answer_tokens == 512
    assert answer_room(settings) == 512 and answer_room(settings, capped=False) == 2048 - prompt_allowance()
    planned = plan_examples("r", 0, {"retrieval": 300}, INSTRUCTIONS, 42, 500, answer_room=answer_room(settings))
    requests = [r for shard in planned for r in shard.requests]
    sampling = Sampling(0.9, 0.95, max_tokens=256, max_tokens_ceiling=answer_room(settings))
    assert {r.placeholders["num_words"] for r in requests} == {50}  # two 100-word documents and a query: > 512
    assert 256 < max(request_sampling(r, sampling).max_tokens for r in requests) <= 512
    monkeypatch.setenv("EMBED_FACTORY_EMBEDDED_LLM__MAX_ANSWER_TOKENS", "null")
    assert answer_room(load_settings()) == 2048 - prompt_allowance()
    monkeypatch.delenv("EMBED_FACTORY_EMBEDDED_LLM__MAX_ANSWER_TOKENS")
    monkeypatch.setenv("EMBED_FACTORY_LLM__BASE_URL", "http://llm.test/v1")  # not the embedded model: no cap
    monkeypatch.setenv("EMBED_FACTORY_LLM__CONTEXT_TOKENS", "32768")
    assert answer_room(load_settings()) == 32768 - prompt_allowance()


def test_the_prompt_allowance_holds_every_rendered_prompt():
    longest_instruction = "x" * 300
    for name, spec in TASK_TYPES.items():
        values = {k: max(c.values, key=lambda v: len(str(v))) for k, c in spec.placeholders.choices.items()}
        if spec.placeholders.distinct:
            a, b = spec.placeholders.distinct[0]
            values[b] = next(v for v in spec.placeholders.choices[b].values if v != values[a])
        prompt = render_example(spec, longest_instruction if spec.brainstorms else None, values)
        text = "".join(m["content"] for m in prompt.messages)
        assert len(text.encode()) / 3 <= prompt_allowance(), name


def test_doctor_and_plan_say_when_the_context_cannot_hold_a_type(monkeypatch):
    from embed_factory.doctor import WARN, check_token_budget

    monkeypatch.setenv("EMBED_FACTORY_LLM__BASE_URL", "http://llm.test/v1")
    monkeypatch.setenv("EMBED_FACTORY_LLM__CONTEXT_TOKENS", "2048")
    settings = load_settings()
    problems = budget_problems(settings)
    assert [p.split(":")[0] for p in problems] == ["long_long"]
    assert "raise llm.context_tokens to >= " in problems[0]
    check = check_token_budget(settings)
    assert check.status == WARN and "long_long" in check.detail and check.fix.startswith("raise llm.context_tokens")
    summary = budget_summary(settings, list(TASK_TYPES))
    space = TASK_TYPES["retrieval"].placeholders
    shortest, longest = smallest_answer_tokens("retrieval", space), largest_answer_tokens("retrieval", space)
    assert f"retrieval {shortest:,}-{answer_room(settings):,}, capped from {longest:,}" in summary
    assert "2,048-token context" in summary
    monkeypatch.setenv("EMBED_FACTORY_LLM__CONTEXT_TOKENS", "32768")
    assert budget_problems(load_settings()) == []
    assert check_token_budget(load_settings()).status == "OK"


def test_a_type_far_below_its_target_fails_the_run_with_one_line():
    targets = split_targets(600, list(TASK_TYPES))
    by_type = {t: 100 for t in TASK_TYPES} | {"long_long": 3, "retrieval": 49}
    rejects = pa.table(
        {
            "task_type": ["long_long"] * 5 + ["retrieval"],
            "reason": ["truncated at max_tokens 1360 (no more room): not JSON"] * 4 + ["http 500: x", "http 500: x"],
        }
    )
    line = targets_missed(targets, by_type, rejects, {t: 5 for t in TASK_TYPES})
    assert "\n" not in line
    assert "retrieval 49/100" in line and "long_long 3/100" in line and "sts" not in line
    assert "'truncated at max_tokens 1360 (no more room): not JSON' x4" in line
    assert "raise llm.context_tokens" in line
    assert targets_missed(targets, {t: 50 for t in TASK_TYPES}, rejects, {}) is None
    no_instructions = targets_missed(targets, by_type | {"retrieval": 100}, rejects, {"long_long": 0})
    assert "long_long 3/100 (no brainstormed instruction)" in no_instructions


def test_the_context_is_part_of_a_runs_fingerprint_and_older_runs_still_resume(monkeypatch):
    from flows.generate import _older, run_fingerprint

    monkeypatch.setenv("EMBED_FACTORY_LLM__CONTEXT_TOKENS", "4096")
    wide = run_fingerprint(load_settings())
    monkeypatch.setenv("EMBED_FACTORY_LLM__CONTEXT_TOKENS", "2048")
    narrow = run_fingerprint(load_settings())
    assert wide != narrow  # the context changes which placeholders are planned
    before = {**narrow, "sampling": {k: v for k, v in narrow["sampling"].items() if k != "context_tokens"}}
    assert _older(before, narrow) == narrow
