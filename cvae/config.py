"""Typed configuration of the model and its objective.

Pure data: no I/O, no tracking. Validation happens in ``__post_init__`` so an invalid
configuration can never be built, and every error names the field and the accepted values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from cvae.errors import UserError
from cvae.registry import architecture_names

CONDITIONINGS = ("concat", "channel", "decoder", "none")
LIKELIHOODS = ("bernoulli", "gaussian", "discretized_logistic")
ACTIVATIONS = ("relu", "silu", "elu", "leaky_relu", "tanh")
CONV_DECODERS = ("transpose", "upsample")
GAUSSIAN_VARIANCES = ("fixed", "learned")
KL_ESTIMATORS = ("analytic", "monte_carlo")
INITS = ("torch", "glorot_uniform")  # glorot_uniform: Keras' default (weights), with zero biases
# exp of cvae.model.LOG_STD_RANGE: the model clamps its std to this range, so a std outside it
# would train as another value while the run's params say otherwise.
GAUSSIAN_STD_RANGE = (math.exp(-6.0), math.exp(2.0))


def described(default, help: str, choices=None):
    """A configuration field with what it means: the one text behind its ``--help`` line and its row in
    docs/configuration.md (``pipelines.config_docs``). ``choices``: the accepted values, a tuple or a
    function returning one (the validation in ``__post_init__`` checks the same constants)."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    return field(default=default, metadata=metadata)


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field and what it accepts."""


def require_choice(field: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{field}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def _finite(expectation: str) -> str:
    if expectation.startswith(("a number", "a positive number")):
        return "a finite " + expectation[2:]
    return f"{expectation} (finite)"


def require(condition: bool, field: str, value, expectation: str) -> None:
    """Raise a one-line ConfigError unless ``condition``. A non-finite number (inf, nan) is never
    valid, whatever the condition says: ``inf > 0`` holds, yet no field can use infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{field}={value!r} is not valid; expected {_finite(expectation)}")
    if not condition:
        raise ConfigError(f"{field}={value!r} is not valid; expected {expectation}")


def _as_int_tuple(field: str, value) -> tuple:
    """Accept 512, "64,16,8", [64, 16, 8] or a tuple, so CLI strings and JSON lists both work
    and the frozen config stays hashable."""
    if isinstance(value, str):
        try:
            return tuple(int(part) for part in value.replace(" ", "").split(",") if part)
        except ValueError:
            raise ConfigError(f"{field}={value!r} is not valid; expected comma-separated integers, "
                              f"e.g. 64,16,8") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def _positive_ints(values) -> bool:
    # bool is an int subclass; True as a width is a bug, not a 1.
    return (isinstance(values, tuple) and len(values) >= 1
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values))


@dataclass(frozen=True)
class ModelConfig:
    arch: str = described("mlp", "encoder/decoder family (cvae.registry): mlp, conv, or a reference notebook's "
                                 "network (ref-*)", choices=architecture_names)
    conditioning: str = described(
        "concat", "how the one-hot label reaches the model: concat joins it to the encoder's features, channel "
                  "adds it as constant input channels of the encoder, decoder gives it to the decoder only (the "
                  "other two do too), none makes a plain VAE", choices=CONDITIONINGS)
    latent_dim: int = described(16, "latent dimensions")
    hidden: tuple[int, ...] = described((512, 256), "mlp: encoder widths, comma-separated (reversed for the decoder)")
    activation: str = described("relu", "activation of the mlp and conv layers", choices=ACTIVATIONS)
    channels: tuple[int, ...] = described((32, 64), "conv: encoder channels, one stride-2 stage per entry "
                                                    "(reversed for the decoder)")
    conv_decoder: str = described("transpose", "conv: how the decoder upsamples (transposed convolutions, or "
                                               "nearest-neighbour upsampling then a convolution)",
                                  choices=CONV_DECODERS)
    batch_norm: bool = described(False, "conv: BatchNorm after every convolution")
    likelihood: str = described(
        "bernoulli", "pixel likelihood p(x|z); what its numbers are also depends on data.binarize "
                     "(docs/units.md)", choices=LIKELIHOODS)
    gaussian_variance: str = described("fixed", "gaussian and discretized_logistic: the pixel noise std is "
                                                "fixed, or one learned parameter", choices=GAUSSIAN_VARIANCES)
    gaussian_std: float = described(1.0, "gaussian and discretized_logistic: the pixel noise std (fixed, or "
                                         "initial when learned), in [%.4g, %.4g]" % GAUSSIAN_STD_RANGE)
    init: str = described("torch", "weight initialisation: PyTorch's defaults, or Keras' Glorot-uniform "
                                   "weights with zero biases", choices=INITS)
    # PyTorch's momentum weighs the new batch statistics, Keras' the old ones.
    batch_norm_momentum: float = described(0.1, "momentum of every BatchNorm layer, in (0, 1], PyTorch's "
                                                "convention (Keras' 0.99 is 0.01)")
    batch_norm_eps: float = described(1e-5, "eps of every BatchNorm layer (Keras' default: 1e-3)")
    # Only its gradient: a penalty inside the logged losses would make them something other than nats.
    activity_l2: float = described(0.0, "Keras' activity_regularizer=l2(c) on the mlp encoder's first hidden "
                                        "layer: the gradient of c * sum(h^2) (batch mean) is added in training; "
                                        "logged losses stay nats; 0 = off")

    def __post_init__(self):
        object.__setattr__(self, "hidden", _as_int_tuple("model.hidden", self.hidden))
        object.__setattr__(self, "channels", _as_int_tuple("model.channels", self.channels))
        require_choice("model.arch", self.arch, architecture_names())
        require_choice("model.conditioning", self.conditioning, CONDITIONINGS)
        require(_positive_ints((self.latent_dim,)), "model.latent_dim",
                self.latent_dim, "an integer >= 1")
        require(_positive_ints(self.hidden),
                "model.hidden", self.hidden, "one or more positive integer widths, e.g. 512 or 64,16,8")
        require_choice("model.activation", self.activation, ACTIVATIONS)
        require(_positive_ints(self.channels),
                "model.channels", self.channels, "one or more positive integer channel counts, e.g. 32,64")
        require_choice("model.conv_decoder", self.conv_decoder, CONV_DECODERS)
        require_choice("model.likelihood", self.likelihood, LIKELIHOODS)
        require_choice("model.gaussian_variance", self.gaussian_variance, GAUSSIAN_VARIANCES)
        low, high = GAUSSIAN_STD_RANGE
        require(low <= self.gaussian_std <= high, "model.gaussian_std", self.gaussian_std,
                f"a number in [{low:.4g}, {high:.4g}] (the std the model can represent)")
        require_choice("model.init", self.init, INITS)
        require(0 < self.batch_norm_momentum <= 1, "model.batch_norm_momentum", self.batch_norm_momentum,
                "a number in (0, 1] (PyTorch convention: Keras momentum 0.99 is 0.01)")
        require(self.batch_norm_eps > 0, "model.batch_norm_eps", self.batch_norm_eps, "a number > 0")
        require(self.activity_l2 >= 0, "model.activity_l2", self.activity_l2, "a number >= 0")

    @property
    def conditional(self) -> bool:
        return self.conditioning != "none"


@dataclass(frozen=True)
class ObjectiveConfig:
    # beta. 3, not 1: with beta = 1 the default conditional MLP keeps the class in z (the encoder
    # sees it in x) and its decoder learns to read the class from z rather than from the label,
    # so samples for a requested label come out as another class (classifier-judged sample
    # accuracy 0.67 after 10 epochs on Fashion-MNIST); beta = 3 squeezes that redundant
    # information out of z (0.81 after 4 epochs; docs/evaluation.md). neg_elbo stays the beta = 1 bound.
    kl_weight: float = described(3.0, "β, the weight of the KL term in the training objective (val/neg_elbo "
                                      "stays the β = 1 bound)")
    warmup_epochs: float = described(0.0, "β rises linearly from 0 over this many epochs (fractions allowed); "
                                          "0 = no warm-up")
    free_bits: float = described(0.0, "nats per latent dimension below which the KL is not penalised; 0 = off")
    kl_estimator: str = described("analytic", "the KL term: closed form, or the single-sample Monte Carlo "
                                               "estimate at the sampled z", choices=KL_ESTIMATORS)

    def __post_init__(self):
        require(self.kl_weight >= 0, "objective.kl_weight", self.kl_weight, "a number >= 0")
        require(self.warmup_epochs >= 0, "objective.warmup_epochs", self.warmup_epochs, "a number >= 0")
        require(self.free_bits >= 0, "objective.free_bits", self.free_bits, "a number >= 0")
        require_choice("objective.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
