"""The clean growth bench's pieces: production-shaped rows, the side-by-side table, the guard, the hook table.

The whole bench (two sides, a Prefect API, one clean flow per side and size) takes minutes even at 300 rows,
so its parts are tested here; ``bench/clean_growth.py --sizes 300 600 --before <rev>`` runs it all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import clean_growth
import growth_rows
import pytest
from growth_table import report

from ground.settings import load_settings
from ground.task_types import field_limit
from storage.schemas import EXAMPLE_SCHEMA
from storage.shards import rows_to_table
from tasks.cleaning.validate import validate_examples

N = 1200


@pytest.fixture(scope="module")
def rows():
    maker = growth_rows.RowMaker(N, seed=7)
    return [row for _, shard in maker.shards(500) for row in shard]


def test_rows_are_what_generation_writes(rows):
    """raw_text is the answer as JSON, parsed the same object with sorted keys, the fields its mapped values."""
    assert rows_to_table(rows, EXAMPLE_SCHEMA).num_rows == N
    for row in rows:
        answer = json.loads(row["raw_text"])
        assert json.loads(row["parsed"]) == answer
        assert row["parsed"] == json.dumps(answer, ensure_ascii=False, sort_keys=True)
        q_key, p_key, n_key = growth_rows.ANSWER_KEYS[row["task_type"]]
        assert list(answer) == [k for k in (q_key, p_key, n_key) if k]  # the prompt's key order
        assert (row["query"], row["positive"]) == (answer[q_key], answer[p_key])
        assert row["negative"] == (answer[n_key] if n_key else None)
        assert row["completion_tokens"] == -(-len(row["raw_text"].encode()) // 4)
    assert len({r["example_id"] for r in rows}) == N


def test_lengths_are_production_lengths_within_the_limits(rows):
    valid = [r for r in rows if r["query"]]
    assert len(valid) == N - N // 100  # the injected invalid rows are the only empty queries
    for row in valid:
        for role in ("query", "positive", "negative"):
            limit = field_limit(row["task_type"], role)
            if limit is not None:
                assert limit.min_chars <= len(row[role].strip()) <= limit.max_chars, (row["task_type"], role)
    words = {t: [len(r["positive"].split()) for r in valid if r["task_type"] == t] for t in growth_rows.TASKS}
    retrieval = sorted(words["retrieval"])
    assert retrieval[len(retrieval) // 10] >= 45 and 150 <= retrieval[len(retrieval) // 2] <= 350
    assert max(retrieval) >= 400  # "at least 400 words" is among the prompt's choices
    assert (
        min(words["long_long"]) >= 250
        and min(len(r["query"].split()) for r in valid if r["task_type"] == "long_long") >= 250
    )
    assert max(words["short_short"]) <= 20


def test_rows_pass_validation_but_the_injected_invalid_ones(rows):
    """English prose at legal lengths: validation (language check included) drops only the empty queries."""
    cfg = load_settings().clean
    dropped = validate_examples(rows_to_table(rows, EXAMPLE_SCHEMA), cfg).dropped
    assert Counter(dropped.column("reason").to_pylist()) == {"empty_query": N // 100}


def test_rows_are_deterministic_and_duplicates_are_built_in():
    a, b = growth_rows.RowMaker(400, seed=1), growth_rows.RowMaker(400, seed=1)
    assert [a.row(i, "s")["raw_text"] for i in range(400)] == [b.row(i, "s")["raw_text"] for i in range(400)]
    other = growth_rows.RowMaker(400, seed=2)
    assert a.row(5, "s")["raw_text"] != other.row(5, "s")["raw_text"]
    rows = [a.row(i, "s") for i in range(400)]
    keys = Counter((r["query"].casefold(), r["positive"].strip()) for r in rows if r["query"])
    assert sum(c - 1 for c in keys.values()) >= 400 // 100  # the exact duplicates, case and spacing aside


def _side(name: str, results: dict) -> SimpleNamespace:
    return SimpleNamespace(name=name, results=results)


def _result(total: float, filter_s: float, peak_gib: float) -> dict:
    gib = 2**30
    return {
        "total_s": total,
        "baseline_rss": 0.4 * gib,
        "seconds": {"validate": 1.0, "filter": filter_s},
        "peak_rss": {"validate": 0.5 * gib, "filter": peak_gib * gib},
        "peak_anon": {"validate": 0.25 * gib, "filter": peak_gib / 2 * gib},
        "flow_stage_seconds": {"validate": 1.0},
        "counts": {"raw": 1},
        "missing_hooks": ["tasks.cleaning.gone:fn"],
    }


def test_table_puts_before_and_after_side_by_side_with_exponents():
    before = _side("before", {1000: _result(10, 4, 2.0), 4000: {"stopped": "> 8 GiB at filter"}})
    before.results[2000] = _result(20, 16, 3.0)
    after = _side("after", {1000: _result(10, 4, 1.0), 2000: _result(20, 8, 1.0), 4000: _result(40, 16, 1.0)})
    text = report([before, after], [1000, 2000, 4000], ("setup", "validate", "dedup", "filter", "finish"))
    lines = text.splitlines()
    header = next(line for line in lines if line.strip().startswith("stage"))
    assert header.split()[1:7] == ["before", "after"] * 3 and header.split()[-1] == "before/after"
    filter_line = next(line for line in lines if line.strip().startswith("filter"))
    assert filter_line.split()[-1] == "2.00/1.00"  # before: 4 -> 16 s over 2x rows; after: 4 -> 16 s over 4x
    assert ">8GiB@filter" in filter_line
    total_line = next(line for line in lines if line.strip().startswith("total"))
    assert total_line.split()[-1] == "1.00/1.00"
    peak_rss, peak_anon = [line for line in lines if line.startswith("  peak ")]
    assert peak_rss.split()[1:3] == ["2.00", "1.00"]
    assert peak_anon.split()[1:3] == ["1.00", "0.50"]  # anonymous memory, apart from mapped files
    assert "not seen" in text and "'dedup'" in text  # a stage no hook reached is named
    assert "hooks not found: ['tasks.cleaning.gone:fn']" in text


def test_guard_stops_a_side_over_its_memory_and_names_the_stage(tmp_path):
    status = tmp_path / "status"
    grow = (
        f"import pathlib, time; pathlib.Path({str(status)!r}).write_text('mine'); "
        "x = bytearray(400 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(30)"
    )
    code, _, stopped, peak = clean_growth.guarded([sys.executable, "-c", grow], {}, tmp_path, 0.25 * 2**30, 60, status)
    assert stopped == "> 0.25 GiB at mine" and peak > 0.25 * 2**30 and code != 0
    code, _, stopped, _ = clean_growth.guarded(
        [sys.executable, "-c", "import time; time.sleep(30)"], {}, tmp_path, 2**40, 0.5, None
    )
    assert stopped == "> 0.5 s at start"


def test_checkout_unpacks_a_revision_without_touching_the_repository(tmp_path):
    worktrees = subprocess.run(
        ["git", "-C", str(clean_growth.ROOT), "worktree", "list"], capture_output=True, text=True
    )
    tree = clean_growth.checkout("HEAD", tmp_path / "code")
    assert (tree / "flows" / "clean.py").read_text() == (clean_growth.ROOT / "flows" / "clean.py").read_text()
    again = subprocess.run(["git", "-C", str(clean_growth.ROOT), "worktree", "list"], capture_output=True, text=True)
    assert again.stdout == worktrees.stdout
    with pytest.raises(SystemExit, match="git archive no-such-rev"):
        clean_growth.checkout("no-such-rev", tmp_path / "bad")


def test_every_stage_has_a_hook_in_todays_code():
    """The hook table names functions by module and name; when code moves, this says which stage lost its hooks."""
    assert set(clean_growth.HOOKS.values()) <= set(clean_growth.STAGES)
    assert clean_growth.HELD <= set(clean_growth.STAGES)
    found = {stage for hook, stage in clean_growth.HOOKS.items() if clean_growth.resolve(hook)}
    assert found == set(clean_growth.STAGES), f"stages without a live hook: {set(clean_growth.STAGES) - found}"
    assert clean_growth.resolve("tasks.cleaning.no_such_module:fn") is None
    assert clean_growth.resolve("tasks.cleaning.dedup:no_such_function") is None
    assert clean_growth.resolve(clean_growth.EMBEDDER_FACTORY) and clean_growth.resolve(clean_growth.MODEL_CLASS)


def test_positives_rank_high_but_for_the_vague_queries(rows):
    """The rank filter has the work it has on generated data: named products find their positive, vague
    queries (15 % of retrieval) much less often (at 1,200 rows the corpus is small: half of them still do).
    Ranked as the filter ranks: instructed query, exact cosine, top 50."""
    import numpy as np

    from tasks.cleaning.embed import query_text

    valid = [r for r in rows if r["query"]]
    corpus = list(dict.fromkeys([r["positive"] for r in valid] + [r["negative"] for r in valid if r["negative"]]))
    embedder = clean_growth.HashBagEmbedder()
    scores = embedder.encode([query_text(r["instruction"], r["query"]) for r in valid]) @ embedder.encode(corpus).T
    positive = {text: i for i, text in enumerate(corpus)}
    own = scores[np.arange(len(valid)), [positive[r["positive"]] for r in valid]]
    kept = 1 + (scores > own[:, None]).sum(axis=1) <= 50
    vague = np.array(
        [r["task_type"] == "retrieval" and "{brand}" not in r["query"] and "-" not in r["query"] for r in valid]
    )
    assert kept[~vague].mean() >= 0.9 and kept[vague].mean() <= kept[~vague].mean() - 0.3, (
        kept[~vague].mean(),
        kept[vague].mean(),
    )
