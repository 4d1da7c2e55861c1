"""A fleet of stub vLLM endpoints for ``bench/fleet.py``: N OpenAI-compatible ports served by one asyncio process.

Each endpoint answers like a 72B vLLM replica would in time, not in content: a request holds one of the
endpoint's ``max_num_seqs`` slots for ``TTFT + completion_tokens / decode rate`` seconds (times
``--time-scale``), and requests beyond ``max_num_seqs`` wait inside the endpoint for a slot, as in vLLM's
scheduler. ``completion_tokens`` is drawn uniformly within ``--tokens-spread`` of ``--tokens`` and capped
at the request's ``max_tokens``; it is what ``usage`` reports. The answer text is the deterministic,
schema-valid JSON of ``tests/support/stub_llm.py`` (imported, not copied), so the client's schema
validation passes; that text is shorter than the token count says (the stub writes a few hundred
characters), which is fine here: the bench measures requests, not tokens.

The bench runs this in its own process so that the factory's CPU time is measured apart from the stubs'.
It prints one JSON line once every port listens (``{"urls": [...], "stats_url": ...}``) and serves until
stdin closes (the bench exits or dies) or ``--max-seconds`` have passed. ``GET /stats`` on any port
returns fleet-wide counters (requests served, in the endpoints now, queued, slot-seconds, CPU seconds).
Only 127.0.0.1.

``--hang-after T`` makes the last endpoint hang T seconds after the fleet's first chat request (for
``--hang-for`` seconds, default for good): it still accepts connections and reads requests, and answers
none of them, chat or ``/v1/models`` — what a vLLM replica with a deadlocked engine or a wedged GPU does.

    python bench/fleet_stub.py --endpoints 4 --per-endpoint 8 --time-scale 0.05
    python bench/fleet_stub.py --endpoints 8 --per-endpoint 32 --time-scale 0.1 --hang-after 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from stub_llm import answer  # noqa: E402  (the deterministic stub's schema-valid answers)

HOST = "127.0.0.1"
MODEL = "stub-72b"
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class LatencyModel:
    """How long one request holds a slot: (TTFT + tokens / decode rate) × time scale."""

    ttft_s: float = 0.5
    decode_tokens_per_s: float = 30.0  # per sequence
    tokens: int = 350  # mean completion tokens
    tokens_spread: float = 0.3  # uniform within ± this share of ``tokens``
    time_scale: float = 1.0

    def draw_tokens(self, rng: random.Random, max_tokens: int | None) -> int:
        low, high = self.tokens * (1 - self.tokens_spread), self.tokens * (1 + self.tokens_spread)
        n = max(1, round(rng.uniform(low, high)))
        return min(n, max_tokens) if max_tokens else n

    def service_s(self, tokens: int) -> float:
        return (self.ttft_s + tokens / self.decode_tokens_per_s) * self.time_scale

    @property
    def mean_service_s(self) -> float:
        """The mean over the token distribution (uncapped): ``service_s`` is linear in tokens."""
        return self.service_s(self.tokens)


@dataclass
class FleetCounters:
    """Fleet-wide counters, returned by ``GET /stats``."""

    served: int = 0  # chat completions answered
    open: int = 0  # chat requests inside the endpoints now (queued + holding a slot)
    active: int = 0  # holding a slot now
    peak_open: int = 0
    peak_active_per_endpoint: int = 0  # the most slots one endpoint had taken at once (≤ max_num_seqs)
    queued_total: int = 0  # requests that found every slot of their endpoint taken
    queue_wait_s: float = 0.0  # summed time spent waiting for a slot
    service_s: float = 0.0  # summed slot-holding time (model latency, scaled)
    completion_tokens: int = 0
    connections: int = 0  # opened so far
    bad_requests: int = 0
    cpu_s: float = 0.0  # this process's CPU time (filled in on read)
    per_endpoint: list[int] = field(default_factory=list)  # requests served per endpoint
    hung: int = 0  # requests the hung endpoint took and never answered


class Endpoint:
    """One port: ``max_num_seqs`` slots; later requests wait for a slot in arrival order."""

    def __init__(self, index: int, max_num_seqs: int):
        self.index, self.max_num_seqs = index, max_num_seqs
        self.slots = asyncio.Semaphore(max_num_seqs)
        self.active = 0
        self.port = 0


class Fleet:
    def __init__(
        self,
        endpoints: int,
        max_num_seqs: int,
        model: LatencyModel,
        seed: int = 0,
        hang_after_s: float | None = None,
        hang_for_s: float | None = None,
    ):
        self.model = model
        self.hang_after_s, self.hang_for_s = hang_after_s, hang_for_s
        self.first_request: float | None = None  # when the first chat request arrived (the hang's clock)
        self.rng = random.Random(seed)
        self.endpoints = [Endpoint(i, max_num_seqs) for i in range(endpoints)]
        self.counters = FleetCounters(per_endpoint=[0] * endpoints)
        self.servers: list[asyncio.AbstractServer] = []
        self._stopping = asyncio.Event()  # the hung endpoint's requests end (without an answer) when it is set

    async def start(self) -> None:
        for endpoint in self.endpoints:
            server = await asyncio.start_server(
                lambda r, w, e=endpoint: self._connection(e, r, w), HOST, 0, backlog=4096, limit=MAX_HEADER_BYTES
            )
            endpoint.port = server.sockets[0].getsockname()[1]
            self.servers.append(server)

    def close(self) -> None:
        self._stopping.set()
        for server in self.servers:
            server.close()

    @property
    def urls(self) -> list[str]:
        return [f"http://{HOST}:{e.port}/v1" for e in self.endpoints]

    def stats(self) -> dict[str, Any]:
        self.counters.cpu_s = time.process_time()
        return asdict(self.counters)

    # --- HTTP/1.1 with keep-alive, just enough for httpx ------------------------------------------
    async def _connection(self, endpoint: Endpoint, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.counters.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = (request_line.split(" ", 2) + ["", ""])[:3]
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines if line)
                }
                length = int(headers.get("content-length") or 0)
                if length > MAX_BODY_BYTES:
                    self.counters.bad_requests += 1
                    return
                body = await reader.readexactly(length) if length else b""
                status, payload = await self._route(endpoint, method, path.split("?")[0].rstrip("/"), body)
                data = json.dumps(payload).encode()
                writer.write(
                    f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                    "Connection: keep-alive\r\n\r\n".encode()
                    + data
                )
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        except asyncio.CancelledError:  # shutting down with the connection open: end quietly
            return
        finally:
            writer.close()

    def _hangs(self, endpoint: Endpoint) -> bool:
        if self.hang_after_s is None or endpoint.index != len(self.endpoints) - 1 or self.first_request is None:
            return False
        since = time.monotonic() - self.first_request - self.hang_after_s
        return since >= 0 and (self.hang_for_s is None or since < self.hang_for_s)

    async def _route(self, endpoint: Endpoint, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if path == "/v1/chat/completions" and self.first_request is None:
            self.first_request = time.monotonic()
        if path != "/stats" and self._hangs(endpoint):
            self.counters.hung += path == "/v1/chat/completions"
            await self._stopping.wait()  # never answers; the client closes the connection or we stop
            raise ConnectionError("the fleet stops")
        if method == "GET" and path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "stub"}]}
        if method == "GET" and path == "/stats":
            return 200, self.stats()
        if method == "POST" and path == "/v1/chat/completions":
            try:
                request = json.loads(body)
            except json.JSONDecodeError:
                self.counters.bad_requests += 1
                return 400, {"error": {"message": "body is not JSON", "type": "invalid_request"}}
            return 200, await self._chat(endpoint, request)
        return 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}}

    async def _chat(self, endpoint: Endpoint, request: dict[str, Any]) -> dict[str, Any]:
        c = self.counters
        tokens = self.model.draw_tokens(self.rng, request.get("max_tokens"))
        arrived = time.monotonic()
        c.open += 1
        c.peak_open = max(c.peak_open, c.open)
        if endpoint.slots.locked():
            c.queued_total += 1
        try:
            async with endpoint.slots:
                waited = time.monotonic() - arrived
                endpoint.active += 1
                c.active += 1
                c.peak_active_per_endpoint = max(c.peak_active_per_endpoint, endpoint.active)
                service = self.model.service_s(tokens)
                try:
                    await asyncio.sleep(service)
                finally:
                    endpoint.active -= 1
                    c.active -= 1
        finally:
            c.open -= 1
        text = answer(request, invalid_every=0, duplicate_every=0)
        prompt_words = sum(len(str(m.get("content", "")).split()) for m in request.get("messages", []))
        c.served += 1
        c.per_endpoint[endpoint.index] += 1
        c.queue_wait_s += waited
        c.service_s += service
        c.completion_tokens += tokens
        return {
            "id": f"chatcmpl-fleet-{endpoint.index}-{c.served}",
            "object": "chat.completion",
            "created": 0,
            "model": request.get("model", MODEL),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "length" if tokens == request.get("max_tokens") else "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_words,
                "completion_tokens": tokens,
                "total_tokens": prompt_words + tokens,
            },
        }


def raise_open_files_limit() -> int:
    """Every in-flight request is a socket on both sides: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def serve(args: argparse.Namespace) -> None:
    model = LatencyModel(args.ttft, args.decode_rate, args.tokens, args.tokens_spread, args.time_scale)
    fleet = Fleet(args.endpoints, args.per_endpoint, model, args.seed, args.hang_after, args.hang_for)
    await fleet.start()
    print(
        json.dumps(
            {
                "urls": fleet.urls,
                "stats_url": f"http://{HOST}:{fleet.endpoints[0].port}/stats",
                "model": MODEL,
                "mean_service_s": model.mean_service_s,
                "open_files": raise_open_files_limit(),
            }
        ),
        flush=True,
    )
    loop, stdin_closed = asyncio.get_running_loop(), asyncio.Event()

    def on_stdin() -> None:  # an empty read is EOF: the bench closed the pipe or is gone
        if not os.read(sys.stdin.fileno(), 4096):
            loop.remove_reader(sys.stdin.fileno())
            stdin_closed.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    try:
        await asyncio.wait_for(stdin_closed.wait(), timeout=args.max_seconds)
    except TimeoutError:
        print(f"fleet stub: --max-seconds {args.max_seconds} passed, stopping", file=sys.stderr, flush=True)
    fleet.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoints", type=int, default=4)
    p.add_argument("--per-endpoint", type=int, default=8, help="max_num_seqs: slots per endpoint")
    p.add_argument("--ttft", type=float, default=0.5, help="time to first token, seconds")
    p.add_argument("--decode-rate", type=float, default=30.0, help="output tokens/s per sequence")
    p.add_argument("--tokens", type=int, default=350, help="mean completion tokens")
    p.add_argument("--tokens-spread", type=float, default=0.3, help="tokens uniform within ± this share")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiplies every latency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=900.0, help="stop by itself after this long")
    p.add_argument("--hang-after", type=float, default=None, help="the last endpoint hangs this long after start")
    p.add_argument("--hang-for", type=float, default=None, help="... for this long (default: for good)")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.endpoints < 1 or args.per_endpoint < 1 or args.time_scale <= 0 or args.decode_rate <= 0:
        raise SystemExit("need --endpoints >= 1, --per-endpoint >= 1, --time-scale > 0, --decode-rate > 0")
    raise_open_files_limit()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
