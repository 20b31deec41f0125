"""Packaging stays consistent: conda.yaml, requirements.txt and pyproject.toml agree with each other."""
import importlib.metadata

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from conftest import REPO


def pinned_requirements() -> dict[str, str]:
    """requirements.txt as name -> version; every line must be an exact pin."""
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==" and "*" not in specifier.version, f"not an exact pin: {line}"
            pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def conda_env() -> dict:
    return yaml.safe_load((REPO / "conda.yaml").read_text())


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_conda_env_pins_exactly_the_requirements():
    pip_section = next(d["pip"] for d in conda_env()["dependencies"] if isinstance(d, dict))
    conda_pins = {canonicalize_name(name): version for name, version in (line.split("==") for line in pip_section)}
    assert conda_pins == pinned_requirements()


def test_conda_python_is_one_pyproject_admits():
    (python,) = [d for d in conda_env()["dependencies"] if isinstance(d, str) and d.startswith("python=")]
    version = python.removeprefix("python=")
    assert SpecifierSet(pyproject()["requires-python"]).contains(f"{version}.0"), python


def test_every_pyproject_dependency_is_pinned_in_a_version_its_range_admits():
    project = pyproject()
    specs = [*project["dependencies"], *(s for extra in project["optional-dependencies"].values() for s in extra)]
    pins = pinned_requirements()
    for spec in specs:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{spec} has no pin in requirements.txt"
        assert requirement.specifier.contains(pins[name]), f"{spec} does not admit the pin {pins[name]}"


def test_the_pinned_torchvision_was_built_for_the_pinned_torch():
    pins = pinned_requirements()
    if importlib.metadata.version("torchvision").split("+")[0] != pins["torchvision"]:
        pytest.skip("this environment does not have the pinned torchvision installed")
    (needs_torch,) = [Requirement(r) for r in importlib.metadata.requires("torchvision")
                      if canonicalize_name(Requirement(r).name) == "torch"]
    assert needs_torch.specifier.contains(pins["torch"]), (needs_torch, pins["torch"])
