"""A tiny real HTTP server for the supervisor's tests: serves a folder on 127.0.0.1, on an ephemeral port that it
prints first, and answers only after a delay (a server still starting refuses connections)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SERVE = """
import functools, http.server, sys, time
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
server = http.server.HTTPServer(("127.0.0.1", 0), handler, bind_and_activate=False)
server.server_bind()
print(server.server_address[1], flush=True)
time.sleep(float(sys.argv[2]))
server.server_activate()
server.serve_forever()
"""


def serve(folder: Path, files: dict[str, str], delay_s: float = 0.0) -> tuple[subprocess.Popen, int]:
    """Write ``files`` (path -> text) under ``folder`` and serve it in a new session; the process and its port."""
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(folder), str(delay_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    return process, int(process.stdout.readline())
