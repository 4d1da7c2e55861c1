"""What one LLM request asks for and how it ends: its sampling, a parsed completion or the reason it failed,
and the client's counters over all of them (:mod:`llm.client` sends the requests)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


class AllEndpointsDown(Exception):
    """No endpoint came back into rotation within one longest cool-down."""


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_tokens: int
    #: the most tokens an answer may take (what the server's context leaves); None: no bound. An answer cut
    #: at max_tokens is asked again with twice the tokens up to this, never at the same limit
    max_tokens_ceiling: int | None = None

    def as_dict(self, seed: int | None) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens, "seed": seed}


@dataclass
class Completion:
    """A parsed answer and what it cost."""

    parsed: dict[str, Any]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    attempts: int


@dataclass
class RequestFailed(Exception):
    """A request that ended without a parsed answer; ``reason`` goes to the rejects table."""

    reason: str
    attempts: int
    text: str | None = None
    finish_reason: str | None = None

    def __str__(self) -> str:
        return self.reason

    def reject_fields(self) -> dict[str, Any]:
        """What a rejects-table row records of the failure (``storage.shards.reject_row``'s failure arguments)."""
        return {
            "attempts": self.attempts,
            "reason": self.reason,
            "finish_reason": self.finish_reason,
            "raw_text": self.text,
        }


@dataclass
class ClientStats:
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    schema_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_flight: int = 0
    failovers: int = 0  # tries sent to another endpoint after one failed (several endpoints only)
    http_attempts: int = 0  # HTTP requests sent, transport retries included
    http_ok: int = 0  # attempts that gave a readable chat completion
    invalid_bodies: int = 0  # 200s whose body was no chat completion (asked again)
    truncated: int = 0  # requests that failed cut at max_tokens with no more room to ask again
    hedges: int = 0  # second copies sent for slow requests
    hedges_won: int = 0  # ... whose answer came first
    hedge_tokens: int = 0  # tokens counted for the cancelled copies (prompt + completion, an upper bound)
    moved_off_silent: int = 0  # requests taken off an endpoint found silent and sent elsewhere
    started: float = field(default_factory=time.monotonic)

    @property
    def transport_failures(self) -> int:
        """HTTP attempts without a usable answer: 429/5xx/4xx, timeouts, connection errors, bad bodies."""
        return self.http_attempts - self.http_ok

    @property
    def transport_retries(self) -> int:
        """Attempts the ``openai`` client repeated by itself (``requests`` counts the calls it was given)."""
        return max(0, self.http_attempts - self.requests)
