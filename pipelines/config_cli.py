"""Configuration from the command line: one flag per field, presets, ``--set KEY=VALUE``.

Kept apart from ``pipelines.config`` so that the configuration itself does not depend on the
presets built on top of it.
"""
from __future__ import annotations

import argparse

from cvae.config import ConfigError
from pipelines.config import SECTIONS, RunConfig, field_index, with_overrides
from pipelines.presets import preset_config


def flag_names(name: str) -> list[str]:
    """``latent_dim`` -> ``--latent-dim`` and ``--latent_dim``: `mlflow run` passes ``-P latent_dim=2``
    as ``--latent_dim 2``, while people type dashes."""
    dashed = "--" + name.replace("_", "-")
    return [dashed] + ([f"--{name}"] if "_" in name else [])


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field (``--latent-dim``, ``--latent_dim``), plus ``--preset`` and ``--set``.

    Defaults are suppressed so that only what the user gave overrides the preset. An empty value
    (what MLproject passes for a parameter left unset) also means "not given".
    """
    index = field_index()
    for section in SECTIONS:
        group = parser.add_argument_group(section)
        defaults = getattr(RunConfig(), section)
        for name, (_, _, typ) in index.items():
            if index[name][0] != section:
                continue
            default = getattr(defaults, name)
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            group.add_argument(*flag_names(name), dest=f"cfg__{name}", default=argparse.SUPPRESS, metavar="VALUE",
                               help=f"{section}.{name} (default: {shown!r})")
    parser.add_argument("--preset", default=argparse.SUPPRESS,
                        help="start from a named configuration (see --list-presets)")
    parser.add_argument("--set", dest="cfg_set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any field by dotted name, e.g. --set model.hidden=64,16,8")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    given = {k[len("cfg__"):]: v for k, v in vars(args).items() if k.startswith("cfg__") and v != ""}
    for item in getattr(args, "cfg_set", []):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} is not valid; expected KEY=VALUE")
        given[key.strip()] = value
    preset_name = getattr(args, "preset", "") or ""
    base = preset_config(preset_name) if preset_name else RunConfig()
    return with_overrides(base, given)
