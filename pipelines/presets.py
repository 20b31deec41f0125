"""Named configurations. A preset is a set of overrides of the base ``RunConfig``."""
from __future__ import annotations

import math
from typing import Any, Mapping

from cvae.config import ConfigError
from pipelines.config import RunConfig, with_overrides

_MNIST = {"data.dataset": "mnist", "data.binarize": "none"}
_SUMMED_SQUARED_ERROR = {"model.likelihood": "gaussian", "model.gaussian_variance": "fixed",
                         "model.gaussian_std": math.sqrt(0.5)}

# Keras' defaults, which every reference notebook trained with: Glorot-uniform weights with zero
# biases; BatchNorm momentum 0.99 (0.01 in PyTorch's convention) and eps 1e-3.
_KERAS = {"model.init": "glorot_uniform", "model.batch_norm_momentum": 0.01, "model.batch_norm_eps": 1e-3}
# Keras keeps the last epoch's weights: without EarlyStopping, and with it unless
# restore_best_weights=True, which no notebook set.
_KERAS_LAST_WEIGHTS = {"optim.restore_best": False}
# Pixels in [0, 1] averaged by a Keras loss while the KL is summed: multiplying the notebook's
# loss by the D = 784 pixels gives the summed objective with the KL weighted by 784 * (its weight).
_PIXELS = 28 * 28
FIXED_SUFFIX = "-fixed"

PRESETS: dict[str, Mapping[str, Any]] = {
    # A strong, quick default: a conditional MLP with a 16-D latent space and KL weight 3, which
    # makes it use its label (cvae.config.ObjectiveConfig).
    "default": {},
    # The classic 2-D conditional VAE whose latent space can be drawn directly.
    "mlp-2d": {"model.latent_dim": 2, "model.hidden": (512,)},
    # The five reference notebooks (MNIST, as they used), each trained as the notebook trained it,
    # mistakes included; "NAME-fixed" trains what the notebook meant (docs/presets.md). Where a
    # notebook validated on the test set, these validate on the held-out validation split, so the
    # test set stays unseen until the end. "Squared error summed over pixels" is the Gaussian
    # likelihood with a fixed sigma^2 = 1/2: -log N(x; m, 1/2) = sum (x - m)^2 + (784 / 2) log(pi),
    # which is the notebooks' loss plus a constant. So the gradients are the same.
    #
    # Conditional CNN, label only at the decoder, 2-D latent; Bernoulli, Adam (Keras default lr),
    # batch 500, 15 epochs, early stopping after 5 epochs without improvement. The notebook's BCE
    # is Keras' per-pixel mean while its KL is summed: KL weight 784 on the summed objective,
    # which collapses the posterior (its own log shows KL ~1e-8).
    "conv-decoder-cond": {
        **_MNIST, **_KERAS, **_KERAS_LAST_WEIGHTS, "model.arch": "ref-conv-decoder-cond",
        "model.conditioning": "decoder", "model.latent_dim": 2, "model.likelihood": "bernoulli",
        "objective.kl_weight": float(_PIXELS),
        "optim.lr": 1e-3, "optim.batch_size": 500, "optim.epochs": 15, "optim.patience": 5,
    },
    # Conditional MLP, [x, one-hot] -> 512 ReLU -> 2-D latent -> [z, one-hot] -> 512 ReLU -> 784;
    # BCE summed over pixels + KL, Adam lr 5e-4, batch 250, up to 100 epochs, patience 5. The
    # 512-unit encoder layer has activity_regularizer='l2': 0.01 * sum(h^2) added to the loss.
    "mlp-concat": {
        **_MNIST, **_KERAS, **_KERAS_LAST_WEIGHTS, "model.arch": "mlp", "model.conditioning": "concat",
        "model.latent_dim": 2, "model.hidden": (512,), "model.activation": "relu",
        "model.likelihood": "bernoulli", "model.activity_l2": 0.01,
        "objective.kl_weight": 1.0,
        "optim.lr": 5e-4, "optim.batch_size": 250, "optim.epochs": 100, "optim.patience": 5,
    },
    # Conditional swish CNN with the label as 10 extra encoder planes, 16-D latent; Adam lr 5e-4,
    # batch 128, 30 epochs, no early stopping. The notebook compiles with loss='mse' (a pixel
    # mean) and adds 1e-4 * KL: on summed squared error (sigma^2 = 1/2) that is KL weight
    # 784 * 1e-4 = 0.0784.
    "conv-label-channel": {
        **_MNIST, **_KERAS, **_KERAS_LAST_WEIGHTS, "model.arch": "ref-conv-label-channel",
        "model.conditioning": "channel", "model.latent_dim": 16, **_SUMMED_SQUARED_ERROR,
        "objective.kl_weight": _PIXELS * 1e-4,
        "optim.lr": 5e-4, "optim.batch_size": 128, "optim.epochs": 30, "optim.patience": 0,
    },
    # Unconditional MLP VAE 784 -> 64 -> 16 -> 8 -> 2-D latent -> 8 -> 16 -> 64 -> 784; squared
    # error x 784 (summed) + KL, Adam (Keras default lr), batch 16, 25 epochs, no early stopping.
    # The notebook samples with its second encoder output as log sigma but uses it as log sigma^2
    # in the KL. Here it is the log-variance in both places.
    "mlp-vae": {
        **_MNIST, **_KERAS, **_KERAS_LAST_WEIGHTS, "model.arch": "mlp", "model.conditioning": "none",
        "model.latent_dim": 2, "model.hidden": (64, 16, 8), "model.activation": "relu", **_SUMMED_SQUARED_ERROR,
        "objective.kl_weight": 1.0,
        "optim.lr": 1e-3, "optim.batch_size": 16, "optim.epochs": 25, "optim.patience": 0,
    },
    # The TensorFlow "Convolutional VAE" tutorial: unconditional, 50-D latent, pixels binarized
    # once at 0.5, single-sample Monte Carlo ELBO log p(x|z) + log p(z) - log q(z|x), Adam lr 1e-4,
    # batch 100, 100 epochs, no early stopping.
    "conv-vae": {
        **_MNIST, **_KERAS, **_KERAS_LAST_WEIGHTS, "data.binarize": "static", "model.arch": "ref-conv-vae",
        "model.conditioning": "none", "model.latent_dim": 50, "model.likelihood": "bernoulli",
        "objective.kl_estimator": "monte_carlo",
        "objective.kl_weight": 1.0,
        "optim.lr": 1e-4, "optim.batch_size": 100, "optim.epochs": 100, "optim.patience": 0,
    },
}

# What each notebook meant, beside what it trained: the same network, data and schedule with its
# mistakes undone, the best validation epoch kept, and a likelihood that is exact for the data
# (dynamically binarized pixels for Bernoulli, the discretized logistic for 8-bit pixels), so the
# test numbers are negative log-probabilities (docs/units.md).
_FIXES: dict[str, Mapping[str, Any]] = {
    # KL weight 1 (the ELBO), not 784.
    "conv-decoder-cond": {"objective.kl_weight": 1.0, "data.binarize": "dynamic"},
    # No activity penalty on the encoder's hidden layer: it is not part of the ELBO.
    "mlp-concat": {"model.activity_l2": 0.0, "data.binarize": "dynamic"},
    # KL weight 1 on a normalised likelihood of the 8-bit pixels with a learned noise scale,
    # instead of KL weight 0.0784 on squared error with a fixed sigma^2 = 1/2.
    "conv-label-channel": {"objective.kl_weight": 1.0, "model.likelihood": "discretized_logistic",
                           "model.gaussian_variance": "learned", "model.gaussian_std": 0.1},
}
for _name, _fix in _FIXES.items():
    PRESETS[_name + FIXED_SUFFIX] = {**PRESETS[_name], "optim.restore_best": True, **_fix}


def notebook_of(preset: str) -> str:
    """The reference notebook preset that ``preset`` trains (itself, or what NAME-fixed fixes)."""
    return preset.removesuffix(FIXED_SUFFIX)


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def preset_config(name: str, base: RunConfig | None = None) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is not valid; choose one of: {', '.join(preset_names())}")
    return with_overrides(base or RunConfig(), {**PRESETS[name], "preset": name})
