"""A fault-injecting HTTP proxy for OpenAI-compatible servers (test helper).

``FaultProxy(upstream).start()`` listens on 127.0.0.1 (a free port) in a background thread and
forwards requests to ``upstream``. For POSTs to ``/v1/chat/completions`` it injects, at a set rate,

* ``429``           Too Many Requests with ``Retry-After`` (seconds),
* ``500``           an internal server error,
* ``slow``          an answer only after ``slow_s`` seconds (beyond the client's timeout),
* ``truncated``     the upstream's real answer cut in half: ``Content-Length`` promises the whole
                    body, the connection closes after half of it,
* ``invalid_json``  a 200 whose JSON body is broken.

Which request gets which fault is a pure function of the seed, the request body, the
``x-stainless-retry-count`` header the ``openai`` client sends (0 on the first try, n on its n-th
retry) and how often that pair was seen, so a run's faults do not depend on arrival order. Every
request is recorded (``hits``), so a test can count retries at the proxy, independently of the
client's own bookkeeping. The proxy is a plain asyncio HTTP/1.1 server (keep-alive, Content-Length
bodies), so it can misbehave below the level a web framework allows (half a body, then close).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

FAULT_KINDS = ("429", "500", "slow", "truncated", "invalid_json")
CHAT_PATH = "/v1/chat/completions"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
}


@dataclass
class Hit:
    """One request the proxy received."""

    at: float  # time.monotonic() on arrival
    method: str
    path: str
    body_sha: str
    prompt_sha: str | None  # of the JSON request's messages (see prompt_sha())
    retry_count: int | None  # the openai client's x-stainless-retry-count header
    authorization: str | None
    fault: str | None  # the injected fault, None: forwarded unchanged
    status: int | None = None  # the status sent back (None: connection cut or client gone)


@dataclass
class FaultProxy:
    upstream: str  # e.g. "http://127.0.0.1:8011" (no /v1)
    rate: float = 0.0  # share of chat requests that get a fault
    kinds: tuple[str, ...] = FAULT_KINDS
    seed: int = 0
    slow_s: float = 5.0
    retry_after_s: int = 1
    hits: list[Hit] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kind(s) {sorted(unknown)}; choose from {FAULT_KINDS}")
        self.upstream = self.upstream.rstrip("/").removesuffix("/v1")
        self.port: int | None = None
        self._seen: Counter = Counter()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._http: httpx.AsyncClient | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FaultProxy:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=10)
        return self

    async def _open(self) -> None:
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=512))
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._loop is None:
            return

        async def close() -> None:
            self._server.close()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()
            await self._http.aclose()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what happened --------------------------------------------------------------------------
    def chat_hits(self) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.path == CHAT_PATH]

    def faults(self) -> Counter:
        """Injected faults by kind."""
        return Counter(h.fault for h in self.chat_hits() if h.fault)

    # --- the fault plan -------------------------------------------------------------------------
    def _choose(self, body_sha: str, retry: int | None) -> str | None:
        with self._lock:
            key = (body_sha, retry)
            nth = self._seen[key]
            self._seen[key] += 1
        rng = random.Random(f"{self.seed}:{body_sha}:{retry}:{nth}")
        if rng.random() >= self.rate:
            return None
        return self.kinds[rng.randrange(len(self.kinds))]

    # --- HTTP -----------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                keep_open = await self._handle(method, target, headers, body, writer)
                if not keep_open or headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass  # the client closed the connection (e.g. after its timeout)
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()

    async def _handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False: the connection must be closed."""
        path = target.split("?", 1)[0]
        sha = hashlib.sha256(body).hexdigest()[:16]
        retry = headers.get("x-stainless-retry-count")
        retry_count = int(retry) if retry is not None and retry.isdigit() else None
        fault = self._choose(sha, retry_count) if method == "POST" and path == CHAT_PATH else None
        hit = Hit(
            time.monotonic(), method, path, sha, _prompt_sha(body), retry_count, headers.get("authorization"), fault
        )
        with self._lock:
            self.hits.append(hit)

        if fault == "429":
            return await self._send(
                writer,
                hit,
                429,
                _error("injected rate limit", "rate_limit_exceeded"),
                {"Retry-After": str(self.retry_after_s)},
            )
        if fault == "500":
            return await self._send(writer, hit, 500, _error("injected server error", "server_error"))
        if fault == "invalid_json":
            return await self._send(writer, hit, 200, b'{"id": "chatcmpl-fault", "choices": [{"index": 0, "mess')
        if fault == "slow":
            await asyncio.sleep(self.slow_s)  # the client gives up meanwhile; then answer anyway

        forward = {k: v for k, v in headers.items() if k in ("content-type", "authorization", "accept")}
        try:
            response = await self._http.request(method, self.upstream + target, content=body, headers=forward)
        except httpx.HTTPError as exc:
            return await self._send(writer, hit, 502, _error(f"upstream unreachable: {exc}", "bad_gateway"))
        content_type = {"Content-Type": response.headers.get("content-type", "application/json")}
        if fault == "truncated":
            data = response.content
            head = _head(response.status_code, len(data), content_type)
            writer.write(head + data[: len(data) // 2])
            await writer.drain()
            return False  # close mid-body
        return await self._send(writer, hit, response.status_code, response.content, content_type)

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter, hit: Hit, status: int, body: bytes, headers: dict[str, str] | None = None
    ) -> bool:
        headers = {"Content-Type": "application/json", **(headers or {})}
        if writer.is_closing():
            return False
        writer.write(_head(status, len(body), headers) + body)
        try:
            await writer.drain()
        except ConnectionError:
            return False
        hit.status = status
        return True


def _head(status: int, length: int, headers: dict[str, str]) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
        f"Content-Length: {length}",
        "Connection: keep-alive",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def prompt_sha(messages: list) -> str:
    """A stable hash of chat messages, so a test can map the proxy's hits back to planned prompts."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _prompt_sha(body: bytes) -> str | None:
    try:
        return prompt_sha(json.loads(body)["messages"])
    except (ValueError, KeyError, TypeError):
        return None


def _error(message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": None}}).encode()
