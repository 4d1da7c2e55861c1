"""Fork server for the fault tests: import the CLI and both flows once, then fork one child per command.

Crash tests start and kill the real CLI about a hundred times; a fresh interpreter spends 3-15 s
importing Prefect, torch and sentence-transformers before it does anything. This process imports
them once (and starts no thread), then for each command line it reads forks a child that sets the
command's environment and working directory, re-arms the fault hook, points stdout/stderr at the
command's log files and runs ``embed-factory <args>`` through the same Typer app as the console
script. The child is an ordinary process: the tests SIGKILL / SIGSTOP it by pid.

Protocol (JSON lines): stdin ``{"id", "args", "env", "cwd", "stdout", "stderr"}``; stdout
``{"id", "pid"}`` when forked, ``{"pid", "rc"}`` when it ended (``rc`` < 0: killed by signal -rc).
Prefect reads its own settings at import, so they come from this process's environment.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def _emit(message: dict) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())  # one write: atomic on a pipe, safe in a handler


def _reap(*_: object) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        _emit({"pid": pid, "rc": rc})


def _child(command: dict) -> None:
    from embed_factory import cli
    from ground import faults

    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setpgid(0, 0)
        os.environ.clear()
        os.environ.update(command["env"])
        os.chdir(command["cwd"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, command["stdout"]), (2, command["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        faults.arm(os.environ.get(faults.ENV), os.environ.get(faults.STOP_ENV))
        try:
            cli.app(args=command["args"], prog_name="embed-factory", standalone_mode=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # an uncaught error: print it like the interpreter would
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import sentence_transformers  # noqa: F401  (imported lazily by the embedder: ~8 s on a busy machine)
    import transformers.models.bert.modeling_bert  # noqa: F401  (all-MiniLM-L6-v2's architecture)

    import embed_factory.cli  # noqa: F401  (the heavy imports, once)
    import flows.clean  # noqa: F401
    import flows.generate  # noqa: F401

    signal.signal(signal.SIGCHLD, _reap)
    _emit({"ready": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(command)
        _emit({"id": command["id"], "pid": pid})


if __name__ == "__main__":
    main()
