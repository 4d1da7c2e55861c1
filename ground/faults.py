"""Crash-test hook: kill this process with SIGKILL at the n-th pass of a named checkpoint.

Storage and flows call ``checkpoint("<point>")`` right after each step whose interruption matters
(a temp file complete but not renamed, a shard's data file committed but its manifest entry not
yet written, ...). With ``EMBED_FACTORY_FAULT_KILL_AT="<point>:<n>"`` in the environment, the n-th
pass of ``<point>`` in this process sends SIGKILL to the process itself: a real ``kill -9``, at a
reproducible place (``EMBED_FACTORY_FAULT_STOP_AT`` does the same with SIGSTOP, to freeze a process
while it holds a lock). ``tests/faults/`` uses them; unset (always, outside those tests), a
checkpoint is one comparison against ``None``.

Points: ``parquet.tmp`` / ``bytes.tmp`` (a temp file written and fsynced, not yet renamed),
``shard.rejects`` / ``shard.data`` / ``shard.manifest`` (the three steps of a shard commit),
``stage.dropped`` / ``stage.table`` (the two steps of a clean stage's commit), ``stage.batch`` (a part of a
clean stage appended to its writers, not committed: inside a streamed stage), ``dedup.done``,
``export.part`` (between the renames of the export files), ``export.card``, ``catalog.refreshed``,
``embedding.segment`` (an embedding-cache segment written, not yet renamed).
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "EMBED_FACTORY_FAULT_KILL_AT"
STOP_ENV = "EMBED_FACTORY_FAULT_STOP_AT"  # the same with SIGSTOP: the process freezes there (tests resume it)

_targets: dict[str, list[int]] | None = None  # point -> [n, signal, passes so far]
_lock = threading.Lock()


def parse(spec: str) -> tuple[str, int]:
    """``"shard.data:3"`` → ``("shard.data", 3)``; a malformed spec is an error, not silently ignored."""
    point, sep, n = spec.strip().rpartition(":")
    if not sep or not point or not n.isdigit() or int(n) < 1:
        raise ValueError(f'fault spec {spec!r}: expected "<point>:<n>" with n >= 1')
    return point, int(n)


def arm(kill_at: str | None, stop_at: str | None = None) -> None:
    """(Re)arm from specs (None: not armed) and reset the pass counters; done from the environment at import."""
    global _targets
    targets = {}
    for spec, sig in ((stop_at, signal.SIGSTOP), (kill_at, signal.SIGKILL)):
        if spec:
            point, n = parse(spec)
            targets[point] = [n, sig, 0]
    with _lock:
        _targets = targets or None


def checkpoint(point: str) -> None:
    """Send the armed signal to this process if this is the armed point's n-th pass; otherwise do nothing."""
    if _targets is None or point not in _targets:
        return
    with _lock:
        target = _targets[point]
        target[2] += 1
        if target[2] == target[0]:
            os.kill(os.getpid(), target[1])


arm(os.environ.get(ENV), os.environ.get(STOP_ENV))
