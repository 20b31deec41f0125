"""A local server as a child process: started in its own process group on a free loopback port,
waited for until it answers, and stopped with every process it started.

Used for `mlflow server` by ``local_stack``, and by the tests for `mlflow ui`, `optuna-dashboard`
and `mlflow models serve`.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Mapping, Sequence

POLL_S = 0.5
LOG_TAIL_CHARS = 3000


class ServerDidNotStart(RuntimeError):
    """The server exited, or did not answer in time; the message ends with its log's tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(url: str) -> bool:
    """Whether ``url`` answers HTTP 200."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop_process_group(pid: int, grace_s: float = 20) -> None:
    """SIGTERM to the group ``pid`` leads, SIGKILL after ``grace_s``; reap ``pid`` if it is our child."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it when it is our child, so it does not linger as a zombie
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def start_server(command: Sequence[str], ready_url: str, log: Path, timeout_s: float,
                 env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> subprocess.Popen:
    """Start ``command`` (output appended to ``log``) and return once ``ready_url`` answers.

    Its own session, so that stopping it also stops the workers a web server starts. A server
    that exits or does not answer within ``timeout_s`` is stopped and raises ``ServerDidNotStart``.
    """
    with open(log, "ab") as output:
        process = subprocess.Popen(list(command), stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=None if env is None else dict(env), cwd=cwd, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not answers(ready_url):
        if process.poll() is not None or time.monotonic() > deadline:
            what = f"exited with {process.returncode}" if process.poll() is not None else \
                f"did not answer {ready_url} within {timeout_s:.0f} s"
            stop_process_group(process.pid)
            tail = Path(log).read_text(errors="replace")[-LOG_TAIL_CHARS:]
            raise ServerDidNotStart(f"`{shlex.join(command)}` {what}:\n{tail}")
        time.sleep(POLL_S)
    return process


@contextlib.contextmanager
def serving(command: Sequence[str], ready_url: str, log: Path, timeout_s: float,
            env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> Iterator[subprocess.Popen]:
    """``start_server`` for the block, stopped after it."""
    process = start_server(command, ready_url, log, timeout_s, env, cwd)
    try:
        yield process
    finally:
        stop_process_group(process.pid)
