"""A private PostgreSQL cluster and an MLflow tracking server on 127.0.0.1, for tests and demos.

The same servers a team runs for many workers on many machines (docs/scaling.md), started from
Debian's ``postgresql`` package and this environment's ``mlflow`` in a temporary directory, on free
loopback ports, and removed again afterwards:

    python -m pipelines.local_stack up      # prints the MLFLOW_TRACKING_URI and --storage to use
    python -m pipelines.local_stack down

or, from Python (tests): ``with local_stack() as stack: ...``.

The cluster is throw-away: trust authentication on the loopback interface only, and no fsync.
When started as root, PostgreSQL (which refuses to run as root) runs as the ``postgres`` user.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

from pipelines.server_process import free_port, start_server, stop_process_group

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"  # where Debian's postgresql-NN packages put initdb and pg_ctl
PG_SUPERUSER = "postgres"
OPTUNA_DB = "optuna"
MLFLOW_DB = "mlflow"
SERVER_START_TIMEOUT_S = 180  # mlflow server creates its schema on first start: slow on a busy CPU
DEFAULT_STATE = Path(tempfile.gettempdir()) / "cvae-local-stack.json"


class StackUnavailable(RuntimeError):
    """What the stack needs (PostgreSQL's binaries, psycopg) is not installed."""


def postgres_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin directory ($CVAE_PG_BIN overrides), or None."""
    override = os.environ.get("CVAE_PG_BIN")
    candidates = [override] if override else sorted(glob.glob(PG_BIN_GLOB), key=lambda p: int(Path(p).parent.name)
                                                    if Path(p).parent.name.isdigit() else 0)
    for directory in reversed(candidates):
        if (Path(directory) / "initdb").is_file() and (Path(directory) / "pg_ctl").is_file():
            return Path(directory)
    return None


def missing_requirements() -> str | None:
    """Why the stack cannot start here (for a test's skip reason), or None when it can."""
    if postgres_bin_dir() is None:
        return (f"PostgreSQL's initdb/pg_ctl not found under {PG_BIN_GLOB}: "
                "apt-get install postgresql (or set CVAE_PG_BIN)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_SUPERUSER)
        except KeyError:
            return f"running as root but there is no {PG_SUPERUSER!r} user to run PostgreSQL as"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the PostgreSQL driver is not installed: pip install 'cvae-harness[postgres]' (psycopg)"
    return None


@dataclass
class LocalStack:
    """Where the running servers are, and what to hand to workers."""
    root: str
    postgres_port: int
    mlflow_port: int
    mlflow_pid: int
    pg_bin: str

    @property
    def data_dir(self) -> Path:
        return Path(self.root) / "pg" / "data"

    @property
    def artifacts_dir(self) -> Path:
        return Path(self.root) / "artifacts"

    def database_url(self, database: str) -> str:
        return f"postgresql+psycopg://{PG_SUPERUSER}@127.0.0.1:{self.postgres_port}/{database}"

    @property
    def optuna_storage(self) -> str:
        """The Optuna storage URL (``--storage``) of the stack's study database."""
        return self.database_url(OPTUNA_DB)

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"


def _as_postgres(command: Sequence[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the postgres user then."""
    return ["runuser", "-u", PG_SUPERUSER, "--", *command] if os.geteuid() == 0 else list(command)


def _run(command: Sequence[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")


def _start_postgres(root: Path, pg_bin: Path) -> int:
    pg_root = root / "pg"
    pg_root.mkdir()
    if os.geteuid() == 0:
        user = pwd.getpwnam(PG_SUPERUSER)
        os.chown(pg_root, user.pw_uid, user.pw_gid)
        root.chmod(0o711)  # the postgres user must reach pg/ inside root's private directory
    _run(_as_postgres([str(pg_bin / "initdb"), "-D", str(pg_root / "data"), "-U", PG_SUPERUSER,
                       "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"]), "initdb")
    port = free_port()
    options = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={pg_root} "
               "-c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off")
    _run(_as_postgres([str(pg_bin / "pg_ctl"), "-D", str(pg_root / "data"), "-l", str(pg_root / "postgres.log"),
                       "-o", options, "-w", "-t", "60", "start"]), "pg_ctl start")
    for database in (OPTUNA_DB, MLFLOW_DB):
        _run([str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_SUPERUSER, database],
             f"createdb {database}")
    return port


def _stop_postgres(root: Path, pg_bin: Path) -> None:
    data = root / "pg" / "data"
    if (data / "postmaster.pid").exists():
        subprocess.run(_as_postgres([str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True, timeout=120)


def _start_mlflow_server(stack_root: Path, backend_uri: str, artifacts: Path, port: int | None = None) -> tuple[int, int]:
    port = port or free_port()
    artifacts.mkdir(exist_ok=True)
    server = start_server(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
         "--artifacts-destination", artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        f"http://127.0.0.1:{port}/health", stack_root / "mlflow-server.log", SERVER_START_TIMEOUT_S)
    return port, server.pid


def start_stack(root: Path | None = None) -> LocalStack:
    """Start PostgreSQL (databases ``optuna`` and ``mlflow``) and ``mlflow server``; wait until healthy."""
    reason = missing_requirements()
    if reason:
        raise StackUnavailable(reason)
    pg_bin = postgres_bin_dir()
    root = Path(root or tempfile.mkdtemp(prefix="cvae-stack-"))
    postgres_port = None
    try:
        postgres_port = _start_postgres(root, pg_bin)
        stack = LocalStack(str(root), postgres_port, 0, 0, str(pg_bin))
        stack.mlflow_port, stack.mlflow_pid = _start_mlflow_server(root, stack.database_url(MLFLOW_DB),
                                                                   stack.artifacts_dir)
    except BaseException:
        if postgres_port is not None:
            _stop_postgres(root, pg_bin)
        shutil.rmtree(root, ignore_errors=True)
        raise
    return stack


def stop_tracking_server(stack: LocalStack) -> None:
    """Stop only ``mlflow server`` (as a crash or a restart would); PostgreSQL keeps what it recorded."""
    stop_process_group(stack.mlflow_pid)


def start_tracking_server(stack: LocalStack) -> None:
    """Start ``mlflow server`` again on the same port, database and artifacts."""
    _, stack.mlflow_pid = _start_mlflow_server(Path(stack.root), stack.database_url(MLFLOW_DB), stack.artifacts_dir,
                                               stack.mlflow_port)


def stop_stack(stack: LocalStack, keep_files: bool = False) -> None:
    """Stop the tracking server, then PostgreSQL; remove the directory unless ``keep_files``."""
    try:
        stop_process_group(stack.mlflow_pid)
    finally:
        _stop_postgres(Path(stack.root), Path(stack.pg_bin))
        if not keep_files:
            shutil.rmtree(stack.root, ignore_errors=True)


@contextlib.contextmanager
def local_stack(root: Path | None = None) -> Iterator[LocalStack]:
    stack = start_stack(root)
    try:
        yield stack
    finally:
        stop_stack(stack)


def _up(state: Path) -> int:
    if state.exists():
        print(f"error: state={str(state)!r} is not valid; a stack is already up (run `down` first, "
              "or pass another --state)", file=sys.stderr)
        return 2
    try:
        stack = start_stack()
    except StackUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    state.write_text(json.dumps(asdict(stack), indent=2))
    print(f"PostgreSQL on 127.0.0.1:{stack.postgres_port}, mlflow server on {stack.tracking_uri} "
          f"(files in {stack.root}; stop with `python -m pipelines.local_stack down`)\n"
          f"export MLFLOW_TRACKING_URI={stack.tracking_uri}\n"
          f"python -m pipelines.entrypoints.tune --storage {stack.optuna_storage} --study demo ...")
    return 0


def _down(state: Path) -> int:
    if not state.exists():
        print(f"error: state={str(state)!r} is not valid; no stack is up (nothing to stop)", file=sys.stderr)
        return 2
    stack = LocalStack(**json.loads(state.read_text()))
    stop_stack(stack)
    state.unlink()
    print(f"stopped the stack in {stack.root}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.local_stack",
                                     description="A throw-away PostgreSQL + mlflow server on 127.0.0.1 for demos.")
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE,
                        help=f"where `up` records the running stack for `down` (default {DEFAULT_STATE})")
    args = parser.parse_args(argv)
    return _up(args.state) if args.action == "up" else _down(args.state)


if __name__ == "__main__":
    sys.exit(main())
