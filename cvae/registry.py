"""Registry of network families: a name maps to a builder of (encoder, decoder).

A builder is ``builder(cfg: ModelConfig, image_shape: (C, H, W), num_classes: int)`` and returns
``(encoder, decoder)``, two ``nn.Module``s that honour this contract:

- ``encoder(x, onehot_or_None) -> (mu, logvar)``, each of shape (N, cfg.latent_dim).
  ``x`` is (N, C, H, W). The encoder receives the one-hot (N, num_classes, same dtype as x) only
  when ``cfg.conditioning`` is ``concat`` or ``channel``; otherwise it receives ``None``.
- ``decoder(z, onehot_or_None) -> (N, C, H, W)``: the raw decoder output, i.e. logits for the
  Bernoulli likelihood and pre-sigmoid values of the mean for the Gaussian one (``CVAE`` applies
  the sigmoid). The decoder receives the one-hot whenever ``cfg.conditioning != "none"``.

The builder reads ``cfg.conditioning`` to size its inputs; the CVAE wrapper only decides what
to pass. ``logvar`` need not be clamped by the builder: ``CVAE.encode`` clamps it.

Register a family with ``register_architecture("name", builder)`` at import time of its module
(and import that module before building a ``ModelConfig`` that names it). ``cvae.mlp`` offers
helpers a new family can reuse: ``make_activation``, ``append_label_channels`` (the ``channel``
mode) and ``encoder_label_mode``.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from cvae.conv import build_conv
from cvae.mlp import build_mlp

Builder = Callable[..., tuple[nn.Module, nn.Module]]

# The built-ins lead the list in error messages.
_BUILDERS: dict[str, Builder] = {"mlp": build_mlp, "conv": build_conv}


def register_architecture(name: str, builder: Builder) -> None:
    """Make ``name`` a valid ``model.arch``; re-registering a name replaces its builder."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"architecture name must be a non-empty string, got {name!r}")
    if not callable(builder):
        raise TypeError(f"builder for {name!r} must be callable")
    _BUILDERS[name] = builder


def architecture_names() -> tuple[str, ...]:
    return tuple(_BUILDERS)


def build_networks(cfg, image_shape: tuple[int, int, int], num_classes: int) -> tuple[nn.Module, nn.Module]:
    """The (encoder, decoder) of ``cfg.arch``, a name ``ModelConfig`` checked against
    ``architecture_names()`` when it was built."""
    return _BUILDERS[cfg.arch](cfg, tuple(image_shape), int(num_classes))
