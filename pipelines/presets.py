"""Named configurations. A preset is a set of overrides of the base ``RunConfig``."""
from __future__ import annotations

import math
from typing import Any, Mapping

from cvae.config import ConfigError
from pipelines.config import RunConfig, with_overrides

_MNIST = {"data.dataset": "mnist", "data.binarize": "none"}
_SUMMED_SQUARED_ERROR = {"model.likelihood": "gaussian", "model.gaussian_variance": "fixed",
                         "model.gaussian_std": math.sqrt(0.5)}

PRESETS: dict[str, Mapping[str, Any]] = {
    # A strong, quick default: a conditional MLP with a 16-D latent space.
    "default": {},
    # The classic 2-D conditional VAE whose latent space can be drawn directly.
    "mlp-2d": {"model.latent_dim": 2, "model.hidden": (512,)},
    # The five reference notebooks (MNIST, as they used). Where a notebook validated on the test
    # set, these validate on the held-out validation split, so the test set stays unseen until
    # the end. "Squared error summed over pixels" is the Gaussian likelihood with a fixed
    # sigma^2 = 1/2: -log N(x; m, 1/2) = sum (x - m)^2 + (784 / 2) log(pi), which is the notebooks'
    # loss plus a constant. So the gradients are the same, and the reported value stays an
    # honest NLL.
    #
    # Conditional CNN, label only at the decoder, 2-D latent; Bernoulli, Adam (Keras default lr),
    # batch 500, 15 epochs, early stopping after 5 epochs without improvement.
    "conv-decoder-cond": {
        **_MNIST, "model.arch": "ref-conv-decoder-cond", "model.conditioning": "decoder",
        "model.latent_dim": 2, "model.likelihood": "bernoulli",
        "optim.lr": 1e-3, "optim.batch_size": 500, "optim.epochs": 15, "optim.patience": 5,
    },
    # Conditional MLP, [x, one-hot] -> 512 ReLU -> 2-D latent -> [z, one-hot] -> 512 ReLU -> 784;
    # BCE summed over pixels + KL, Adam lr 5e-4, batch 250, up to 100 epochs, patience 5.
    "mlp-concat": {
        **_MNIST, "model.arch": "mlp", "model.conditioning": "concat", "model.latent_dim": 2,
        "model.hidden": (512,), "model.activation": "relu", "model.likelihood": "bernoulli",
        "optim.lr": 5e-4, "optim.batch_size": 250, "optim.epochs": 100, "optim.patience": 5,
    },
    # Conditional swish CNN with the label as 10 extra encoder planes, 16-D latent; squared error
    # summed over pixels with KL weight 1e-4, Adam lr 5e-4, batch 128, 30 epochs, no early stopping.
    "conv-label-channel": {
        **_MNIST, "model.arch": "ref-conv-label-channel", "model.conditioning": "channel",
        "model.latent_dim": 16, **_SUMMED_SQUARED_ERROR, "objective.kl_weight": 1e-4,
        "optim.lr": 5e-4, "optim.batch_size": 128, "optim.epochs": 30, "optim.patience": 0,
    },
    # Unconditional MLP VAE 784 -> 64 -> 16 -> 8 -> 2-D latent -> 8 -> 16 -> 64 -> 784; squared
    # error x 784 (summed) + KL, Adam (Keras default lr), batch 16, 25 epochs, no early stopping.
    # The notebook samples with its second encoder output as log sigma but uses it as log sigma^2
    # in the KL. Here it is the log-variance in both places.
    "mlp-vae": {
        **_MNIST, "model.arch": "mlp", "model.conditioning": "none", "model.latent_dim": 2,
        "model.hidden": (64, 16, 8), "model.activation": "relu", **_SUMMED_SQUARED_ERROR,
        "optim.lr": 1e-3, "optim.batch_size": 16, "optim.epochs": 25, "optim.patience": 0,
    },
    # The TensorFlow "Convolutional VAE" tutorial: unconditional, 50-D latent, pixels binarized
    # once at 0.5, single-sample Monte Carlo ELBO log p(x|z) + log p(z) - log q(z|x), Adam lr 1e-4,
    # batch 100, 100 epochs, no early stopping.
    "conv-vae": {
        **_MNIST, "data.binarize": "static", "model.arch": "ref-conv-vae", "model.conditioning": "none",
        "model.latent_dim": 50, "model.likelihood": "bernoulli", "objective.kl_estimator": "monte_carlo",
        "optim.lr": 1e-4, "optim.batch_size": 100, "optim.epochs": 100, "optim.patience": 0,
    },
}


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def preset_config(name: str, base: RunConfig | None = None) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is not valid; choose one of: {', '.join(preset_names())}")
    return with_overrides(base or RunConfig(), {**PRESETS[name], "preset": name})
