"""Shared fixtures: a throw-away MLflow store per test, and helpers that run the real entry points."""
from __future__ import annotations

import contextlib
import gzip
import os
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share the cores: one torch thread each (and in the commands they start),
    # or OpenMP's spinning threads oversubscribe the CPU and every test slows down many times over.
    os.environ["OMP_NUM_THREADS"] = "1"
# Local checkpoints of runs trained outside a test's store (pipelines.tracking.checkpoints): not in ~/.cache.
os.environ.setdefault("CVAE_CHECKPOINT_DIR", tempfile.mkdtemp(prefix="cvae-test-checkpoints-"))
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# Where the tests find Fashion-MNIST's IDX files: Debian's dataset-fashion-mnist, or another folder
# holding them (the GPU machine has no Debian package: benchmarks/gpu/run.sh names the wheelhouse's copy).
FASHION_DIR = Path(os.environ.get("CVAE_FASHION_MNIST_DIR") or DEBIAN_FASHION_DIR)
EXPERIMENT = "tests"
# Small enough for 2 CPU cores, large enough that validation loss clearly falls.
TINY_DATA = ["--dataset", "fashion-mnist", "--limit-train", "1000", "--val-size", "300", "--limit-test", "500"]
TINY_PARAMS = {"dataset": "fashion-mnist", "limit_train": "1000", "val_size": "300", "limit_test": "500"}

# Session fixtures that train or start servers: every test that uses one runs on the same xdist
# worker, so each is made once per test session, not once per worker.
SHARED_SESSION_FIXTURES = ("conditional_run", "server_stack")


def _xdist_group(item) -> str | None:
    """Which tests must share an xdist worker: those using a shared session fixture (grouped by
    fixture), else those of a module whose module-scoped fixtures they use (grouped by module);
    any other test goes wherever a worker is free."""
    fixtures = item._fixtureinfo.name2fixturedefs
    for name in SHARED_SESSION_FIXTURES:
        if name in fixtures:
            return name
    if any(defs[-1].scope == "module" for defs in fixtures.values()):
        return item.module.__name__
    return None


_running_a_slow_test = False


def pytest_runtest_setup(item):
    """Remember whether the test being set up (fixtures included) is marked slow: ``Store.mlflow_run``
    refuses to run for one that is not, so `make test-fast` never trains through a real process."""
    global _running_a_slow_test
    _running_a_slow_test = item.get_closest_marker("slow") is not None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """With `pytest -n N --dist loadgroup` (make test), tests that share an expensive fixture share
    a worker; see _xdist_group. First: xdist's own hook reads the marks to group the tests, and a
    mark added after it would be ignored (each worker would make the fixture again)."""
    for item in items:
        if not item.get_closest_marker("xdist_group"):
            group = _xdist_group(item)
            if group:
                item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data root for the session. The harness finds Debian's dataset-fashion-mnist by itself; files
    from $CVAE_FASHION_MNIST_DIR are linked into the root, where torchvision's layout puts them."""
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"no Fashion-MNIST in {FASHION_DIR}: apt-get install dataset-fashion-mnist, or set "
                    "CVAE_FASHION_MNIST_DIR to a folder holding its four .gz files")
    root = tmp_path_factory.mktemp("data")
    if FASHION_DIR != DEBIAN_FASHION_DIR:
        raw = root / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for path in FASHION_DIR.glob("*-ubyte.gz"):
            (raw / path.name).symlink_to(path.resolve())
    return root


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_tiny_mnist(root: Path) -> Path:
    """A 120/40-image MNIST in torchvision's raw layout under ``root``, written by the test itself."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (120, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(120) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(40) % 10)
    return root


@pytest.fixture
def tiny_mnist(tmp_path):
    return make_tiny_mnist(tmp_path)


@dataclass
class Store:
    """A temporary MLflow tracking store plus the environment that points commands at it."""
    root: Path
    uri: str
    env: dict

    @property
    def client(self):
        from mlflow import MlflowClient
        return MlflowClient(self.uri)

    def runs(self, filter_string: str = ""):
        client = self.client
        experiment = client.get_experiment_by_name(EXPERIMENT)
        return client.search_runs([experiment.experiment_id], filter_string=filter_string,
                                  order_by=["attributes.start_time ASC"], max_results=1000)

    def mlflow_run(self, entry_point: str, params: dict | None = None, timeout: int = 600,
                   **kwargs) -> subprocess.CompletedProcess:
        if not _running_a_slow_test:
            pytest.fail("this test runs `mlflow run` (a real process that trains): mark it @pytest.mark.slow")
        command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry_point,
                   "--env-manager", "local", "--experiment-name", EXPERIMENT]
        for key, value in (params or {}).items():
            command += ["-P", f"{key}={value}"]
        return subprocess.run(command, cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kwargs)

    def cli(self, module: str, *args: str, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", module, *args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=timeout, **kwargs)

def make_store(root: Path, data_dir: Path) -> Store:
    """A fresh tracking store under ``root``; module-scoped fixtures use it to share one store."""
    from mlflow import MlflowClient
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from pipelines.evaluation.classifier import CLASSIFIER_EXPERIMENT

    uri = f"sqlite:///{root / 'mlflow.db'}"
    # Every experiment a test writes to is made here with its artifacts under ``root``: left to
    # MLflow, an experiment's artifacts go to ./mlruns of the process that created it, and
    # `mlflow run` runs entry points in the repository.
    SqlAlchemyStore(uri, default_artifact_root=(root / "default-artifacts").as_uri())
    client = MlflowClient(uri)
    client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    client.create_experiment(CLASSIFIER_EXPERIMENT, artifact_location=(root / "classifier-artifacts").as_uri())
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
           "CVAE_DATA_DIR": str(data_dir), "CVAE_OFFLINE": "1",
           # Runs' local checkpoints (pipelines.tracking.checkpoints) stay with the store, not in ~/.cache.
           "CVAE_CHECKPOINT_DIR": str(root / "checkpoints"),
           # The repository first; then what was there (the GPU machine's installed wheelhouse).
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
           "PYTHONUNBUFFERED": "1",
           # `mlflow run --env-manager local` runs `python` from PATH: make it this interpreter.
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    env.pop("MLFLOW_RUN_ID", None)
    return Store(root=root, uri=uri, env=env)


@pytest.fixture
def store(tmp_path, data_dir) -> Store:
    return make_store(tmp_path, data_dir)


@contextlib.contextmanager
def in_process_on(store: Store, monkeypatch: pytest.MonkeyPatch, capsys=None):
    """Runs an entry point's ``main`` in this process the way ``run_main`` does (same error
    handling and exit codes), against ``store``: seconds instead of a new interpreter each time.
    Yields ``run(main, *argv) -> (exit code, stderr)`` (stderr only when ``capsys`` is given)."""
    import mlflow

    from pipelines.entrypoints.common import exit_code
    from pipelines.tracking.runs import configure_tracking

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "CVAE_DATA_DIR", "CVAE_OFFLINE", "CVAE_CHECKPOINT_DIR"):
        monkeypatch.setenv(name, store.env[name])
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(store.root)
    previous = mlflow.get_tracking_uri()
    configure_tracking()
    # Optuna's own handler (and its colour formatter) keeps the stderr of when it was made, which may
    # be an earlier test's capture, closed since: its records go to pytest's log capture instead.
    import optuna
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()

    def run(main, *argv: str) -> tuple[int, str]:
        if capsys is not None:
            capsys.readouterr()
        code = exit_code(main, list(argv))
        return code, capsys.readouterr().err if capsys is not None else ""

    try:
        yield run
    finally:
        mlflow.set_tracking_uri(previous)
        optuna.logging.disable_propagation()
        optuna.logging.enable_default_handler()


@pytest.fixture
def in_process(store, monkeypatch, capsys):
    """``in_process_on`` the test's own ``store``."""
    with in_process_on(store, monkeypatch, capsys) as run:
        yield run


@pytest.fixture
def in_store(store, monkeypatch):
    """This process pointed at the test's store (as `store.cli` points a child process), for tests
    that call entry points' functions directly; undone afterwards."""
    with in_process_on(store, monkeypatch):
        yield store


SHARED_RUN_LATENT_DIM = 4


@pytest.fixture(scope="session")
def conditional_run(tmp_path_factory, data_dir):
    """One short conditional training run through `mlflow run`, trained once per session.

    Evaluation, generation and serving tests share it; they only add runs beside it (told apart
    by their tags), never change it.
    """
    from types import SimpleNamespace

    store = make_store(tmp_path_factory.mktemp("shared-run"), data_dir)
    done = store.mlflow_run("train", {**TINY_PARAMS, "epochs": "1", "hidden": "64,32",
                                      "latent_dim": str(SHARED_RUN_LATENT_DIM)})
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = store.runs()
    return SimpleNamespace(store=store, run=run, data_dir=data_dir)


def artifact_paths(client, run_id: str, path: str = "") -> set[str]:
    paths = set()
    for item in client.list_artifacts(run_id, path or None):
        paths |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


def assert_trials_recorded(store: Store, trials, runs: dict, epochs: int = 1, sampler_seed: int = 0) -> None:
    """What every complete trial of a study keeps, however it was trained (alone or fused): a FINISHED run
    with its per-epoch metrics and objective value, a manifest and a reloadable model."""
    import mlflow

    from pipelines.studies.sampling import trial_seed

    client = store.client
    mlflow.set_tracking_uri(store.uri)
    for trial in trials:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == list(range(1, epochs + 1))
        assert run.data.metrics["objective/neg_elbo"] == pytest.approx(trial.value)
        assert run.data.metrics["system/system_memory_usage_megabytes"] > 0  # each trial's own system metrics
        assert "manifest.json" in artifact_paths(client, run.info.run_id)
        model = mlflow.pytorch.load_model(run.data.tags["model_uri"], map_location="cpu")
        assert sum(p.numel() for p in model.parameters()) > 0
        assert trial.user_attrs["sampler_seed"] == trial_seed(sampler_seed, trial.number)


def assert_no_running(store: Store) -> None:
    running = [r.info.run_id for r in store.runs() if r.info.status == "RUNNING"]
    assert not running, f"runs left RUNNING: {running}"


@pytest.fixture(scope="session")
def server_stack():
    """A private PostgreSQL cluster and `mlflow server` on 127.0.0.1 for the session, stopped at its end.

    Its password reaches this process and the workers it starts (which inherit the environment)
    through the stack's $PGPASSFILE, as it reaches a user's. Skips (with the reason) where Debian's
    postgresql or psycopg is not installed.
    """
    from pipelines.local_stack import local_stack, missing_requirements

    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    with local_stack() as stack, pytest.MonkeyPatch.context() as patch:
        for key, value in stack.env.items():
            patch.setenv(key, value)
        yield stack


def wait_until(condition, what: str, timeout_s: float = 300.0, poll_s: float = 0.2):
    """Poll ``condition()`` until it returns something truthy, and return that. The timeout is a
    generous bound on waiting for a state (a loaded machine is slow), never a timing assertion."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(poll_s)
    return value


def wait_until_a_trial_is_stale(storage_url: str, study: str, grace_s: int) -> None:
    """Wait until Optuna's heartbeat rule finds a RUNNING trial of ``study`` stale (what the next
    worker's ``fail_stale_trials`` fails), or a worker already failed it, whatever the machine's load."""
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval: stable in use
        storage = RDBStorage(storage_url, heartbeat_interval=1, grace_period=grace_s)
    study_id = storage.get_study_id_from_name(study)
    # Optuna's own rule (private, but the one fail_stale_trials applies), not a copy of it.
    wait_until(lambda: storage._get_stale_trial_ids(study_id)
               or storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.FAIL,)),
               f"a trial of study {study!r} without a heartbeat for {grace_s} s")


def as_if_on_another_machine(storage_url: str, study: str, pid: int, client) -> None:
    """Make the trials process ``pid`` ran, and their MLflow runs (``client``'s store), look run by a
    worker on another machine, whose processes no worker here can see: only the heartbeat rule can then
    find them stale, as in a real cluster."""
    import json

    from optuna.storages import RDBStorage

    from pipelines.studies.storage import WORKER_ATTR
    from pipelines.studies.trial_runs import PARENT_RUN_ID_ATTR, RUN_ID_ATTR
    from pipelines.tracking.liveness import PROCESS_TAG

    elsewhere = {"host": "another-machine", "pid_namespace": "another-machine"}
    storage = RDBStorage(storage_url)
    study_id = storage.get_study_id_from_name(study)
    for trial in storage.get_all_trials(study_id, deepcopy=False):
        worker = trial.user_attrs.get(WORKER_ATTR) or {}
        if worker.get("pid") != pid:
            continue
        storage.set_trial_user_attr(trial._trial_id, WORKER_ATTR, {**worker, **elsewhere})
        for run_id in {trial.user_attrs.get(RUN_ID_ATTR), trial.user_attrs.get(PARENT_RUN_ID_ATTR)} - {None}:
            holder = json.loads(client.get_run(run_id).data.tags.get(PROCESS_TAG) or "{}")
            if holder.get("pid") == pid:  # the heartbeat's ProcessId (a --workers coordinator's stays)
                client.set_tag(run_id, PROCESS_TAG, json.dumps({**holder, **elsewhere}))
