"""Configuration from the command line: one flag per field, presets, ``--set KEY=VALUE``.

Kept apart from ``pipelines.config`` so that the configuration itself does not depend on the
presets built on top of it.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from cvae.config import ConfigError
from pipelines.config import FieldDoc, RunConfig, field_docs, with_overrides
from pipelines.presets import preset_config, preset_names


def documented_fields() -> list[FieldDoc]:
    """Every configuration field with its meaning and accepted values, the presets named: the one
    source of the flags' --help and of docs/configuration.md's table."""
    return [replace(doc, choices=preset_names()) if doc.key == "preset" else doc for doc in field_docs()]


def flag_help(doc: FieldDoc) -> str:
    """A field's --help line: the same text as its row in docs/configuration.md."""
    accepted = f"{', '.join(doc.choices)}; " if doc.choices else ""
    text = f"{doc.key}: {doc.help} ({accepted}default: {doc.default or 'empty'})"
    return text.replace("%", "%%")  # argparse formats help with %


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
    groups: dict[str, argparse._ArgumentGroup] = {}
    for doc in documented_fields():
        if doc.key == "preset":
            parser.add_argument("--preset", default=argparse.SUPPRESS, metavar="NAME", help=flag_help(doc))
            continue
        section, name = doc.key.split(".")
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(section))
        group.add_argument(*flag_names(name), dest=f"cfg__{name}", default=argparse.SUPPRESS, metavar="VALUE",
                           help=flag_help(doc))
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
