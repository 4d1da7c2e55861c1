"""Persona-to-persona expansion (Persona Hub): ask the LLM who stands close to a persona.

Each round asks, for every persona added by the previous round, for ``per_persona`` related
personas; new ones (by normalized-text id) join the pool. Deterministic given the model's answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ground import progress
from ground.seeding import stable_seed
from llm.client import LLMClient, RequestFailed, Sampling
from personas.sources import Persona, make_persona
from prompts.render import RenderedPrompt
from prompts.schemas import object_schema, string_field

EXPANSION_TEMPLATE = (
    "Who is in close relationship with the given persona? Write {n} new personas, each a single "
    "sentence, of people related to it (a colleague, relative, client, teacher, rival, ...).\n"
    "Persona: {persona}\n"
    'Your output must always be a JSON object {{"personas": [...]}} only.'
)


def expansion_prompt(persona: Persona, n: int) -> RenderedPrompt:
    schema = object_schema(
        {"personas": {"type": "array", "items": string_field(15, 400), "minItems": 1, "maxItems": n}}
    )
    return RenderedPrompt(
        messages=[{"role": "user", "content": EXPANSION_TEMPLATE.format(n=n, persona=persona.text)}],
        schema=schema,
        schema_name="persona_expansion",
        prompt_version="persona-expansion-v1",
    )


async def expand_personas(
    pool: Sequence[Persona], client: LLMClient, sampling: Sampling, rounds: int, per_persona: int, seed: int
) -> list[Persona]:
    """The pool plus every new persona found in ``rounds`` rounds, in a stable order."""
    known: dict[str, Persona] = {p.persona_id: p for p in pool}
    frontier = sorted(pool, key=lambda p: p.persona_id)
    for round_idx in range(rounds):
        progress.add_total("personas", len(frontier))

        async def one(persona: Persona, round_idx: int = round_idx) -> list[str]:  # bound per round
            try:
                result = await client.complete_json(
                    expansion_prompt(persona, per_persona),
                    sampling,
                    stable_seed(seed, f"expand-{round_idx}-{persona.persona_id}"),
                )
            except RequestFailed:
                progress.advance("personas", ok=False)
                return []
            progress.advance("personas")
            return result.parsed["personas"]

        answers = await asyncio.gather(*(one(p) for p in frontier))
        new: list[Persona] = []
        for texts in answers:
            for text in texts:
                persona = make_persona(text)
                if persona.persona_id not in known:
                    known[persona.persona_id] = persona
                    new.append(persona)
        if not new:
            break
        frontier = new
    return list(known.values())
