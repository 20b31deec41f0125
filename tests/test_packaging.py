"""Packaging stays consistent: conda.yaml, requirements.txt and pyproject.toml agree."""
import tomllib

import yaml
from packaging.requirements import Requirement

from conftest import REPO


def pinned_requirements() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_conda_env_pins_exactly_the_requirements():
    env = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_pins = dict(line.lower().split("==") for line in pip_section)
    assert conda_pins == pinned_requirements()
    assert "python=3.11" in env["dependencies"]


def test_requirements_pin_torch_and_torchvision():
    pins = pinned_requirements()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


def test_pyproject_ranges_admit_the_pins():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = pinned_requirements()
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        assert requirement.specifier.contains(pins[requirement.name.lower()]), spec
