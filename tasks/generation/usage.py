"""What a generation run asked of the LLM per task type and generator model (the rows' ``model``), counted from
the run's own rows (for the ledger).

From the rows, not the client's counters, so a resumed run counts every session that committed shards:

- examples: one request each; ``attempts`` chat completions; its prompt and completion tokens (summed over
  its attempts by the client);
- rejects (brainstorm or example): one request each, ``attempts`` completions; their tokens are not stored;
- brainstorm: one row per returned instruction, each carrying its request's tokens, so a request is the group
  of rows with the same shard, persona, latency and tokens; one completion each (re-asks are not stored).
"""

from __future__ import annotations

import pyarrow as pa

from ground.costs import TypeUsage
from prompts.task_types import get_task_type

#: the columns :func:`usage_by_type` reads of each kind of shard (read only these: no texts)
_BRAINSTORM_KEYS = ("shard_id", "persona_id", "latency_s", "prompt_tokens", "completion_tokens")
USAGE_COLUMNS = {
    "examples": ("task_type", "model", "attempts", "prompt_tokens", "completion_tokens"),
    "rejects": ("task_type", "model", "attempts"),
    "brainstorm": ("task_type", "model", *_BRAINSTORM_KEYS),
}


def _brainstorm_requests(brainstorm: pa.Table) -> list[dict]:
    seen: dict[tuple, dict] = {}
    for row in brainstorm.select(list(USAGE_COLUMNS["brainstorm"])).to_pylist():
        seen.setdefault(tuple(row.values()), row)
    return list(seen.values())


def usage_by_type(examples: pa.Table, rejects: pa.Table, brainstorm: pa.Table) -> list[TypeUsage]:
    """One :class:`TypeUsage` per task type and model that sent a request, sorted by task type and model."""
    counts: dict[tuple[str, str], dict[str, int]] = {}

    def add(task_type: str, model: str, **values: int) -> None:
        entry = counts.setdefault(
            (task_type, model),
            dict.fromkeys(("requests", "llm_calls", "prompt_tokens", "completion_tokens", "examples"), 0),
        )
        for name, value in values.items():
            entry[name] += value or 0

    for row in examples.select(list(USAGE_COLUMNS["examples"])).to_pylist():
        add(
            row["task_type"],
            row["model"],
            requests=1,
            llm_calls=row["attempts"],
            prompt_tokens=row["prompt_tokens"],
            completion_tokens=row["completion_tokens"],
            examples=1,
        )
    for row in rejects.select(list(USAGE_COLUMNS["rejects"])).to_pylist():
        add(row["task_type"], row["model"], requests=1, llm_calls=row["attempts"])
    for row in _brainstorm_requests(brainstorm):
        add(
            row["task_type"],
            row["model"],
            requests=1,
            llm_calls=1,
            prompt_tokens=row["prompt_tokens"],
            completion_tokens=row["completion_tokens"],
        )
    keys = sorted(counts, key=lambda k: (k[0], k[1] or ""))
    return [TypeUsage(t, get_task_type(t).prompt_version, **counts[(t, m)], model=m) for t, m in keys]
