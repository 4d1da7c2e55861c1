"""Example rows for the tests, as the pipeline writes them: generated rows (every ``EXAMPLE_SCHEMA``
column, lineage included) and generation runs of them, a handful of hand-written topics, many tiny
distinct English-looking triples, and a clean export built from those by the real ``export_corpus``.
Shared by the clean-flow, fine-tune, S3 and scale-out tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa

from ground.settings import CleanSettings
from storage.corpus import CleanStore
from storage.shards import RunStore, now_utc

RETRIEVAL_INSTRUCTION = "Given a question, retrieve a passage that answers it."
OBJECT_INSTRUCTION = "Given a question about looking after an object, retrieve a helpful passage."

TOPICS = [
    (
        "How do I repot a root-bound fern without killing it?",
        "Repotting a root-bound fern: water it the day before, ease it out of the pot, loosen the outer roots with "
        "your fingers, and set it in a pot one size larger with fresh peat-free compost. Keep it out of direct sun "
        "for a week while the roots recover.",
    ),
    (
        "What causes brake squeal on a mountain bike?",
        "Disc brakes on mountain bikes squeal when the pads are contaminated with oil, glazed from long descents, or "
        "when the caliper is misaligned with the rotor. Cleaning the rotor with alcohol and bedding in new pads "
        "usually stops the noise.",
    ),
    (
        "Which documents do I need to renew a passport abroad?",
        "To renew a passport while living abroad you usually need the application form, your current passport, two "
        "recent photographs that meet the size rules, proof of residence, and the fee paid by card at the consulate.",
    ),
    (
        "How long should sourdough starter ferment before baking?",
        "A healthy sourdough starter is ready to bake with four to eight hours after feeding, when it has doubled, "
        "smells pleasantly sour and a spoonful floats in water. Cold kitchens slow it down considerably.",
    ),
    (
        "Why does my laptop fan run constantly?",
        "A laptop fan that never stops is often caused by dust in the heatsink, a background process using the CPU, "
        "or outdated firmware. Cleaning the vents with compressed air and checking the task manager helps most.",
    ),
    (
        "What is the best way to learn musical scales on piano?",
        "Learning piano scales works best slowly with a metronome: practise hands separately, use the standard "
        "fingering, then hands together, and raise the tempo a few beats at a time once every note is even.",
    ),
]


def example(
    run_id: str,
    i: int,
    query: str,
    positive: str,
    negative: str | None = None,
    task_type: str = "retrieval",
    language: str = "English",
    instruction: str = RETRIEVAL_INSTRUCTION,
) -> dict:
    """A generated example row of ``run_id`` (id ``<run_id>:r00-<task_type>-<i>``), lineage filled in."""
    return {
        "example_id": f"{run_id}:r00-{task_type}-{i:06d}",
        "run_id": run_id,
        "shard_id": "g00-00000",
        "task_type": task_type,
        "instruction": instruction,
        "instruction_id": f"{task_type}-000001",
        "persona_id": "p_x",
        "persona": "A curious person.",
        "placeholders": json.dumps({"language": language}),
        "prompt_version": "v",
        "model": "m",
        "sampling": "{}",
        "attempts": 1,
        "prompt_tokens": 10,
        "completion_tokens": 20,
        "latency_s": 1.0,
        "finish_reason": "stop",
        "query": query,
        "positive": positive,
        "negative": negative,
        "parsed": "{}",
        "raw_text": "{}",
        "created_at": now_utc(),
    }


def write_run(data_dir: Path, run_id: str, rows: list[dict]) -> None:
    """A generation run with one examples shard holding ``rows``, as the generate flow writes it."""
    RunStore(data_dir, run_id).write_shard("examples", "g00-00000", rows, [])


# --- tiny, distinct, English-looking texts ---------------------------------------------------------
VERBS = [
    "repair",
    "paint",
    "clean",
    "store",
    "insure",
    "photograph",
    "sell",
    "move",
    "register",
    "winterize",
    "sharpen",
    "calibrate",
    "label",
    "recycle",
    "polish",
    "inspect",
]
ADJS = [
    "rusty",
    "antique",
    "borrowed",
    "second-hand",
    "waterproof",
    "fragile",
    "oversized",
    "electric",
    "handmade",
    "inherited",
    "foldable",
    "vintage",
]
NOUNS = [
    "bicycle",
    "violin",
    "greenhouse",
    "kayak",
    "sewing machine",
    "telescope",
    "bookshelf",
    "espresso grinder",
    "lawn mower",
    "aquarium",
    "drone",
    "piano stool",
    "tent",
    "microscope",
]
PLACES = [
    "a small flat",
    "a rainy coastal town",
    "a shared garage",
    "the mountains",
    "a humid basement",
    "a university lab",
    "a farmhouse",
    "a busy workshop",
    "a houseboat",
    "a school hall",
]
ADVICE = [
    "start by reading the maker's manual and photographing every part",
    "work slowly on a clean table and keep the screws in labelled cups",
    "ask a local club for help because members often lend the right tools",
    "check the warranty first since opening it yourself may void the cover",
    "use mild soap and warm water, never solvents that attack the finish",
    "keep it away from direct sunlight and sudden temperature changes",
    "measure twice, write the numbers down and order spare parts early",
    "budget an afternoon and expect the first attempt to take longer",
]


def tiny_pairs(n: int, seed: int = 7) -> list[tuple[str, str, str]]:
    """``n`` distinct (query, positive, negative) triples."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        verb, adj, noun, place = rng.choice(VERBS), rng.choice(ADJS), rng.choice(NOUNS), rng.choice(PLACES)
        query = f"How should I {verb} a {adj} {noun} in {place}?"
        if query in seen:
            continue
        seen.add(query)
        positive = (
            f"To {verb} a {adj} {noun} in {place}, {rng.choice(ADVICE)}. "
            f"A {noun} that is {adj} needs extra care, so {rng.choice(ADVICE)}."
        )
        negative = (
            f"The history of the {rng.choice(NOUNS)} goes back centuries; collectors in {rng.choice(PLACES)} "
            f"still argue about who built the first {rng.choice(ADJS)} one."
        )
        out.append((query, positive, negative))
    return out


def mined_like_table(n: int) -> pa.Table:
    """What the clean flow's ``mined`` stage hands to the export: the columns export_corpus reads."""
    rows = []
    pairs = tiny_pairs(n)
    for i, (query, positive, negative) in enumerate(pairs):
        task_type = "retrieval" if i % 4 else "short_short"
        rows.append(
            {
                "example_id": f"run-x:g00-{task_type}-{i:06d}",
                "task_type": task_type,
                "instruction": OBJECT_INSTRUCTION,
                "query": query,
                "positive": positive,
                "negative": negative,
                "hard_negatives": [pairs[(i + 3) % n][1]],
            }
        )
    return pa.Table.from_pylist(rows)


def make_export(data_dir: Path, clean_id: str, n: int = 40) -> CleanStore:
    """Clean run ``clean_id`` with an export of ``n`` rows (10% held out), by the real ``export_corpus``."""
    from tasks.cleaning.export import export_corpus

    store = CleanStore(data_dir, clean_id)
    export_corpus(mined_like_table(n), store.export_dir, CleanSettings(heldout_fraction=0.1, negatives_per_query=2))
    return store


def make_generation_run(data_dir: Path, run_id: str, n: int) -> None:
    """A generation run with one shard of ``n`` valid retrieval examples from :func:`tiny_pairs`."""
    rows = [
        example(run_id, i, query, positive, negative, instruction=OBJECT_INSTRUCTION)
        for i, (query, positive, negative) in enumerate(tiny_pairs(n, seed=11))
    ]
    write_run(data_dir, run_id, rows)
