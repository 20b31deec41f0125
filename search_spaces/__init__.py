"""Search spaces: define-by-run functions that turn an Optuna trial into configuration overrides.

A space is ``space(trial, base) -> {"model.latent_dim": 8, ...}``: it suggests values through
``trial`` and returns overrides of the study's base ``RunConfig``, keyed by dotted names and
applied with ``pipelines.config.with_overrides``. It builds no model and logs nothing.

Select one by name (``default``, ``architectures``, ``optimiser``, ``smoke``) or as ``path/to/file.py:function``
for a space of your own.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

import optuna

from cvae.config import ConfigError
from pipelines.config import RunConfig
from search_spaces.architectures import architectures
from search_spaces.default import default
from search_spaces.optimiser import optimiser
from search_spaces.smoke import smoke

SearchSpace = Callable[[optuna.Trial, RunConfig], dict[str, Any]]

SPACES: dict[str, SearchSpace] = {
    "default": default,
    "architectures": architectures,
    "optimiser": optimiser,
    "smoke": smoke,
}


def space_names() -> tuple[str, ...]:
    return tuple(SPACES)


def _choices() -> str:
    return f"choose one of: {', '.join(space_names())}, or path/to/file.py:function"


def _load_from_file(spec: str) -> SearchSpace:
    path_text, _, function = spec.rpartition(":")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"space={spec!r} is not valid; no file {path_text!r} ({_choices()})")
    module_name = f"_cvae_user_space_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise ConfigError(f"space={spec!r} is not valid; importing {path_text} failed: "
                          f"{type(error).__name__}: {error}") from error
    space = getattr(module, function, None)
    if not callable(space):
        defined = sorted(name for name, value in vars(module).items()
                         if callable(value) and not name.startswith("_") and value.__module__ == module_name)
        raise ConfigError(f"space={spec!r} is not valid; {path_text} defines no function {function!r} "
                          f"(functions there: {', '.join(defined) or 'none'})")
    return space


def resolve_space(spec: str) -> SearchSpace:
    """A space by registered name, or by ``path/to/file.py:function``."""
    if spec in SPACES:
        return SPACES[spec]
    if ":" in spec and spec.rpartition(":")[0].endswith(".py"):
        return _load_from_file(spec)
    raise ConfigError(f"space={spec!r} is not valid; {_choices()}")
