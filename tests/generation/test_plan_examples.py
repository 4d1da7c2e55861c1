"""Example planning: ids, shards, direct and brainstormed types, placeholders, and the same plan in every process."""

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

from ground.task_types import BRAINSTORM_TASK_TYPES
from personas.sources import make_persona
from prompts.render import render_example
from prompts.task_types import get_task_type
from storage.schemas import INSTRUCTION_SCHEMA
from tasks.generation.brainstorm import (
    instruction_key,
)
from tasks.generation.generate import plan_examples

REPO_ROOT = Path(__file__).resolve().parents[2]
LEFTOVER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


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


@pytest.mark.parametrize("task_type", BRAINSTORM_TASK_TYPES)
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
