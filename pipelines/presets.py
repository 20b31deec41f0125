"""Named configurations. A preset is a set of overrides of the base ``RunConfig``."""
from __future__ import annotations

from typing import Any, Mapping

from cvae.config import ConfigError
from pipelines.config import RunConfig, with_overrides

PRESETS: dict[str, Mapping[str, Any]] = {
    # A strong, quick default: a conditional MLP with a 16-D latent space.
    "default": {},
    # The classic 2-D conditional VAE whose latent space can be drawn directly.
    "mlp-2d": {"model.latent_dim": 2, "model.hidden": (512,)},
}


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def preset_config(name: str, base: RunConfig | None = None) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is not valid; choose one of: {', '.join(preset_names())}")
    return with_overrides(base or RunConfig(), {**PRESETS[name], "preset": name})
