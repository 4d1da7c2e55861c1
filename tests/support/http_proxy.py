"""A plain reverse proxy (Starlette + uvicorn) in its own process: a second, killable LLM endpoint for tests.

``python tests/support/http_proxy.py UPSTREAM_ORIGIN PORT`` forwards every request to ``UPSTREAM_ORIGIN``
(e.g. ``http://127.0.0.1:8011``) unchanged; :func:`start_proxy` starts one on a free port and waits
until it answers, :meth:`Proxy.kill` ends it with SIGKILL (open connections are reset, new ones refused),
as when a vLLM replica dies.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

# hop-by-hop headers, and those httpx recomputes (it decodes the body, so no content-encoding either)
_DROP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "content-encoding"}


def make_app(upstream: str):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    client = httpx.AsyncClient(base_url=upstream, timeout=None)

    async def forward(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        reply = await client.request(
            request.method, request.url.path, params=request.query_params, content=await request.body(), headers=headers
        )
        return Response(
            reply.content,
            status_code=reply.status_code,
            headers={k: v for k, v in reply.headers.items() if k.lower() not in _DROP},
        )

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proxy:
    process: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        """The OpenAI base URL through the proxy."""
        return f"http://127.0.0.1:{self.port}/v1"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def start_proxy(upstream: str, timeout_s: float = 30.0) -> Proxy:
    """Start a proxy to ``upstream`` (an origin, no path) and wait until ``/v1/models`` answers through it."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, __file__, upstream, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    proxy = Proxy(process, port)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the proxy exited with status {process.returncode}")
        try:
            if httpx.get(f"{proxy.url}/models", timeout=2).status_code == 200:
                return proxy
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proxy.kill()
    raise RuntimeError(f"the proxy to {upstream} did not answer within {timeout_s:.0f}s")


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(make_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
