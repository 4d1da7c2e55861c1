"""The lean request path (``llm.client = "lean"``, the default): what the ``openai`` SDK did per request, at a
fraction of the CPU, so one process can feed a large vLLM fleet (``bench/fleet.py`` measures both side by side).

* **One aiohttp connection pool per endpoint** (C HTTP parser), opened on the running event loop at first use
  (a fresh pool if the client is used from another loop later). Tests inject an ``httpx.AsyncClient`` with a
  mock transport instead (``http_client``), shared by every endpoint.
* **Bodies serialised once**: orjson; the ``response_format`` fragment (the JSON schema) is serialised once per
  schema and spliced into each body; per request only the messages and sampling are encoded.
* **Answers read into dicts** (orjson), no model object per response.
* **Transport retries as the SDK did them** for the lone endpoint: 408/409/429/5xx, timeouts and connection
  errors, at most ``max_retries`` times, after Retry-After(-ms) or exponential backoff with jitter, each try
  carrying the ``x-stainless-retry-count`` header. With several endpoints one try per ``send`` (the router
  retries elsewhere). Error statuses are worded as the SDK words them (``llm/wire.py``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import httpx
import orjson
import yarl

from llm.outcomes import ClientStats, Sampling
from llm.wire import Answer, BadBody, ConnectFailure, StatusFailure, TimeoutFailure, backoff_s, should_retry
from llm.wire import status_message as _status_message
from prompts.render import RenderedPrompt

#: response_format fragments kept (one per schema; brainstorm schemas differ by their item count)
MAX_FRAGMENTS = 256


class LeanWire:
    def __init__(
        self,
        urls: Sequence[str],
        model: str,
        api_key: str,
        timeout_s: float,
        max_retries: int,
        max_in_flight: int,
        stats: ClientStats,
        send_seed: bool,
        http_client: httpx.AsyncClient | None = None,
    ):
        self.urls, self.model, self.stats, self.send_seed = list(urls), model, stats, send_seed
        self.timeout_s, self.max_retries, self.max_in_flight = timeout_s, max_retries, max_in_flight
        self._headers = [  # one header set per retry count (the proxy in tests/faults reads it)
            {
                "Authorization": f"Bearer {api_key}",
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": "embed-factory",
                "x-stainless-retry-count": str(n),
            }
            for n in range(max_retries + 1)
        ]
        self._chat = {url: f"{url.rstrip('/')}/chat/completions" for url in self.urls}
        self._chat_url = {url: yarl.URL(chat) for url, chat in self._chat.items()}  # parsed once, for aiohttp
        self._http = http_client
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fragments: dict[str, tuple[dict[str, Any], bytes]] = {}  # schema_name -> (schema, its fragment)

    async def close(self) -> None:
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()
        if self._http is not None:
            await self._http.aclose()

    # --- the body --------------------------------------------------------------------------------
    def prepare(self, prompt: RenderedPrompt, sampling: Sampling, seed: int, model: str | None = None) -> bytes:
        """The request body: the same JSON as the SDK path sends (``tests/generation/test_llm_client.py``)."""
        head: dict[str, Any] = {
            "model": model or self.model,
            "messages": prompt.messages,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
        }
        if self.send_seed:
            head["seed"] = seed
        return orjson.dumps(head)[:-1] + b',"response_format":' + self._fragment(prompt) + b"}"

    def _fragment(self, prompt: RenderedPrompt) -> bytes:
        cached = self._fragments.get(prompt.schema_name)
        if cached is not None and (cached[0] is prompt.schema or cached[0] == prompt.schema):
            return cached[1]
        if len(self._fragments) >= MAX_FRAGMENTS:
            self._fragments.clear()
        fragment = orjson.dumps(prompt.response_format)
        self._fragments[prompt.schema_name] = (prompt.schema, fragment)
        return fragment

    # --- sending ---------------------------------------------------------------------------------
    async def send(self, body: bytes, url: str | None = None) -> Answer:
        """One try at ``url``; ``url=None``: the lone endpoint, with up to ``max_retries`` transport retries."""
        retries = self.max_retries if url is None else 0
        url = url or self.urls[0]
        for n in range(retries + 1):
            self.stats.http_attempts += 1
            try:
                status, headers, raw = await self._post(url, body, self._headers[n])
            except ConnectFailure:
                if n == retries:
                    raise
                await asyncio.sleep(backoff_s(None, n))
                continue
            if 200 <= status < 300:
                return read_answer(raw, headers.get("content-type", ""))
            if n < retries and should_retry(status, headers):
                await asyncio.sleep(backoff_s(headers, n))
                continue
            raise StatusFailure(status, _status_message(status, raw), headers)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Mapping[str, str], bytes]:
        if self._http is not None:
            return await self._post_httpx(url, body, headers)
        session = self._session(url)
        try:
            async with session.post(self._chat_url[url], data=body, headers=headers) as response:
                return response.status, response.headers, await response.read()
        except TimeoutError as exc:  # aiohttp's timeouts are asyncio.TimeoutError (= TimeoutError)
            raise TimeoutFailure(str(exc), type(exc).__name__) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectFailure(str(exc), type(exc).__name__) from exc

    async def _post_httpx(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Mapping[str, str], bytes]:
        try:
            response = await self._http.post(self._chat[url], content=body, headers=headers, timeout=self.timeout_s)
        except httpx.TimeoutException as exc:
            raise TimeoutFailure(str(exc), type(exc).__name__) from exc
        except httpx.TransportError as exc:
            raise ConnectFailure(str(exc), type(exc).__name__) from exc
        return response.status_code, response.headers, response.content

    def _session(self, url: str) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or a new event loop: the old loop's pools cannot serve it
            self._loop, self._sessions = loop, {}
        session = self._sessions.get(url)
        if session is None:
            session = self._sessions[url] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_in_flight + 16, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout_s, sock_read=self.timeout_s),
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("Accept-Encoding",),  # identity: nothing to decompress
            )
        return session


def read_answer(raw: bytes, content_type: str = "application/json") -> Answer:
    """The chat completion in ``raw``, or ``BadBody`` worded as the SDK path words it: a body declared JSON that is
    not, by json's error; a body not declared JSON (an HTML error page …), by its text."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        if "json" not in content_type:
            raise BadBody(raw.decode("utf-8", errors="replace"), answered=False) from None
        try:  # what orjson refuses and json reads (NaN …) is read; else json's words for the error
            data = json.loads(raw)
        except ValueError as exc:
            raise BadBody(f"{type(exc).__name__}: {exc}", answered=False) from None
    try:
        choice = data["choices"][0]
        content = choice["message"].get("content") or ""
        finish = choice.get("finish_reason")
        if not isinstance(content, str):
            raise TypeError(content)
    except (KeyError, IndexError, TypeError, AttributeError):
        raise BadBody(f"no chat completion: {raw[:300].decode('utf-8', errors='replace')}", answered=True) from None
    usage = data.get("usage")
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
        return Answer(content, finish, (prompt, completion, usage.get("total_tokens") or prompt + completion))
    return Answer(content, finish, None)
