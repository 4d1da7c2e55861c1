"""What the client's HTTP layer hands back, whichever carries the request (``llm/wire_lean.py``, the default;
``llm/wire_openai.py``, the ``openai`` SDK, kept behind ``llm.client = "openai"``): an :class:`Answer` or one
of the failures below, and the rules both share (which statuses are retried, how long to wait).

A *wire* has two methods: ``prepare(prompt, sampling, seed)`` builds the request once per attempt, and
``send(request, url=None)`` posts it: ``url=None`` is the lone endpoint, with the wire's own transport
retries (``max_retries``); a ``url`` is one try there (the router retries elsewhere).
"""

from __future__ import annotations

import email.utils
import json
import math
import random
import time
from collections.abc import Mapping
from typing import NamedTuple

#: statuses that mean "busy, ask again" rather than "this endpoint is broken"
THROTTLED = (408, 409, 429)
#: a server-directed delay longer than this is not waited for (the openai SDK's bound)
MAX_RETRY_AFTER_S = 120.0


class Answer(NamedTuple):
    """One chat completion, read from its JSON body."""

    content: str
    finish_reason: str | None
    usage: tuple[int, int, int] | None  # prompt, completion, total tokens; None: the server reported none


class StatusFailure(Exception):
    """The endpoint answered with an HTTP error status (after the wire's own retries, if any)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str]):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class ConnectFailure(Exception):
    """Refused, reset, cut short: no HTTP answer. ``detail`` is the cause's text (may be empty), ``kind`` its type."""

    def __init__(self, detail: str, kind: str):
        super().__init__(detail or kind)
        self.detail, self.kind = detail, kind


class TimeoutFailure(ConnectFailure):
    """No answer within the request timeout."""


class BadBody(Exception):
    """A 2xx whose body is no chat completion; ``answered``: it was JSON (the endpoint is alive and answering)."""

    def __init__(self, text: str, answered: bool):
        super().__init__(text)
        self.answered = answered


def status_message(status: int, raw: bytes) -> str:
    """The openai SDK's wording of an error status: ``Error code: 429 - <the body's error.message>``."""
    message = f"Error code: {status}"
    try:
        body = json.loads(raw.decode("utf-8", errors="replace").strip())
    except ValueError:
        return message
    error = body.get("error", body) if isinstance(body, dict) else None
    text = error.get("message") if isinstance(error, dict) else None
    return f"{message} - {text}" if isinstance(text, str) and text else message


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asks to wait (``retry-after-ms``, ``retry-after`` as seconds or a date), else None."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000), ("retry-after", 1)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return float(value) / divisor
        except ValueError:
            continue
    when = email.utils.parsedate_tz(headers.get("retry-after") or "")
    return None if when is None else float(email.utils.mktime_tz(when) - time.time())


def should_retry(status: int, headers: Mapping[str, str]) -> bool:
    """Whether the lone endpoint's transport retries ask again after this status (the openai SDK's rule)."""
    after = retry_after_s(headers)
    if after is not None and math.isfinite(after) and after > MAX_RETRY_AFTER_S:
        return False
    told = headers.get("x-should-retry")
    if told in ("true", "false"):
        return told == "true"
    return status in THROTTLED or status >= 500


def backoff_s(headers: Mapping[str, str] | None, retries_done: int) -> float:
    """The server's delay when it names a sane one, else exponential backoff with jitter (0.5 s … 8 s)."""
    after = retry_after_s(headers)
    if after is not None and math.isfinite(after) and 0 < after <= MAX_RETRY_AFTER_S:
        return after
    return min(8.0, 0.5 * 2.0 ** min(retries_done, 1000)) * (1 - 0.25 * random.random())
