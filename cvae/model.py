"""The conditional VAE: wraps an (encoder, decoder) pair from the registry with labels,
sampling, and the reconstruction likelihood."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cvae.config import ConfigError, ModelConfig
from cvae.likelihood import LOGISTIC_SCALE_PER_STD, discretized_logistic_log_prob
from cvae.registry import build_networks

LOGVAR_RANGE = (-12.0, 8.0)  # keeps exp(logvar) finite and > 0 in float32 and under AMP
LOG_STD_RANGE = (-6.0, 2.0)  # a learned Gaussian std must not collapse to 0 or explode
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG_LOGISTIC_SCALE_PER_STD = math.log(LOGISTIC_SCALE_PER_STD)
SCALED_LIKELIHOODS = ("gaussian", "discretized_logistic")  # those with a pixel noise std


class CVAEOutput(NamedTuple):
    decoded: torch.Tensor  # raw decoder output: logits / pre-sigmoid mean, (N, C, H, W)
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor


class CVAE(nn.Module):
    def __init__(self, config: ModelConfig, image_shape: tuple[int, int, int] = (1, 28, 28),
                 num_classes: int = 10):
        super().__init__()
        self.config = config
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes = int(num_classes)
        self.encoder, self.decoder = build_networks(config, self.image_shape, self.num_classes)
        if config.activity_l2 > 0:
            if not hasattr(self.encoder, "activity_l2"):
                raise ConfigError(f"model.activity_l2={config.activity_l2!r} is not valid with "
                                  f"model.arch={config.arch!r}; expected 0 (only mlp supports it)")
            self.encoder.activity_l2 = float(config.activity_l2)
        _initialise(self, config)
        if config.likelihood in SCALED_LIKELIHOODS:
            init = torch.tensor(math.log(config.gaussian_std), dtype=torch.float32)
            if config.gaussian_variance == "learned":
                self.log_std = nn.Parameter(init)
            else:
                self.register_buffer("log_std", init)
        else:
            self.register_buffer("log_std", None)

    @property
    def conditional(self) -> bool:
        return self.config.conditioning != "none"

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    # -- labels -----------------------------------------------------------------------------
    def _check_labels(self, labels, batch: int, device) -> torch.Tensor | None:
        """The API edge: labels as a 1-D integer tensor of ``batch`` class ids on ``device`` (None
        for an unconditional model), each checked to be in range. The range check synchronises with
        the GPU and cannot run under ``torch.func.vmap``, so the hot path (``_onehot``) never checks:
        the training and compiled evaluation steps pass dataset labels, always valid, and skip it
        (``forward`` in training mode, or while compiling); inference, where user labels arrive, keeps it."""
        if not self.conditional:
            return None
        if labels is None:
            raise ValueError(f"this model is conditional (conditioning={self.config.conditioning!r}): "
                             f"labels are required, got None")
        labels = torch.as_tensor(labels, device=device)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D integer tensor of class ids, got dtype={labels.dtype} "
                             f"shape={tuple(labels.shape)}")
        if labels.shape[0] != batch:
            raise ValueError(f"got {labels.shape[0]} labels for a batch of {batch}")
        if (not self.training and not torch.compiler.is_compiling() and labels.numel()
                and bool(((labels < 0) | (labels >= self.num_classes)).any())):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0].item()
            raise ValueError(f"label {bad} is outside [0, {self.num_classes}) for a model with "
                             f"num_classes={self.num_classes}")
        return labels

    def _onehot(self, labels: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The one-hot of checked labels (None for an unconditional model). A comparison with the
        class ids, not ``F.one_hot``, whose own range check calls ``.item()``: this one is safe under
        ``torch.func.vmap`` (fused training, ``cvae.fused``) and never synchronises with a GPU."""
        if labels is None:
            return None
        classes = torch.arange(self.num_classes, device=labels.device)
        return (labels.unsqueeze(-1) == classes).to(dtype)

    def _check_images(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, self.image_shape))}), "
                             f"got {tuple(x.shape)}")

    # -- networks ---------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor, onehot: torch.Tensor | None):
        enc_onehot = onehot if self.config.conditioning in ("concat", "channel") else None
        mu, logvar = self.encoder(x, enc_onehot)
        return mu, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None):
        """(mu, logvar), each (N, latent_dim); logvar clamped to LOGVAR_RANGE."""
        self._check_images(x)
        return self._encode(x, self._onehot(self._check_labels(labels, x.shape[0], x.device), x.dtype))

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor,
                       generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """z = mu + eps * sigma, with eps drawn from ``generator``, or ``noise`` when given (N, latent_dim)."""
        if noise is None:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        else:
            eps = noise.to(mu.dtype)
        return mu + eps * torch.exp(0.5 * logvar)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Raw decoder output (N, C, H, W): logits, or the pre-sigmoid Gaussian mean."""
        return self.decoder(z, self._onehot(self._check_labels(labels, z.shape[0], z.device), z.dtype))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> CVAEOutput:
        """``noise``: the standard normal draws behind z (N, latent_dim), instead of drawing them:
        an evaluation that draws them per example gets the same z however the examples are batched."""
        self._check_images(x)
        return self.forward_checked(x, self._check_labels(labels, x.shape[0], x.device), generator, noise)

    def forward_checked(self, x: torch.Tensor, labels: torch.Tensor | None,
                        generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> CVAEOutput:
        """``forward`` for inputs already checked (dataset images and labels): no check, no host
        synchronisation. With ``noise`` given it is safe under ``torch.func.vmap`` (``cvae.fused``)."""
        onehot = self._onehot(labels, x.dtype)
        mu, logvar = self._encode(x, onehot)
        z = self.reparameterize(mu, logvar, generator, noise)
        dec_onehot = None if onehot is None else onehot.to(z.dtype)
        return CVAEOutput(self.decoder(z, dec_onehot), mu, logvar, z)

    # -- likelihood -------------------------------------------------------------------------
    def mean_image(self, decoded: torch.Tensor) -> torch.Tensor:
        """Mean of p(x|z) in [0, 1] (the location, for the discretized logistic, whose edge bins
        move its mean slightly towards the middle)."""
        return torch.sigmoid(decoded)

    def clamped_log_std(self) -> torch.Tensor | None:
        return None if self.log_std is None else self.log_std.float().clamp(*LOG_STD_RANGE)

    def reconstruction_nll(self, decoded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x|z) in nats per example, summed over pixels: (N,). Computed in float32.

        What the number is depends on the likelihood and the data (cvae.likelihood.likelihood_kind):
        an exact negative log-probability for ``discretized_logistic`` (256 levels) and for
        ``bernoulli`` on binary pixels, a cross-entropy for ``bernoulli`` on grayscale pixels, a
        negative log-density for ``gaussian``.
        """
        decoded, x = decoded.float(), x.float()
        if self.config.likelihood == "bernoulli":
            # Accepts x in [0, 1] (continuous Bernoulli-style targets), not only binary pixels.
            nll = F.binary_cross_entropy_with_logits(decoded, x, reduction="none")
        elif self.config.likelihood == "discretized_logistic":
            log_scale = self.clamped_log_std() + _LOG_LOGISTIC_SCALE_PER_STD
            nll = -discretized_logistic_log_prob(x, torch.sigmoid(decoded), log_scale)
        else:
            log_std = self.clamped_log_std()
            mean = torch.sigmoid(decoded)
            nll = 0.5 * ((x - mean) * torch.exp(-log_std)).pow(2) + log_std + _HALF_LOG_2PI
        return nll.flatten(1).sum(dim=1)

    # -- generation -------------------------------------------------------------------------
    @contextmanager
    def inference(self):
        """Eval mode and no autograd for generation and evaluation; each module's mode is restored.

        Eval mode so BatchNorm uses its running statistics and is not updated by inference.
        """
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for m, mode in modes:
                m.training = mode

    def _device_dtype(self):
        p = next(self.parameters())
        return p.device, p.dtype

    def sample(self, labels: Sequence[int] | torch.Tensor | None = None, n: int = 1,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean images in [0, 1] decoded from z ~ N(0, I).

        Conditional: ``n`` images per label, label-major (len(labels) * n images).
        Unconditional: ``labels`` is ignored and ``n`` images come back.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        device, dtype = self._device_dtype()
        if self.conditional:
            if labels is None:
                raise ValueError("this model is conditional: sample() needs labels")
            labels = torch.as_tensor(labels, device=device).reshape(-1).repeat_interleave(n)
            count = labels.shape[0]
        else:
            labels, count = None, n
        with self.inference():
            z = torch.randn((count, self.latent_dim), generator=generator, device=device, dtype=dtype)
            return self.mean_image(self.decode(z, labels))

    def reconstruct(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean images decoded from the posterior mean (no sampling)."""
        with self.inference():
            mu, _ = self.encode(x, labels)
            return self.mean_image(self.decode(mu, labels))


_WEIGHTED_LAYERS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


def _initialise(model: nn.Module, config: ModelConfig) -> None:
    """Keras' initialisation and BatchNorm settings when the configuration asks for them."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum, module.eps = config.batch_norm_momentum, config.batch_norm_eps
    if config.init != "glorot_uniform":
        return
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _WEIGHTED_LAYERS):
                # A fused head (mean and log-variance in one layer) stands for several Keras Dense
                # layers: each part gets its own Glorot limit.
                for part in module.weight.chunk(getattr(module, "keras_parts", 1), dim=0):
                    nn.init.xavier_uniform_(part)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


def build(model_cfg: ModelConfig, image_shape: tuple[int, int, int] = (1, 28, 28),
          num_classes: int = 10) -> CVAE:
    if len(image_shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in image_shape):
        raise ValueError(f"image_shape must be three positive integers (C, H, W), got {image_shape!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return CVAE(model_cfg, tuple(image_shape), num_classes)
