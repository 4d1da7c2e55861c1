"""Pure planning: target splits, brainstorm rounds, instruction dedup and example plans."""

from __future__ import annotations

import math
from collections import Counter

import pyarrow as pa
import pytest

from ground.seeding import rng_for, stable_seed
from ground.task_types import BRAINSTORM_TASK_TYPES
from personas.sampling import PersonaSampler
from personas.sources import make_persona
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
from tasks.generation.generate import split_targets

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
@pytest.mark.parametrize(
    "types", [("sts",), ("retrieval", "sts"), BRAINSTORM_TASK_TYPES, BRAINSTORM_TASK_TYPES + ("sts", "bitext")]
)
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
