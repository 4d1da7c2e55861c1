"""The relevance judge's prompt and JSON schema (``tasks/cleaning/judge.py``).

One request per (query, passage): does the passage answer the query? The answer is a short reason,
then a three-level verdict (RLHN / Gecko style relevance labelling), constrained by the schema that
vLLM turns into a decoding grammar. The reason comes first so the verdict is conditioned on it.
``JUDGE_PROMPT_VERSION`` hashes the templates and the schema: every stored decision carries it, and
a decision of another version is not reused.
"""

from __future__ import annotations

import hashlib
import json

from prompts.render import RenderedPrompt
from prompts.schemas import object_schema, string_field

#: verdicts, most relevant first; "relevant" is the one that removes a negative or can displace a positive
VERDICTS = ("relevant", "partially_relevant", "not_relevant")

JUDGE_SCHEMA = object_schema({"reason": string_field(1, 300), "verdict": {"type": "string", "enum": list(VERDICTS)}})

JUDGE_SYSTEM = (
    "You are a strict relevance assessor for a search engine. You decide whether a passage answers a "
    "query. Judge only the passage's content, not its style."
)

JUDGE_TEMPLATE = """Task: {task}
Query: {query}
Passage: {passage}

Does the passage answer the query for this task?
- "relevant": the passage answers the query (or matches it as the task asks).
- "partially_relevant": the passage is on the same topic but does not answer the query.
- "not_relevant": the passage does not answer the query.
Output a JSON object {{"reason": "<one short sentence>", "verdict": "relevant" | "partially_relevant" | \
"not_relevant"}} and nothing else."""

#: what stands in for a missing task instruction
NO_TASK = "Given a query, find a passage that answers it."


def _version() -> str:
    blob = json.dumps([JUDGE_SYSTEM, JUDGE_TEMPLATE, NO_TASK, JUDGE_SCHEMA], sort_keys=True)
    return "judge-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


JUDGE_PROMPT_VERSION = _version()


def render_judge(instruction: str | None, query: str, passage: str) -> RenderedPrompt:
    """The judge request for one (query, passage) pair under the row's task instruction."""
    user = JUDGE_TEMPLATE.format(task=(instruction or "").strip() or NO_TASK, query=query, passage=passage)
    return RenderedPrompt(
        messages=[{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}],
        schema=JUDGE_SCHEMA,
        schema_name="relevance_judgement",
        prompt_version=JUDGE_PROMPT_VERSION,
    )
