"""`kd` in its own process, without paying for its imports each time.

A test that runs the CLI as a user does (its own process, exit code, stdout and stderr apart, a
traceback if it crashes) pays ~3 s importing torch before the command starts. Here one server
process per test worker imports the CLI's modules once and runs nothing; each command is a fork
of it (a child that runs `kd ARGS` with the caller's environment, working folder, stdin from
/dev/null and stdout/stderr to files) and ends as a Python program ends:
its non-daemon threads are joined, atexit handlers run, streams are flushed, and the exit code (or
the signal, as -N) comes back.

What differs from `python -m stages.cli`: the modules were imported under the server's environment
(the test worker's). kd reads its settings from the environment when it runs, not when imported
(`test_a_forked_kd_is_the_real_kd` compares the two ways on a few commands). The README examples and
the torchrun tests still start real processes.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

PRELOAD = (  # what the commands the tests run import; anything else is imported by the child
    "torch",
    "zarr",
    "numpy",
    "stages.cli",
    "stages.cache_interop",
    "stages.distill",
    "stages.teacher_logits",
    "stages.train_teacher",
)


def _serve(address: str) -> dict[str, Any]:
    """Accept requests until the parent (the test worker) is gone. Returns only in a command's
    process, with its request: the caller runs it at the top level."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address)
    listener.listen(64)
    listener.settimeout(1.0)
    print("ready", flush=True)
    while os.getppid() == parent:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        finally:
            _reap()
        if os.fork() == 0:
            listener.close()
            return _handle(conn)
        conn.close()
    sys.exit(0)


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _handle(conn: socket.socket) -> dict[str, Any]:
    """In a fork of the server: fork the command, report its pid, wait, report how it ended."""
    conn.settimeout(None)
    request = json.loads(conn.makefile("r").readline())
    pid = os.fork()
    if pid == 0:
        conn.close()
        return request
    try:
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        _, status = os.waitpid(pid, 0)
        conn.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
    finally:
        os._exit(0)


def _become(request: dict[str, Any]) -> None:
    """Turn this fork into `kd ARGS` run from a shell with the request's environment and folder."""
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, request["stdout"], os.O_WRONLY),
        (2, request["stderr"], os.O_WRONLY),
    ):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = ["kd", *request["args"]]


class Server:
    """The server process, started by the first `run` of a test worker and ended with it."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="kd-process-"))
        self.address = str(self.folder / "kd.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cli_process", self.address],
            cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def run(
        self, args: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        streams = Path(tempfile.mkdtemp(dir=self.folder))
        request = {
            "args": [str(a) for a in args],
            "env": dict(env),
            "cwd": str(cwd or os.getcwd()),
            "stdout": str(streams / "stdout"),
            "stderr": str(streams / "stderr"),
        }
        for name in ("stdout", "stderr"):
            Path(request[name]).touch()
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(self.address)
            conn.settimeout(timeout)
            conn.sendall(json.dumps(request).encode() + b"\n")
            replies = conn.makefile("r")
            pid = json.loads(replies.readline())["pid"]
            try:
                returncode = json.loads(replies.readline())["returncode"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(["kd", *args], timeout) from None
        stdout, stderr = ((streams / name).read_text(errors="replace") for name in ("stdout", "stderr"))
        shutil.rmtree(streams)
        return subprocess.CompletedProcess(["kd", *args], returncode, stdout, stderr)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


_server: Server | None = None


def run(
    args: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`subprocess.run(["kd", *args], env=env, cwd=cwd, capture_output=True, text=True)`, forked."""
    global _server
    if _server is None:
        _server = Server()
        atexit.register(_server.close)
    return _server.run(args, env, cwd, timeout)


def _main() -> None:
    """Run the command, then end as Python ends a program, less the final collection of every
    module's objects: it touches the whole inherited heap (~1.3 s here) and no kd code relies on it."""
    from stages.cli import app

    try:
        app()
        code = 0
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            code = done.code or 0
        else:
            print(done.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # non-daemon threads, as at exit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _become(_serve(sys.argv[1]))
    _main()
