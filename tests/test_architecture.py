"""The layering ARCHITECTURE.md describes, checked on the source: imports go downwards only.

Every import counts, those inside ``if TYPE_CHECKING:`` and inside functions too: a module that
names a type of a higher layer depends on it as much as one that imports it at run time.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# Lowest first: a layer may import the layers before it, never one after it.
LAYERS = [
    ["cvae"],
    ["pipelines.errors", "pipelines.config", "pipelines.metrics", "pipelines.presets", "pipelines.config_cli",
     "pipelines.config_docs",
     "pipelines.data"],
    ["pipelines.tracking"],
    ["pipelines.training"],
    ["pipelines.models"],
    ["pipelines.evaluation"],
    ["pipelines.recording"],
    ["search_spaces"],
    ["pipelines.studies", "pipelines.reproduce", "pipelines.local_stack", "pipelines.server_process"],
    ["pipelines.entrypoints"],
    ["benchmarks"],
]
OUTSIDE_THE_MODEL = ("mlflow", "optuna", "pipelines", "search_spaces", "matplotlib", "pandas")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


SOURCES = {module_name(p): p for top in ("cvae", "pipelines", "search_spaces", "benchmarks")
           for p in (REPO / top).rglob("*.py")}
IMPORTS = {name: {i for i in imported_names(path) if i in SOURCES and i != name} for name, path in SOURCES.items()}


def layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in layer):
            return index
    raise AssertionError(f"{module} is in no layer of ARCHITECTURE.md: add it to LAYERS")


def test_every_import_goes_to_the_same_layer_or_below():
    upward = [f"{a} imports {b}" for a, targets in IMPORTS.items() for b in targets if layer_of(b) > layer_of(a)]
    assert not upward, upward


def test_no_module_imports_a_module_that_imports_it_back():
    def path_back(start: str, node: str, seen: set[str]) -> list[str] | None:
        for target in IMPORTS[node]:
            if target == start:
                return [node, start]
            if target not in seen:
                seen.add(target)
                found = path_back(start, target, seen)
                if found:
                    return [node, *found]
        return None

    cycles = [" -> ".join([m, *found[1:]]) for m in IMPORTS if (found := path_back(m, m, set()))]
    assert not cycles, cycles


def test_the_model_core_is_pure_pytorch():
    leaks = [f"{name} imports {i}" for name, path in SOURCES.items() if name.startswith("cvae")
             for i in imported_names(path) if i.split(".")[0] in OUTSIDE_THE_MODEL]
    assert not leaks, leaks


def test_a_type_named_only_for_the_checker_counts_as_an_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                     "    from pipelines.training.train import TrainResult\n")
    assert "pipelines.training.train" in {name for name in imported_names(probe) if name in SOURCES}
    assert layer_of("pipelines.training.train") > layer_of("pipelines.tracking.runs")  # so tracking/ may not
