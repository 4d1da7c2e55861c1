"""Persona-to-persona expansion: new personas join the pool once, rounds grow from the newest ones."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from llm.client import RequestFailed, Sampling
from personas.sources import make_persona
from tasks.generation.expand_personas import expand_personas

SAMPLING = Sampling(0.7, 1.0, 64)


class FakeClient:
    """Answers each persona with related personas derived from its text; records who was asked."""

    def __init__(self, fail_for: str | None = None):
        self.asked: list[str] = []
        self.fail_for = fail_for

    async def complete_json(self, prompt, sampling, seed):
        text = prompt.messages[0]["content"].split("Persona: ")[1].split("\n")[0]
        self.asked.append(text)
        if self.fail_for and self.fail_for in text:
            raise RequestFailed("invalid output", 1)
        return SimpleNamespace(
            parsed={
                "personas": [
                    f"A colleague of ({text})",
                    f"A sibling of ({text})",
                    "  A shared neighbour who knows everyone on the street. ",
                ]
            }
        )


def test_expansion_adds_related_personas_deduplicated():
    pool = [make_persona("A baker in Lyon who wakes at 3am."), make_persona("A rugby coach in Auckland.")]
    client = FakeClient()
    grown = asyncio.run(expand_personas(pool, client, SAMPLING, rounds=1, per_persona=3, seed=1))
    texts = [p.text for p in grown]
    assert texts[:2] == [p.text for p in pool]
    # 2 related personas each + the shared neighbour once (normalized whitespace)
    assert len(grown) == 2 + 4 + 1
    assert texts.count("A shared neighbour who knows everyone on the street.") == 1
    assert len({p.persona_id for p in grown}) == len(grown)


def test_second_round_expands_only_the_new_personas():
    pool = [make_persona("A baker in Lyon who wakes at 3am.")]
    client = FakeClient()
    grown = asyncio.run(expand_personas(pool, client, SAMPLING, rounds=2, per_persona=3, seed=1))
    assert client.asked[0] == pool[0].text
    assert set(client.asked[1:]) == {p.text for p in grown[1:4]}  # round 2 asks the 3 added in round 1
    assert len(grown) > 4


def test_failed_requests_do_not_stop_expansion():
    pool = [make_persona("A baker in Lyon who wakes at 3am."), make_persona("A rugby coach in Auckland.")]
    grown = asyncio.run(expand_personas(pool, FakeClient(fail_for="baker"), SAMPLING, rounds=1, per_persona=3, seed=1))
    assert any("rugby coach" in p.text and "colleague" in p.text for p in grown)
    assert not any("baker" in p.text and "colleague" in p.text for p in grown)
