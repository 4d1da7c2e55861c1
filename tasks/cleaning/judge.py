"""An LLM judge for false negatives (RLHN, Gecko), run after hard-negative mining.

The same LLM endpoint as generation, through the same client (``llm.client.LLMClient``: bounded
concurrency, retries, schema-constrained JSON), reads one (query, passage) pair per request
(``prompts/judge.py``) and says whether the passage answers the query: ``relevant``,
``partially_relevant`` or ``not_relevant`` (``error`` when the request failed). Per mined row it judges

* each hard negative (role ``negative``): one judged ``relevant`` is a false negative and is removed;
  the row's spare candidates from ranks 51–100 (``spare_negatives``, kept by mining; no new search)
  take its place, in rank order, each judged first too (role ``replacement``) until the row has as
  many negatives as mining gave it or the spares run out;
* the best-ranked retrieved text that is neither the positive nor the query (role ``top_retrieved``);
  only when it is judged ``relevant`` is the positive judged as well (role ``positive``). If the
  positive then grades lower, the judge prefers the retrieved text: with ``clean.judge_prefer =
  "relabel"`` (Gecko) it becomes the positive and the old positive leaves; with ``"drop"`` the row is
  dropped (reason ``judged_false_positive``).

A row left without a negative is dropped (reason ``judged_no_negatives``). A failed request (``error``)
changes nothing: the negative stays, the positive stays.

Resume: asks go in rounds (a replacement or a positive is only asked once the verdict before it is
known); each round's answers are committed in parts (``CleanStore.write_judged_part``) as they come,
and a resumed stage asks only pairs without a stored decision of the same prompt version. Which
candidates are needed is a pure function of the mined table and the decisions, so a resumed run asks
exactly what the crashed one had not committed. :func:`decide` is the pure part: mined table +
decisions → kept + dropped rows.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ground import progress
from ground.seeding import stable_seed
from ground.settings import CleanSettings, Settings
from llm.client import LLMClient, RequestFailed, Sampling
from prompts.judge import JUDGE_PROMPT_VERSION, VERDICTS, render_judge
from storage.corpus import CleanStore, Drops, StageResult, dropped_table, text_hash
from storage.schemas import JUDGE_COLUMNS, JUDGED_SCHEMA

STAGE = "judge"
#: verdict grades; "error" (a failed request) grades as unknown
GRADE = {verdict: len(VERDICTS) - 1 - i for i, verdict in enumerate(VERDICTS)}
RELEVANT = VERDICTS[0]
#: decisions per committed part, per request slot (llm.max_in_flight)
PART_PER_SLOT = 4


@dataclass(frozen=True)
class Ask:
    """One (query, candidate) pair to judge."""

    example_id: str
    task_type: str | None
    instruction: str | None
    query: str
    text: str
    rank: int | None
    role: str  # positive | negative | replacement | top_retrieved

    @property
    def key(self) -> tuple[str, str]:
        return self.example_id, text_hash(self.text)


#: (example_id, candidate text hash) -> (verdict, reason)
Decisions = dict[tuple[str, str], tuple[str, str]]


def decisions_of(judged: pa.Table, prompt_version: str = JUDGE_PROMPT_VERSION) -> Decisions:
    """The stored decisions of ``prompt_version`` (a later part overrides an earlier one)."""
    out: Decisions = {}
    for row in judged.filter(pc.equal(judged["prompt_version"], prompt_version)).to_pylist():
        out[(row["example_id"], row["candidate_hash"])] = (row["verdict"], row["reason"])
    return out


# --- the pure part: what is still to ask, and what the decisions mean -------------------------------
def _rows(table: pa.Table) -> list[dict[str, Any]]:
    return table.to_pylist()


def _pool(row: dict[str, Any]) -> list[tuple[str, float | None, int | None, str]]:
    """The row's negatives then its spares, as (text, score, rank, role)."""
    negs = row.get("hard_negatives") or []
    scores = row.get("hard_negative_scores") or [None] * len(negs)
    ranks = row.get("hard_negative_ranks") or [None] * len(negs)
    spares = row.get("spare_negatives") or []
    spare_scores = row.get("spare_negative_scores") or [None] * len(spares)
    spare_ranks = row.get("spare_negative_ranks") or [None] * len(spares)
    return [(t, s, r, "negative") for t, s, r in zip(negs, scores, ranks, strict=True)] + [
        (t, s, r, "replacement") for t, s, r in zip(spares, spare_scores, spare_ranks, strict=True)
    ]


def _walk(row: dict[str, Any], decisions: Decisions) -> tuple[list[Ask], list[tuple], int]:
    """(asks still needed, negatives accepted so far, negatives judged relevant) for one row."""

    def ask(text: str, rank: int | None, role: str) -> Ask:
        return Ask(row["example_id"], row.get("task_type"), row.get("instruction"), row["query"], text, rank, role)

    want = len(row.get("hard_negatives") or [])
    asks: list[Ask] = []
    accepted: list[tuple] = []
    removed = 0
    for text, score, rank, role in _pool(row):
        if len(accepted) + len(asks) >= want:
            break
        verdict = decisions.get((row["example_id"], text_hash(text)))
        if verdict is None:
            asks.append(ask(text, rank, role))
        elif verdict[0] == RELEVANT:
            removed += 1
        else:  # not or partially relevant, or unknown (error): stays a negative
            accepted.append((text, score, rank))
    top = row.get("top_retrieved")
    if top:
        top_verdict = decisions.get((row["example_id"], text_hash(top)))
        if top_verdict is None:
            asks.append(ask(top, row.get("top_retrieved_rank"), "top_retrieved"))
        elif top_verdict[0] == RELEVANT and (row["example_id"], text_hash(row["positive"])) not in decisions:
            asks.append(ask(row["positive"], row.get("positive_rank"), "positive"))
    return asks, accepted, removed


#: the columns :func:`pending` reads
WALK_COLUMNS = (
    "example_id",
    "task_type",
    "instruction",
    "query",
    "positive",
    "positive_rank",
    "hard_negatives",
    "hard_negative_scores",
    "hard_negative_ranks",
    "spare_negatives",
    "spare_negative_scores",
    "spare_negative_ranks",
    "top_retrieved",
    "top_retrieved_rank",
)


def pending(table: pa.Table, decisions: Decisions) -> list[Ask]:
    """Every pair whose decision is needed next (each pair once)."""
    asks: dict[tuple[str, str], Ask] = {}
    for row in _rows(table.select([c for c in WALK_COLUMNS if c in table.column_names])):
        for a in _walk(row, decisions)[0]:
            asks.setdefault(a.key, a)
    return list(asks.values())


def decide(table: pa.Table, decisions: Decisions, cfg: CleanSettings) -> StageResult:
    """Apply complete decisions to the mined rows: replace false negatives, relabel or drop (module doc)."""
    kept_rows: list[dict[str, Any]] = []
    dropped: list[tuple[int, str, str]] = []  # position, reason, detail
    for position, row in enumerate(_rows(table)):
        asks, accepted, removed = _walk(row, decisions)
        if asks:
            raise ValueError(f"{row['example_id']}: {len(asks)} decision(s) missing; judge them first")

        def drop(reason: str, detail: str, position=position) -> None:
            dropped.append((position, reason, detail))

        relabel = None
        top = row.get("top_retrieved")
        if top and decisions[(row["example_id"], text_hash(top))][0] == RELEVANT:
            pos_verdict, pos_reason = decisions[(row["example_id"], text_hash(row["positive"]))]
            if pos_verdict in GRADE and GRADE[pos_verdict] < GRADE[RELEVANT]:
                relabel = (
                    f"retrieved rank {row.get('top_retrieved_rank')} judged relevant, "
                    f"positive judged {pos_verdict}: {pos_reason}"
                )
        if relabel and cfg.judge_prefer == "drop":
            drop("judged_false_positive", relabel)
            continue
        if relabel:
            accepted = [n for n in accepted if n[0] != top]
            row["positive"] = top
            row["positive_rank"] = row.get("top_retrieved_rank")
            row["positive_score"] = row.get("top_retrieved_score")
        if row.get("hard_negatives") and not accepted:
            drop("judged_no_negatives", f"{removed} candidate(s) judged relevant, no spare left to replace them")
            continue
        row["hard_negatives"] = [n[0] for n in accepted]
        row["hard_negative_scores"] = [n[1] for n in accepted]
        row["hard_negative_ranks"] = [n[2] for n in accepted]
        row["judge_relabelled"] = relabel is not None
        row["judge_replaced"] = removed
        kept_rows.append(row)
    schema = table.schema
    for name, dtype in JUDGE_COLUMNS:
        if name not in schema.names:
            schema = schema.append(pa.field(name, dtype))
    drops = Drops([d[0] for d in dropped], [d[1] for d in dropped], [d[2] for d in dropped])
    return StageResult(pa.Table.from_pylist(kept_rows, schema=schema), dropped_table(table, STAGE, drops))


# --- asking ----------------------------------------------------------------------------------------
def decision_rows(answers: Iterable[tuple[Ask, str, str]], model: str) -> pa.Table:
    """JUDGED_SCHEMA rows for (ask, verdict, reason) answers."""
    now = datetime.now(UTC)
    return pa.Table.from_pylist(
        [
            {
                "example_id": a.example_id,
                "task_type": a.task_type,
                "candidate_hash": a.key[1],
                "candidate": a.text,
                "candidate_rank": a.rank,
                "role": a.role,
                "prompt_version": JUDGE_PROMPT_VERSION,
                "model": model,
                "verdict": verdict,
                "reason": reason,
                "created_at": now,
            }
            for a, verdict, reason in answers
        ],
        schema=JUDGED_SCHEMA,
    )


async def judge_pair(client: LLMClient, ask: Ask, sampling: Sampling, seed: int) -> tuple[str, str]:
    """(verdict, reason) for one pair; a failed request is ("error", why)."""
    prompt = render_judge(ask.instruction, ask.query, ask.text)
    try:
        answer = await client.complete_json(prompt, sampling, stable_seed(seed, f"{ask.example_id}:{ask.key[1]}"))
    except RequestFailed as exc:
        return "error", exc.reason
    return answer.parsed["verdict"], answer.parsed["reason"]


async def ask_in_parts(
    asks: list[Ask], client: LLMClient, sampling: Sampling, seed: int, part_size: int, commit
) -> None:
    """Judge ``asks`` concurrently (the client bounds requests in flight); ``commit`` each part's decisions."""
    for start in range(0, len(asks), part_size):
        part = asks[start : start + part_size]
        answers = await asyncio.gather(*(judge_pair(client, a, sampling, seed) for a in part))
        commit([(a, v, r) for a, (v, r) in zip(part, answers, strict=True)])
        progress.advance(STAGE, len(part))


def _run(coro):
    """Run a coroutine to completion from sync code, also where an event loop is already running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


def judge_corpus(mined: pa.Table, settings: Settings, store: CleanStore, logger=None) -> StageResult:
    """Judge every mined row (module doc), resuming from the committed decisions; returns kept + dropped."""
    decisions = decisions_of(store.read_judged())
    model = settings.llm_model
    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=settings.llm.max_tokens)
    part_size = max(16, PART_PER_SLOT * settings.llm.max_in_flight)
    asked = errors = 0

    def commit(answers: list[tuple[Ask, str, str]]) -> None:
        nonlocal errors
        store.write_judged_part(decision_rows(answers, model))
        for a, verdict, reason in answers:
            decisions[a.key] = (verdict, reason)
            errors += verdict == "error"

    async def rounds() -> None:
        nonlocal asked
        async with LLMClient.from_settings(settings, logger=logger) as client:
            while asks := pending(mined, decisions):
                progress.add_total(STAGE, len(asks))
                if logger:
                    logger.info("judge: %d pair(s) to ask (%d decided before)", len(asks), len(decisions))
                await ask_in_parts(asks, client, sampling, settings.clean.seed, part_size, commit)
                asked += len(asks)

    if mined.num_rows:
        _run(rounds())
    result = decide(mined, decisions, settings.clean)
    if logger:
        logger.info(
            "judge: %d asked now, %d failed; %d rows kept, %d dropped",
            asked,
            errors,
            result.kept.num_rows,
            result.dropped.num_rows,
        )
        if asked and errors > settings.llm.warn_failure_rate * asked:
            logger.warning("judge: %d of %d requests failed; their candidates were left as mined", errors, asked)
    return result
