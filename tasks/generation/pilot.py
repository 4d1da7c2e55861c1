"""A pilot for ``embed-factory plan`` when no earlier run matches: a few real requests per task type.

Per task type, ``n`` requests at once through the factory's own client: for a brainstormed type one
brainstorm request (a seeded persona as the system prompt) and ``n - 1`` example requests on the
instructions it returned; for STS and bitext ``n`` example requests. Nothing is written: the pilot
only measures tokens per request, the parsed share and its own wall time (``ground.cost_plan.PilotUsage``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import replace

from ground.cost_plan import PilotUsage
from ground.seeding import stable_seed
from llm.client import LLMClient, RequestFailed, Sampling
from personas.sources import Persona
from prompts.budget import fit_placeholders, request_max_tokens
from prompts.render import render_brainstorm, render_example
from prompts.task_types import get_task_type


async def _example(client: LLMClient, usage: PilotUsage, instruction: str | None, sampling: Sampling, seed: int):
    spec = get_task_type(usage.task_type)
    placeholders = spec.placeholders.sample(random.Random(seed))
    if sampling.max_tokens_ceiling is not None:  # as a run plans them: capped to what the context holds
        placeholders = fit_placeholders(spec.name, spec.placeholders, placeholders, sampling.max_tokens_ceiling)
    asked = request_max_tokens(spec.name, placeholders, sampling.max_tokens, sampling.max_tokens_ceiling)
    usage.example_requests += 1
    try:
        prompt = render_example(spec, instruction, placeholders)
        done = await client.complete_json(prompt, replace(sampling, max_tokens=asked), seed)
    except RequestFailed as failure:
        usage.rejected.append(failure.reason)
        return
    usage.example_tokens += done.prompt_tokens + done.completion_tokens
    usage.parsed += 1
    return done


async def _pilot_type(
    client: LLMClient,
    task_type: str,
    n: int,
    persona: Persona,
    brainstorm: Sampling,
    sampling: Sampling,
    per_brainstorm: int,
    seed: int,
) -> tuple[PilotUsage, int]:
    """One task type's pilot; returns its usage and its prompt tokens."""
    spec = get_task_type(task_type)
    usage = PilotUsage(task_type)
    prompt_tokens = 0
    instructions: list[str | None] = [spec.fixed_instruction]
    examples = n
    if spec.brainstorms:
        examples = max(n - 1, 1)
        usage.brainstorm_requests = 1
        prompt = render_brainstorm(spec, persona.text, per_brainstorm)
        try:
            done = await client.complete_json(prompt, brainstorm, stable_seed(seed, f"pilot-b-{task_type}"))
            usage.brainstorm_tokens = done.prompt_tokens + done.completion_tokens
            prompt_tokens += done.prompt_tokens
            usage.instructions = len(done.parsed["tasks"])
            instructions = list(done.parsed["tasks"]) or [spec.fixed_instruction]
        except RequestFailed as failure:
            usage.rejected.append(failure.reason)
            instructions = [None]
    answers = await asyncio.gather(
        *(
            _example(client, usage, instructions[i % len(instructions)], sampling, stable_seed(seed, f"pilot-{i}"))
            for i in range(examples)
        )
    )
    prompt_tokens += sum(a.prompt_tokens for a in answers if a is not None)
    return usage, prompt_tokens


async def run_pilot(
    client: LLMClient,
    task_types: Sequence[str],
    n: int,
    personas: Sequence[Persona],
    brainstorm: Sampling,
    sampling: Sampling,
    per_brainstorm: int,
    seed: int,
) -> tuple[list[PilotUsage], float]:
    """Send the pilot (every task type at once); returns each type's usage and the pilot's wall seconds."""
    started = time.monotonic()
    results = await asyncio.gather(
        *(
            _pilot_type(client, t, n, personas[i % len(personas)], brainstorm, sampling, per_brainstorm, seed)
            for i, t in enumerate(task_types)
        )
    )
    wall = time.monotonic() - started
    usages = []
    for usage, prompt_tokens in results:
        tokens = usage.brainstorm_tokens + usage.example_tokens
        usage.prompt_share = prompt_tokens / tokens if tokens else 0.5
        usages.append(usage)
    return usages, wall
