"""Pure planning: target splits, brainstorm rounds, instruction dedup and example plans."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from ground.seeding import rng_for, stable_seed
from personas.sampling import PersonaSampler
from personas.sources import make_persona
from prompts.render import render_example
from prompts.task_types import get_task_type
from storage.schemas import BRAINSTORM_SCHEMA, INSTRUCTION_SCHEMA
from tasks.generation.brainstorm import (
    MAX_OVERSHOOT,
    OVERSHOOT,
    YIELD_MARGIN,
    asked_for,
    deficits,
    instruction_key,
    next_overshoot,
    next_overshoots,
    plan_round,
    unique_instructions,
)
from tasks.generation.generate import plan_examples, split_targets

REPO_ROOT = Path(__file__).resolve().parents[2]
BRAINSTORMED = ("retrieval", "classification", "short_short", "long_long")
LEFTOVER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")

POOL = [
    make_persona(f"Persona number {i}: a {job} from {city}.")
    for i, (job, city) in enumerate(
        [(j, c) for j in ("baker", "pilot", "nurse", "coder", "farmer") for c in ("Oslo", "Lima", "Pune", "Kyiv")]
    )
]


@pytest.fixture
def sampler() -> PersonaSampler:
    return PersonaSampler(POOL, seed=11)


# --- seeding -------------------------------------------------------------------------------------


def test_stable_seed_is_31_bit_and_key_sensitive():
    seeds = {stable_seed(42, f"key-{i}") for i in range(200)}
    assert len(seeds) == 200
    assert all(0 <= s < 2**31 for s in seeds)
    assert stable_seed(42, "a") == stable_seed(42, "a")
    assert stable_seed(42, "a") != stable_seed(43, "a")
    assert rng_for(1, "x").random() == rng_for(1, "x").random()


# --- split_targets -------------------------------------------------------------------------------


@pytest.mark.parametrize("total", [0, 1, 5, 6, 7, 119, 120, 121, 550_000])
@pytest.mark.parametrize("types", [("sts",), ("retrieval", "sts"), BRAINSTORMED, BRAINSTORMED + ("sts", "bitext")])
def test_split_targets_sums_to_total_and_is_even(total, types):
    split = split_targets(total, types)
    assert list(split) == list(types)
    assert sum(split.values()) == total
    assert max(split.values()) - min(split.values()) <= 1
    assert all(v >= 0 for v in split.values())
    # the remainder goes to the first types
    values = [split[t] for t in types]
    assert values == sorted(values, reverse=True)


# --- instruction_key / deficits ------------------------------------------------------------------


def test_instruction_key_ignores_case_space_and_edge_punctuation():
    base = instruction_key("Retrieve recipes that use a given ingredient")
    for variant in [
        "retrieve recipes that use a given ingredient.",
        "  RETRIEVE   recipes that\tuse a given\ningredient!!  ",
        "- Retrieve recipes that use a given ingredient",
        '"Retrieve recipes that use a given ingredient."',
    ]:
        assert instruction_key(variant) == base, variant
    assert instruction_key("Retrieve recipes, that use a given ingredient") != base  # inner punctuation kept
    assert instruction_key(instruction_key(" X-ray  images! ")) == instruction_key(" X-ray  images! ")


def test_deficits():
    table = pa.Table.from_pylist(
        [{"task_type": t} for t in ["retrieval"] * 3 + ["classification"] * 7 + ["sts"]],
        schema=pa.schema([("task_type", pa.string())]),
    )
    assert deficits(table, {"retrieval": 5, "classification": 5, "long_long": 2}) == {
        "retrieval": 2,
        "classification": 0,
        "long_long": 2,
    }


# --- plan_round ----------------------------------------------------------------------------------


DEFICITS = {"retrieval": 40, "classification": 7, "short_short": 0, "long_long": 1}


def test_plan_round_is_deterministic(sampler):
    a = plan_round(0, DEFICITS, sampler, per_request=6, shard_size=5, seed=42)
    b = plan_round(
        0,
        dict(reversed(list(DEFICITS.items()))),
        PersonaSampler(list(reversed(POOL)), seed=11),
        per_request=6,
        shard_size=5,
        seed=42,
    )
    assert a == b
    c = plan_round(0, DEFICITS, sampler, per_request=6, shard_size=5, seed=43)
    assert [r.seed for s in a for r in s.requests] != [r.seed for s in c for r in s.requests]


@pytest.mark.parametrize("per_request,shard_size", [(1, 1), (6, 5), (20, 500), (7, 3)])
def test_plan_round_covers_deficits_with_overshoot(sampler, per_request, shard_size):
    shards = plan_round(3, DEFICITS, sampler, per_request=per_request, shard_size=shard_size, seed=1)
    requests = [r for s in shards for r in s.requests]
    by_type = Counter(r.task_type for r in requests)
    for task_type, deficit in DEFICITS.items():
        asked = by_type[task_type] * per_request
        if deficit <= 0:
            assert by_type[task_type] == 0
            continue
        assert asked >= deficit * OVERSHOOT
        # no more requests than needed to cover the overshoot
        assert (by_type[task_type] - 1) * per_request < deficit * OVERSHOOT
    assert set(by_type) <= {t for t, d in DEFICITS.items() if d > 0}
    assert all(r.n == per_request for r in requests)


def test_plan_round_scales_each_type_by_its_overshoot(sampler):
    overshoot = {"retrieval": 4.0, "classification": 2.5}
    shards = plan_round(1, DEFICITS, sampler, per_request=6, shard_size=5, seed=1, overshoot=overshoot)
    by_type = Counter(r.task_type for s in shards for r in s.requests)
    assert by_type["retrieval"] == math.ceil(40 * 4.0 / 6) == asked_for(40, 4.0, 6)
    assert by_type["classification"] == math.ceil(7 * 2.5 / 6)
    assert by_type["long_long"] == math.ceil(1 * OVERSHOOT / 6)  # absent from the mapping: the default
    assert "short_short" not in by_type


def test_next_overshoot_follows_the_last_rounds_yield():
    # 60 asked closed 20 of the deficit: a yield of 1/3, so three times the rest, with the margin
    assert next_overshoot(30, 10, asked=60, overshoot=1.5) == pytest.approx(3 * YIELD_MARGIN)
    assert next_overshoot(30, 0, asked=30, overshoot=1.5) == OVERSHOOT  # never below the first round's
    assert next_overshoot(30, 30, asked=45, overshoot=1.5) == MAX_OVERSHOOT  # nothing gained
    assert next_overshoot(30, 29, asked=600, overshoot=1.5) == MAX_OVERSHOOT  # capped
    assert next_overshoot(0, 0, asked=0, overshoot=2.0) == 2.0  # not asked: unchanged


def _rounds_to_target(deficit: int, new_share: float, adaptive: bool, per_request: int = 5) -> int:
    """Rounds a type needs when a share of what it is asked is new (a model that repeats itself), sized as
    ``brainstorm_to_targets`` sizes them (``next_overshoots``) or at the fixed first-round ``OVERSHOOT``."""
    overshoot: dict[str, float] = {}
    rounds = 0
    while deficit > 0:
        rounds += 1
        asked = asked_for(deficit, overshoot.get("t", OVERSHOOT), per_request) * per_request
        after = max(0, deficit - max(1, round(asked * new_share)))  # one new instruction at least
        if adaptive:
            overshoot = next_overshoots(overshoot, {"t": deficit}, {"t": after}, per_request)
        deficit = after
    return rounds


@pytest.mark.parametrize("new_share", [0.2, 0.3, 0.45])
def test_yield_sized_rounds_reach_the_target_in_fewer_rounds(new_share):
    fixed = _rounds_to_target(400, new_share, adaptive=False)
    sized = _rounds_to_target(400, new_share, adaptive=True)
    assert sized <= 3 < fixed


@pytest.mark.parametrize("shard_size", [1, 4, 9, 1000])
def test_plan_round_shards_are_bounded_and_ids_unique(sampler, shard_size):
    shards = plan_round(2, DEFICITS, sampler, per_request=3, shard_size=shard_size, seed=1)
    total = sum(math.ceil(d * OVERSHOOT / 3) for d in DEFICITS.values() if d > 0)
    assert sum(len(s.requests) for s in shards) == total
    assert all(0 < len(s.requests) <= shard_size for s in shards)
    assert len(shards) == math.ceil(total / shard_size)
    ids = [r.request_id for s in shards for r in s.requests]
    assert len(set(ids)) == len(ids)
    assert len({s.shard_id for s in shards}) == len(shards)


def test_plan_round_ids_differ_between_rounds(sampler):
    r0 = plan_round(0, DEFICITS, sampler, per_request=3, shard_size=4, seed=1)
    r1 = plan_round(1, DEFICITS, sampler, per_request=3, shard_size=4, seed=1)
    assert not {s.shard_id for s in r0} & {s.shard_id for s in r1}
    assert not {r.request_id for s in r0 for r in s.requests} & {r.request_id for s in r1 for r in s.requests}


def test_plan_round_personas_come_from_sampler(sampler):
    shards = plan_round(0, DEFICITS, sampler, per_request=1, shard_size=10, seed=1)
    requests = [r for s in shards for r in s.requests]
    assert all(r.persona == sampler.draw(r.request_id) for r in requests)
    assert len({r.persona.persona_id for r in requests}) > 5  # spread over the pool
    assert all(r.seed == stable_seed(1, r.request_id) for r in requests)


def test_plan_round_nothing_to_do(sampler):
    assert plan_round(0, {"retrieval": 0, "classification": -2}, sampler, 5, 5, 1) == []
    assert plan_round(0, {}, sampler, 5, 5, 1) == []


# --- unique_instructions -------------------------------------------------------------------------


def brainstorm_rows(entries: list[tuple[str, str, str, str]]) -> pa.Table:
    """(shard_id, task_type, instruction, persona text) -> a BRAINSTORM_SCHEMA table."""
    rows = []
    for shard_id, task_type, instruction, persona in entries:
        p = make_persona(persona)
        rows.append(
            {
                "run_id": "r",
                "shard_id": shard_id,
                "task_type": task_type,
                "instruction": instruction,
                "persona_id": p.persona_id,
                "persona": p.text,
                "prompt_version": "v",
                "model": "m",
                "prompt_tokens": 1,
                "completion_tokens": 1,
                "latency_s": 0.1,
                "created_at": None,
            }
        )
    return pa.Table.from_pylist(rows, schema=BRAINSTORM_SCHEMA)


def test_unique_instructions_dedups_per_type_and_keeps_first_by_shard():
    table = brainstorm_rows(
        [
            # later shard listed first in the table: must lose to the earlier shard
            ("b000-00001", "retrieval", "Retrieve recipes for a given ingredient.", "Late persona"),
            ("b000-00000", "retrieval", "retrieve RECIPES for a given   ingredient", "Early persona"),
            ("b000-00000", "retrieval", "Find case law about tenancy disputes.", "Early persona"),
            ("b000-00000", "classification", "Retrieve recipes for a given ingredient.", "Class persona"),
            ("b000-00001", "classification", "Classify tweets by sentiment polarity.", "Late persona"),
            ("b000-00001", "classification", "- Classify tweets by sentiment polarity!", "Other persona"),
        ]
    )
    out = unique_instructions(table, {"retrieval": 10, "classification": 10})
    assert out.schema.equals(INSTRUCTION_SCHEMA, check_metadata=False)
    rows = out.to_pylist()
    retrieval = [r for r in rows if r["task_type"] == "retrieval"]
    classification = [r for r in rows if r["task_type"] == "classification"]
    assert len(retrieval) == 2
    assert len(classification) == 2  # same text as a retrieval one is fine in another type
    recipes = next(r for r in retrieval if "recipes" in r["normalized"])
    assert recipes["persona"] == "Early persona"
    assert recipes["instruction"] == "retrieve RECIPES for a given   ingredient"
    assert recipes["persona_id"] == make_persona("Early persona").persona_id
    tweets = next(r for r in classification if "tweets" in r["normalized"])
    assert tweets["persona"] == "Late persona"
    for r in rows:
        assert r["normalized"] == instruction_key(r["instruction"])
    keys = [(r["task_type"], r["normalized"]) for r in rows]
    assert len(set(keys)) == len(keys)
    ids = [r["instruction_id"] for r in rows]
    assert len(set(ids)) == len(ids)


def test_unique_instructions_caps_at_target_in_shard_order():
    entries = [
        (f"b000-{k:05d}", "long_long", f"Long matching task variant number {k}.", f"Persona {k}") for k in range(10)
    ]
    table = brainstorm_rows(list(reversed(entries)))
    out = unique_instructions(table, {"long_long": 4}).to_pylist()
    assert len(out) == 4
    assert [r["persona"] for r in out] == [f"Persona {k}" for k in range(4)]


def test_unique_instructions_ignores_untargeted_types_and_too_short():
    table = brainstorm_rows(
        [
            ("b000-00000", "short_short", "Match a word with its definition.", "P"),
            ("b000-00000", "retrieval", "Retrieve legal documents.", "P"),
            ("b000-00000", "retrieval", "  ...  ", "P"),
        ]
    )
    out = unique_instructions(table, {"retrieval": 5}).to_pylist()
    assert [r["task_type"] for r in out] == ["retrieval"]
    assert out[0]["instruction"] == "Retrieve legal documents."


def test_unique_instructions_empty():
    out = unique_instructions(brainstorm_rows([]), {"retrieval": 3})
    assert out.num_rows == 0


def test_deficits_after_unique_instructions():
    entries = [("b000-00000", "retrieval", f"Retrieval task number {k} for testing.", "P") for k in range(3)]
    table = unique_instructions(brainstorm_rows(entries), {"retrieval": 5, "classification": 2})
    assert deficits(table, {"retrieval": 5, "classification": 2}) == {"retrieval": 2, "classification": 2}


# --- plan_examples -------------------------------------------------------------------------------


def instruction_table(per_type: dict[str, int]) -> pa.Table:
    rows = []
    for task_type, n in per_type.items():
        for k in range(n):
            p = make_persona(f"{task_type} persona {k}")
            text = f"A {task_type} instruction number {k}."
            rows.append(
                {
                    "instruction_id": f"{task_type}-{k + 1:06d}",
                    "task_type": task_type,
                    "instruction": text,
                    "normalized": instruction_key(text),
                    "persona_id": p.persona_id,
                    "persona": p.text,
                }
            )
    return pa.Table.from_pylist(rows, schema=INSTRUCTION_SCHEMA)


WANTED = {"retrieval": 7, "classification": 3, "short_short": 2, "long_long": 1, "sts": 4, "bitext": 5}
POOLS = {"retrieval": 3, "classification": 5, "short_short": 1, "long_long": 2}


def requests_of(shards):
    return [r for s in shards for r in s.requests]


def test_plan_examples_is_deterministic():
    a = plan_examples("run1", 0, WANTED, instruction_table(POOLS), seed=42, shard_size=4)
    b = plan_examples("run1", 0, dict(reversed(list(WANTED.items()))), instruction_table(POOLS), seed=42, shard_size=4)
    assert a == b
    assert [dict(r.placeholders) for r in requests_of(a)] == [dict(r.placeholders) for r in requests_of(b)]
    c = plan_examples("run1", 0, WANTED, instruction_table(POOLS), seed=43, shard_size=4)
    assert [dict(r.placeholders) for r in requests_of(a)] != [dict(r.placeholders) for r in requests_of(c)]


def test_plan_examples_counts_ids_and_shards():
    shards = plan_examples("run1", 0, WANTED, instruction_table(POOLS), seed=42, shard_size=4)
    requests = requests_of(shards)
    assert Counter(r.task_type for r in requests) == Counter(WANTED)
    ids = [r.example_id for r in requests]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("run1") for i in ids)
    assert all(0 < len(s.requests) <= 4 for s in shards)
    assert len(shards) == math.ceil(sum(WANTED.values()) / 4)
    assert len({s.shard_id for s in shards}) == len(shards)


def test_plan_examples_rounds_and_runs_do_not_collide():
    table = instruction_table(POOLS)
    r0 = requests_of(plan_examples("run1", 0, WANTED, table, seed=42, shard_size=4))
    r1_shards = plan_examples("run1", 1, WANTED, table, seed=42, shard_size=4)
    r1 = requests_of(r1_shards)
    assert not {r.example_id for r in r0} & {r.example_id for r in r1}
    assert not {s.shard_id for s in plan_examples("run1", 0, WANTED, table, 42, 4)} & {s.shard_id for s in r1_shards}
    other = requests_of(plan_examples("run2", 0, WANTED, table, seed=42, shard_size=4))
    assert not {r.example_id for r in r0} & {r.example_id for r in other}


@pytest.mark.parametrize("task_type", ["sts", "bitext"])
def test_plan_examples_direct_types_use_fixed_instruction_and_no_persona(task_type):
    requests = [
        r
        for r in requests_of(plan_examples("run1", 0, WANTED, instruction_table(POOLS), 42, 100))
        if r.task_type == task_type
    ]
    assert len(requests) == WANTED[task_type]
    fixed = get_task_type(task_type).fixed_instruction
    for r in requests:
        assert r.instruction == fixed
        assert r.persona is None and r.persona_id is None and r.instruction_id is None


@pytest.mark.parametrize("task_type", ["sts", "bitext"])
def test_plan_examples_direct_types_need_no_instructions(task_type):
    empty = instruction_table({})
    requests = requests_of(plan_examples("run1", 0, {task_type: 3}, empty, 42, 100))
    assert len(requests) == 3


@pytest.mark.parametrize("task_type", BRAINSTORMED)
def test_plan_examples_brainstormed_types_cycle_instructions(task_type):
    table = instruction_table(POOLS)
    pool = [r for r in table.to_pylist() if r["task_type"] == task_type]
    requests = [r for r in requests_of(plan_examples("run1", 0, WANTED, table, 42, 100)) if r.task_type == task_type]
    wanted = WANTED[task_type]
    assert len(requests) == wanted
    by_id = {p["instruction_id"]: p for p in pool}
    for r in requests:
        source = by_id[r.instruction_id]
        assert r.instruction == source["instruction"]
        assert r.persona == source["persona"] and r.persona_id == source["persona_id"]
    uses = Counter(r.instruction_id for r in requests)
    # every instruction is used before any is reused, and uses differ by at most one
    assert len(uses) == min(wanted, len(pool))
    assert max(uses.values()) - min(uses.values()) <= 1
    first = [r.instruction_id for r in requests[: min(wanted, len(pool))]]
    assert len(set(first)) == len(first)


def test_plan_examples_skips_brainstormed_type_without_instructions():
    table = instruction_table({"retrieval": 2})
    requests = requests_of(plan_examples("run1", 0, {"retrieval": 3, "classification": 4, "sts": 2}, table, 1, 10))
    assert Counter(r.task_type for r in requests) == Counter({"retrieval": 3, "sts": 2})


def test_plan_examples_placeholders_are_valid_and_render():
    requests = requests_of(plan_examples("run1", 0, WANTED, instruction_table(POOLS), 42, 100))
    for r in requests:
        spec = get_task_type(r.task_type)
        assert set(r.placeholders) == set(spec.placeholders.choices)
        for name, value in r.placeholders.items():
            assert value in spec.placeholders.choices[name].values
        content = render_example(spec, r.instruction, dict(r.placeholders)).messages[0]["content"]
        assert not LEFTOVER.findall(content)
    retrieval = [json_key(r.placeholders) for r in requests if r.task_type == "retrieval"]
    assert len(set(retrieval)) > 1  # placeholders vary between requests
    seeds = [r.seed for r in requests]
    assert len(set(seeds)) == len(seeds)


def test_plan_examples_placeholder_overrides_replace_only_the_named_distribution():
    overrides = {"retrieval": {"num_words": [50, 100]}, "long_long": {"length_rule": ["long (100 words)"]}}
    plain = requests_of(plan_examples("run1", 0, WANTED, instruction_table(POOLS), 42, 100))
    shortened = requests_of(plan_examples("run1", 0, WANTED, instruction_table(POOLS), 42, 100, overrides))
    assert [r.example_id for r in plain] == [r.example_id for r in shortened]
    for before, after in zip(plain, shortened, strict=True):
        if after.task_type == "retrieval":
            assert after.placeholders["num_words"] in (50, 100)
        elif after.task_type == "long_long":
            assert after.placeholders["length_rule"] == "long (100 words)"
        else:  # other types are untouched, value for value
            assert dict(after.placeholders) == dict(before.placeholders)
    assert {r.placeholders["num_words"] for r in shortened if r.task_type == "retrieval"} == {50, 100}


def json_key(mapping) -> str:
    return repr(sorted(mapping.items()))


_CHILD = textwrap.dedent(
    """
    import hashlib, json
    import pyarrow as pa
    from personas.sampling import PersonaSampler
    from personas.sources import load_personas
    from storage.schemas import INSTRUCTION_SCHEMA
    from tasks.generation.brainstorm import plan_round
    from tasks.generation.generate import plan_examples

    pool = load_personas("seed", hub_repo="x", hub_file="y")
    rounds = plan_round(0, {"retrieval": 30, "long_long": 9}, PersonaSampler(pool, 42), 6, 4, 42)
    rows = [{"instruction_id": f"retrieval-{k}", "task_type": "retrieval", "instruction": f"Task {k} text.",
             "normalized": f"task {k} text", "persona_id": "p", "persona": "P"} for k in range(5)]
    table = pa.Table.from_pylist(rows, schema=INSTRUCTION_SCHEMA)
    plan = plan_examples("run", 0, {"retrieval": 9, "sts": 4, "bitext": 4}, table, 42, 5)
    material = [[(r.request_id, r.persona.persona_id, r.seed) for r in s.requests] for s in rounds]
    material += [[(r.example_id, sorted(r.placeholders.items()), r.seed) for r in s.requests] for s in plan]
    print(hashlib.sha256(json.dumps(material, default=str).encode()).hexdigest())
    """
)


def test_plans_are_identical_across_processes():
    """A re-run in another process (another hash salt) plans exactly the same requests."""
    import os

    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run(
            [sys.executable, "-c", _CHILD], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        digests.add(result.stdout.strip())
    assert len(digests) == 1
