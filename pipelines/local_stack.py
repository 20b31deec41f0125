"""A private PostgreSQL cluster and an MLflow tracking server on 127.0.0.1, for tests and demos.

The same servers a team runs for many workers on many machines (docs/scaling.md), started from
Debian's ``postgresql`` package and this environment's ``mlflow`` in a temporary directory, on free
loopback ports, and removed again afterwards:

    python -m pipelines.local_stack up      # prints the MLFLOW_TRACKING_URI and --storage to use
    python -m pipelines.local_stack down

or, from Python (tests): ``with local_stack() as stack: ...``.

Everything lives in this user's private directory (``private_dir``: mode 0700, refused if it is a
symlink or belongs to anyone else): the stack's files, the state `up` leaves for `down`, and the
PostgreSQL password (generated, in a 0600 ``pgpass`` file that clients find through $PGPASSFILE;
never in a URL). `down` stops only the ``mlflow server`` it started (same PID, start time and
command) and removes only a stack directory inside the private directory. The cluster is
throw-away (no fsync). When started as root, PostgreSQL (which refuses to run as root) runs as the
``postgres`` user, which may then pass through the private directories (0710, group postgres).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import json
import logging
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import psutil

from pipelines.server_process import free_port, start_server, stop_process_group
from pipelines.tracking.liveness import process_started, same_process

log = logging.getLogger(__name__)

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"  # where Debian's postgresql-NN packages put initdb and pg_ctl
PG_SUPERUSER = "postgres"
OPTUNA_DB = "optuna"
MLFLOW_DB = "mlflow"
SERVER_START_TIMEOUT_S = 180  # mlflow server creates its schema on first start: slow on a busy CPU
PRIVATE_DIR_NAME = "cvae-local-stack"
STATE_FILE = "state.json"
PASSWORD_FILE = "pgpass"  # libpq's password file format: host:port:database:user:password


class StackUnavailable(RuntimeError):
    """What the stack needs (PostgreSQL's binaries, psycopg) is not installed."""


class UnsafeStackFiles(RuntimeError):
    """A private directory or state file that is a symlink, someone else's, open to others, or
    names what this user's stacks did not create."""


def _private_mode() -> tuple[int, int | None]:
    """The mode and group a private directory must have: 0700, or 0710 for group postgres as root."""
    if os.geteuid() == 0:
        with contextlib.suppress(KeyError):  # no postgres user: no stack either (missing_requirements)
            return 0o710, pwd.getpwnam(PG_SUPERUSER).pw_gid
    return 0o700, None


def _make_private(path: Path, created: bool) -> Path:
    """Give a directory this user just ``created`` the private mode, or check that an existing one has it."""
    mode, group = _private_mode()
    if created:
        if group is not None:
            os.chown(path, os.geteuid(), group)
        os.chmod(path, mode)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() \
            or stat.S_IMODE(info.st_mode) != mode or (group is not None and info.st_gid != group):
        raise UnsafeStackFiles(f"{path} is not a private directory of this user (a symlink, someone else's, or "
                               f"not mode {mode:o}): remove it, or set XDG_RUNTIME_DIR to a private directory")
    return path


def private_dir() -> Path:
    """This user's directory for local stacks: $XDG_RUNTIME_DIR/cvae-local-stack, else
    <tmp>/cvae-local-stack-<uid>; created private, refused when it is not. Root's runtime directory
    is closed to the postgres user PostgreSQL runs as, so root's stacks go under <tmp>."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") if os.geteuid() != 0 else None
    path = Path(runtime) / PRIVATE_DIR_NAME if runtime else \
        Path(tempfile.gettempdir()) / f"{PRIVATE_DIR_NAME}-{os.geteuid()}"
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        created = False
    return _make_private(path, created)


def _write_private_file(path: Path, text: str) -> None:
    """A new 0600 file: never through a symlink, never over an existing file."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def _read_private_file(path: Path) -> str:
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafeStackFiles(f"{path} is a symlink: not reading it") from None
        raise
    with os.fdopen(descriptor) as handle:
        return handle.read()


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
    mlflow_started: float = 0.0  # the server process's start time (psutil's create_time)

    @property
    def data_dir(self) -> Path:
        return Path(self.root) / "pg" / "data"

    @property
    def artifacts_dir(self) -> Path:
        return Path(self.root) / "artifacts"

    @property
    def password_file(self) -> Path:
        return Path(self.root) / PASSWORD_FILE

    @property
    def env(self) -> dict[str, str]:
        """What a client of the stack's PostgreSQL needs in its environment: where the password is."""
        return {"PGPASSFILE": str(self.password_file)}

    def database_url(self, database: str) -> str:
        """No password in it: clients read it from ``env``'s $PGPASSFILE."""
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


def _run(command: Sequence[str], what: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")


def _start_postgres(root: Path, pg_bin: Path) -> int:
    """initdb with a generated superuser password (scram-sha-256 on TCP and on the socket), written
    for clients to ``root``/pgpass, then start the server and create the databases."""
    pg_root = root / "pg"
    pg_root.mkdir(mode=0o700)
    password = secrets.token_urlsafe(24)  # letters, digits, - and _: nothing pgpass would need escaped
    _write_private_file(root / PASSWORD_FILE, f"127.0.0.1:*:*:{PG_SUPERUSER}:{password}\n")
    superuser_password = pg_root / "superuser-password"  # initdb's --pwfile, removed once it has read it
    _write_private_file(superuser_password, password + "\n")
    if os.geteuid() == 0:
        user = pwd.getpwnam(PG_SUPERUSER)
        for path in (pg_root, superuser_password):
            os.chown(path, user.pw_uid, user.pw_gid)
    try:
        _run(_as_postgres([str(pg_bin / "initdb"), "-D", str(pg_root / "data"), "-U", PG_SUPERUSER,
                           "--auth=scram-sha-256", f"--pwfile={superuser_password}", "--encoding=UTF8",
                           "--no-locale", "--no-sync"]), "initdb")
    finally:
        superuser_password.unlink()
    port = free_port()
    options = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={pg_root} "
               "-c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off")
    _run(_as_postgres([str(pg_bin / "pg_ctl"), "-D", str(pg_root / "data"), "-l", str(pg_root / "postgres.log"),
                       "-o", options, "-w", "-t", "60", "start"]), "pg_ctl start")
    for database in (OPTUNA_DB, MLFLOW_DB):
        _run([str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_SUPERUSER, database],
             f"createdb {database}", env={**os.environ, "PGPASSFILE": str(root / PASSWORD_FILE)})
    return port


def _stop_postgres(root: Path, pg_bin: Path) -> None:
    data = root / "pg" / "data"
    if (data / "postmaster.pid").exists():
        subprocess.run(_as_postgres([str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True, timeout=120)


def _mlflow_server_command(stack: LocalStack) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", stack.database_url(MLFLOW_DB),
            "--artifacts-destination", stack.artifacts_dir.as_uri(), "--host", "127.0.0.1",
            "--port", str(stack.mlflow_port), "--workers", "2"]


def _start_mlflow_server(stack: LocalStack) -> None:
    """Start ``mlflow server`` on ``stack.mlflow_port`` and record which process it is."""
    stack.artifacts_dir.mkdir(exist_ok=True)
    server = start_server(_mlflow_server_command(stack), f"{stack.tracking_uri}/health",
                          Path(stack.root) / "mlflow-server.log", SERVER_START_TIMEOUT_S,
                          env={**os.environ, **stack.env})
    stack.mlflow_pid, stack.mlflow_started = server.pid, process_started(server.pid) or 0.0


def _is_our_server(stack: LocalStack) -> bool:
    """Whether ``stack.mlflow_pid`` is still the ``mlflow server`` this stack started: the same
    start time and command line, not another process that got the PID since."""
    if not same_process(stack.mlflow_pid, stack.mlflow_started):
        return False
    try:
        return psutil.Process(stack.mlflow_pid).cmdline() == _mlflow_server_command(stack)
    except psutil.Error:
        return False


def start_stack(root: Path | None = None) -> LocalStack:
    """Start PostgreSQL (databases ``optuna`` and ``mlflow``) and ``mlflow server``; wait until healthy."""
    reason = missing_requirements()
    if reason:
        raise StackUnavailable(reason)
    pg_bin = postgres_bin_dir()
    if root is None:
        root = _make_private(Path(tempfile.mkdtemp(prefix="stack-", dir=private_dir())), created=True)
    root = Path(root)
    postgres_port = None
    try:
        postgres_port = _start_postgres(root, pg_bin)
        stack = LocalStack(str(root), postgres_port, free_port(), 0, str(pg_bin))
        _start_mlflow_server(stack)
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
    _start_mlflow_server(stack)


def stop_stack(stack: LocalStack, keep_files: bool = False) -> None:
    """Stop the tracking server, then PostgreSQL; remove the directory unless ``keep_files``."""
    try:
        if stack.mlflow_pid:
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


def _stack_from_state(state: Path) -> LocalStack:
    """The stack `up` recorded, once it is sure to be one of this user's: a directory of its own
    inside the private directory (not a symlink), so `down` removes nothing else."""
    stack = LocalStack(**json.loads(_read_private_file(state)))
    root = Path(stack.root)
    if root.parent != state.parent or not root.name.startswith("stack-"):
        raise UnsafeStackFiles(f"{state} names {root}, which is not a stack directory in {state.parent}: "
                               "not touching it")
    _make_private(root, created=False)
    return stack


def _up(state: Path) -> int:
    if os.path.lexists(state):
        print(f"error: a stack is already up ({state}): run `python -m pipelines.local_stack down` first",
              file=sys.stderr)
        return 2
    stack = start_stack()
    _write_private_file(state, json.dumps(asdict(stack), indent=2))
    print(f"PostgreSQL on 127.0.0.1:{stack.postgres_port}, mlflow server on {stack.tracking_uri} "
          f"(files in {stack.root}; stop with `python -m pipelines.local_stack down`)\n"
          f"export MLFLOW_TRACKING_URI={stack.tracking_uri}\n"
          f"export PGPASSFILE={stack.password_file}   # PostgreSQL's password, for libpq (psycopg)\n"
          f"python -m pipelines.entrypoints.tune --storage {stack.optuna_storage} --study demo ...")
    return 0


def _down(state: Path) -> int:
    if not os.path.lexists(state):
        print(f"error: no stack is up (no {state}): nothing to stop", file=sys.stderr)
        return 2
    stack = _stack_from_state(state)
    if not _is_our_server(stack):
        log.warning(f"mlflow server (pid {stack.mlflow_pid}) is no longer the one `up` started: not signalling it")
        stack.mlflow_pid = 0
    stop_stack(stack)
    state.unlink()
    print(f"stopped the stack in {stack.root}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.local_stack",
                                     description="A throw-away PostgreSQL + mlflow server on 127.0.0.1 for demos.")
    parser.add_argument("action", choices=("up", "down"))
    args = parser.parse_args(argv)
    try:
        state = private_dir() / STATE_FILE
        return _up(state) if args.action == "up" else _down(state)
    except (StackUnavailable, UnsafeStackFiles) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
