"""The GPU machine's wheelhouse (benchmarks/gpu/wheelhouse.txt), checked without a registry.

benchmarks/gpu/build_wheelhouse.sh downloads the wheels and runs the same `check` on them; here the
wheels are stand-ins made from this virtualenv's installed metadata (the same versions: the pins
are those the project's virtualenv resolved), so that a pin dropped, added or out of step with
requirements.txt fails in CI, not on a GPU lent for fifteen minutes.
"""
from __future__ import annotations

import importlib.metadata
import zipfile
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from benchmarks.gpu import wheelhouse
from conftest import FASHION_DIR, REPO

# requirements.txt's name -> the wheel carried for it (MLflow as mlflow-skinny: the same package
# without the UI's JavaScript).
CARRIED_AS = {"mlflow": "mlflow-skinny", "optuna": "optuna", "cmaes": "cmaes", "plotly": "plotly"}


def requirements_txt() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_the_harness_packages_are_carried_at_the_pins_of_requirements_txt():
    pins, _ = wheelhouse.read_list()
    required = requirements_txt()
    assert {CARRIED_AS[name]: required[name] for name in CARRIED_AS} == {name: pins[name] for name in CARRIED_AS.values()}
    # What requirements.txt pins and the wheelhouse does not carry, the machine has (or only tests
    # and extras the GPU checks do not run use).
    machine = wheelhouse.machine_packages()
    not_needed_there = {"ruff", "optuna-dashboard", "playwright", "psycopg", "psycopg-binary"}
    assert set(required) - set(CARRIED_AS) - machine - not_needed_there == set()


def stand_in_wheel(directory: Path, name: str, version: str) -> Path:
    """A wheel of ``name``==``version`` holding only the METADATA of this virtualenv's copy."""
    metadata = importlib.metadata.distribution(name).read_text("METADATA")
    stem = f"{name.replace('-', '_')}-{version}"
    path = directory / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{stem}.dist-info/METADATA", metadata)
    return path


@pytest.fixture
def stand_ins(tmp_path) -> Path:
    pins, _ = wheelhouse.read_list()
    for name, version in pins.items():
        assert importlib.metadata.version(name) == version, f"this virtualenv has another {name} than the pin"
        stand_in_wheel(tmp_path, name, version)
    return tmp_path


def test_the_pinned_list_is_closed_over_its_requirements(stand_ins):
    assert wheelhouse.check(stand_ins) == []


def test_the_check_names_a_missing_wheel_a_stray_one_and_an_unmet_requirement(stand_ins):
    (stand_ins / "sqlalchemy-2.1.9-py3-none-any.whl").unlink()
    stand_in_wheel(stand_ins, "numpy", importlib.metadata.version("numpy"))
    problems = wheelhouse.check(stand_ins)
    assert "no wheel of sqlalchemy==2.1.9" in problems
    assert any(p.startswith("numpy-") and "is not in wheelhouse.txt" in p for p in problems)
    assert any(p.startswith("numpy is on the GPU machine already") for p in problems)
    assert any(p.lower().startswith("alembic needs sqlalchemy") and "neither carried nor on the GPU machine" in p
               for p in problems), problems


def test_the_fashion_mnist_slice_reads_back(tmp_path):
    from pipelines.data import idx_shape, read_idx

    wheelhouse.write_data(FASHION_DIR, tmp_path, test_images=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(wheelhouse.TRAIN_FILES + wheelhouse.TEST_FILES)
    images, _ = read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    labels, _ = read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz")
    full, _ = read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10, 28, 28) and labels.shape == (10,)
    assert (images == full[:10]).all()
    assert idx_shape(tmp_path / "train-images-idx3-ubyte.gz") == (60_000, 28, 28)  # whole: an epoch is timed
