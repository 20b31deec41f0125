"""Property-based fuzzing of the configuration: random values for every field, through the real
parser and the real `train` entry point. Whatever the values, the command either accepts them
(exit 0) or refuses them with exactly one `error:` line and exit 2, and leaves no run RUNNING.

Most examples stop where a run would be created (everything before it is real: parsing,
validation, device resolution, the data check from the IDX headers); a few train for real.
"""
from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from conftest import EXPERIMENT, TINY_DATA, make_store
from cvae.config import ConfigError
from pipelines.config import RunConfig, field_index, from_dict, with_overrides
from pipelines.training.preflight import preflight as all_checks_before_a_run

INDEX = field_index()
CHOICES_LISTED = "; choose one of: "


def listed_choices(name: str) -> list[str] | None:
    """The values the configuration itself lists when it refuses one for ``name`` (None for a
    field that lists none), so the fuzzing follows the code: every architecture, likelihood and
    activation it accepts, and any added later."""
    try:
        with_overrides(RunConfig(), {name: "\x00 no such choice"})
    except ConfigError as error:
        _, listed, choices = str(error).partition(CHOICES_LISTED)
        return choices.split(", ") if listed else None
    return None


CHOICES = {name: choices for name, (_, _, typ) in INDEX.items()
           if typ is str and (choices := listed_choices(name))}
# Free-form strings: devices that exist, may exist or cannot; the data root is the session's.
FREE_FORM = {"device": ["auto", "cpu", "cuda", "cuda:0", "cuda:99", "tpu"], "data_dir": [""]}
# No clock in the verdict: no deadline per example, and no health check on how long generating
# the examples took (on a loaded machine both measure the load, not the code).
UNTIMED = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}
ODD_NUMBERS = ["", " ", "inf", "-inf", "nan", "1e999", "-0", "8.0", "2.5", "1e3", "0x10", "abc", "1_000",
               str(2**63), str(2**64), "-1", "0"]


def _texts() -> st.SearchStrategy[str]:
    return st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


def garbage_strategy(name: str, typ) -> st.SearchStrategy[str]:
    """Strings as a user, a shell or `mlflow run -P` might pass them, of any kind."""
    if typ is bool:
        return st.sampled_from(["1", "0", "yes", "off", "maybe", "", "2"])
    if typ is int:
        return st.one_of(st.integers(-10, 10**9).map(str), st.sampled_from(ODD_NUMBERS))
    if typ is float:
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.sampled_from(ODD_NUMBERS))
    if name in ("hidden", "channels", "image_size"):
        return st.one_of(st.lists(st.integers(-3, 2000), max_size=4).map(lambda v: ",".join(map(str, v))),
                         st.sampled_from(["64,x", "1e999", "64.5", ",,", "inf"]), _texts())
    return st.one_of(st.sampled_from(["", "nope", "MLP", "cuda:", "fp64"]), _texts())


def sensible_strategy(name: str, typ) -> st.SearchStrategy[str]:
    """Values of the field's kind in a plausible range: most of them valid."""
    if name in CHOICES or name in FREE_FORM:
        return st.sampled_from(CHOICES.get(name) or FREE_FORM[name])
    if typ is bool:
        return st.sampled_from(["true", "false"])
    if typ is int:
        return st.integers(0, 60).map(str)
    if typ is float:
        return st.floats(0, 3).map(repr)
    if name in ("hidden", "channels", "image_size"):
        return st.lists(st.integers(1, 64), min_size=1, max_size=3).map(lambda v: ",".join(map(str, v)))
    raise AssertionError(f"no strategy for the string field {name!r}")


def test_every_string_field_is_fuzzed_with_what_the_configuration_accepts():
    strings = {name for name, (_, _, typ) in INDEX.items() if typ is str}
    assert strings == set(CHOICES) | set(FREE_FORM), "a string field without choices needs a FREE_FORM entry"
    for name, choices in CHOICES.items():  # the listed values parse back as valid, one by one
        assert all(getattr(getattr(with_overrides(RunConfig(), {name: value}), INDEX[name][0]), name) == value
                   for value in choices), name


def value_strategy(name: str, typ) -> st.SearchStrategy[str]:
    sensible = sensible_strategy(name, typ)
    return st.one_of(sensible, sensible, sensible, garbage_strategy(name, typ))


def overrides_strategy() -> st.SearchStrategy[dict[str, str]]:
    """A few fields at a time (every field gets its turn), each with a value of its own kind or garbage."""
    def values(names: list[str]) -> st.SearchStrategy[dict[str, str]]:
        return st.fixed_dictionaries({name: value_strategy(name, INDEX[name][2]) for name in names})

    return st.lists(st.sampled_from(sorted(INDEX)), max_size=4, unique=True).flatmap(values)


def as_argv(overrides: dict[str, str]) -> list[str]:
    # Fashion-MNIST (installed) unless the dataset is fuzzed; --flag=value: a value that starts
    # with "-" stays a value for argparse.
    return ["--dataset=fashion-mnist", *[f"--{name.replace('_', '-')}={value}" for name, value in overrides.items()]]


class RunWouldStart(Exception):
    """Raised where the entry point would create its MLflow run: the input passed every check."""


@contextlib.contextmanager
def _no_run(*args, **kwargs):
    raise RunWouldStart
    yield  # pragma: no cover


@pytest.fixture(scope="module")
def preflight(tmp_path_factory, data_dir):
    """The real `train` entry point up to the moment it would open a run."""
    from pipelines.entrypoints import train as train_entry

    def main_until_a_run(argv):
        # Stopped only for this call: a module-wide patch would also stop the real runs below.
        with pytest.MonkeyPatch.context() as stop:
            stop.setattr(train_entry, "entry_point_run", _no_run)
            return train_entry.main(argv)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CVAE_OFFLINE", "1")
        patch.setenv("CVAE_DATA_DIR", str(data_dir))
        patch.chdir(tmp_path_factory.mktemp("cwd"))
        yield main_until_a_run


def run_entry(main, argv, capsys) -> tuple[int, str, str]:
    from pipelines.entrypoints.common import exit_code

    capsys.readouterr()
    try:
        code = exit_code(main, argv)
    except RunWouldStart:
        code = 0
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_outcome(code: int, err: str, argv) -> None:
    lines = err.strip().splitlines()
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert " is not valid" in lines[0] or "not found" in lines[0], (argv, err)


@settings(max_examples=150, **UNTIMED)
@given(overrides=overrides_strategy())
@example(overrides={"lr": "inf"})
@example(overrides={"kl_weight": "nan", "warmup_epochs": "inf"})
@example(overrides={"val_size": "100000", "dataset": "fashion-mnist"})
@example(overrides={"gaussian_std": "1e999", "hidden": "\x00"})
def test_any_values_are_accepted_or_refused_in_one_line(preflight, capsys, overrides):
    argv = as_argv(overrides)
    code, out, err = run_entry(preflight, argv, capsys)
    assert_clean_outcome(code, err, argv)
    event(f"exit {code}" + (f": {err.split('=')[0]}" if code else ""))
    printed_code, printed, printed_err = run_entry(preflight, [*argv, "--print-config"], capsys)
    if code == 0:
        # An accepted configuration prints, and what it prints rebuilds the same configuration.
        assert printed_code == 0, (argv, printed_err)
        config = from_dict(json.loads(printed))
        assert isinstance(config, RunConfig)
        try:  # the full pre-flight (the model built without memory) accepts it or says why in one line
            all_checks_before_a_run(config)
        except ConfigError as error:
            assert "\n" not in str(error) and " is not valid" in str(error), str(error)
    else:
        assert printed_code in (0, 2)


@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory, data_dir):
    import mlflow

    store = make_store(tmp_path_factory.mktemp("fuzz-store"), data_dir)
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "CVAE_DATA_DIR", "CVAE_OFFLINE"):
            patch.setenv(name, store.env[name])
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        patch.chdir(store.root)
        from pipelines.tracking.runs import configure_tracking
        configure_tracking()
        yield store
    mlflow.set_tracking_uri(previous)


SMALL = {
    "latent_dim": st.sampled_from(["2", "0", "3.5", "inf"]), "hidden": st.sampled_from(["16", "8,4", "0", ""]),
    "lr": st.sampled_from(["1e-3", "nan", "0.01"]), "kl_weight": st.sampled_from(["1", "-1", "0.5"]),
    "binarize": st.sampled_from(["none", "dynamic", "sometimes"]), "batch_size": st.sampled_from(["64", "0"]),
    "free_bits": st.sampled_from(["0", "0.1", "inf"]), "precision": st.sampled_from(["fp32", "fp16"]),
    "activation": st.sampled_from(["relu", "tanh"]),
}


@pytest.mark.slow
@settings(max_examples=3, **UNTIMED)
@given(overrides=st.fixed_dictionaries({}, optional=SMALL))
@example(overrides={"lr": "1e-3", "latent_dim": "2", "hidden": "16"})
def test_real_tiny_runs_end_cleanly_whatever_the_values(fuzz_store, capsys, overrides):
    from pipelines.entrypoints.train import main

    argv = [*TINY_DATA[:2], "--limit-train", "200", "--val-size", "100", "--limit-test", "100", "--epochs", "1",
            "--patience", "0", "--hidden", "16", *as_argv(overrides)]
    client = fuzz_store.client
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment])}
    code, _, err = run_entry(main, argv, capsys)
    assert code in (0, 1, 2), (argv, err)
    if code != 0:  # 1: a divergence, reported in one line like bad input
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in err, (argv, err)
    new = [r for r in client.search_runs([experiment]) if r.info.run_id not in before]
    # Bad input stops before a run; a run that starts ends FINISHED, or FAILED when it diverged.
    assert [r.info.status for r in new] == {0: ["FINISHED"], 1: ["FAILED"], 2: []}[code], (argv, err)
