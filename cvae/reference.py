"""The convolutional encoder/decoder pairs of the reference notebooks, layer for layer.

Three families are registered here (the two MLP notebooks need none: the generic ``mlp`` family
expresses them exactly):

- ``ref-conv-decoder-cond``: max-pooling encoder with 7x7 convolutions, upsampling decoder
  (preset ``conv-decoder-cond``).
- ``ref-conv-label-channel``: strided swish encoder with batch norm, transposed-convolution
  decoder (preset ``conv-label-channel``).
- ``ref-conv-vae``: the two-convolution encoder and transposed-convolution decoder of the
  TensorFlow "Convolutional VAE" tutorial (preset ``conv-vae``).

Common choices, the same for all three:

- The decoders end without a sigmoid: they return logits (Bernoulli) or the pre-sigmoid mean
  (Gaussian), as the registry's contract asks. ``CVAE.mean_image`` applies the notebooks' final
  sigmoid, and ``binary_cross_entropy_with_logits`` is the numerically stable form of their
  sigmoid followed by binary cross-entropy; the functions computed are the same.
- "Mean, log-variance" is one ``Linear(h, 2 * latent_dim)`` split in halves. That is the same
  function and the same parameter count as two ``Linear(h, latent_dim)`` heads.
- Keras "same" padding becomes ``padding=k // 2`` for stride 1, and ``padding=1`` (plus
  ``output_padding=1`` for transposed convolutions) for 3x3 stride 2. The output sizes are the
  same. The alignment can differ by one pixel, because TensorFlow puts odd padding at the
  bottom/right.
- The networks are built for 28x28 images (their dense layers are sized for 7x7 or 4x4 feature
  maps). Any number of image channels works. The label reaches the decoder whenever
  ``conditioning != "none"``, and it reaches the encoder as extra image planes with
  ``conditioning="channel"``. ``concat`` is refused because these encoders have no flat input to
  concatenate to.
"""
from __future__ import annotations

import torch
from torch import nn

from cvae.config import ConfigError
from cvae.mlp import append_label_channels, encoder_label_mode, make_activation
from cvae.registry import register_architecture

IMAGE_SIZE = (28, 28)
SUPPORTED_CONDITIONINGS = ("decoder", "channel", "none")


class ReferenceEncoder(nn.Module):
    """``body`` maps the image (plus label planes in ``channel`` mode) to flat features, and
    ``head`` maps those to the mean and log-variance, concatenated."""

    def __init__(self, body: nn.Module, head: nn.Linear, label_mode: str | None):
        super().__init__()
        self.body = body
        self.head = head
        self.label_mode = label_mode

    def forward(self, x: torch.Tensor, onehot: torch.Tensor | None):
        if self.label_mode == "channel":
            x = append_label_channels(x, onehot)
        mu, logvar = self.head(self.body(x)).chunk(2, dim=1)
        return mu, logvar


class ReferenceDecoder(nn.Module):
    """``body`` maps [z, one-hot] (or z alone when unconditional) to the raw image output."""

    def __init__(self, body: nn.Module, conditional: bool):
        super().__init__()
        self.body = body
        self.conditional = conditional

    def forward(self, z: torch.Tensor, onehot: torch.Tensor | None):
        if self.conditional:
            z = torch.cat([z, onehot.to(z.dtype)], dim=1)
        return self.body(z)


def _check_supported(arch: str, cfg, image_shape) -> tuple[int, str | None, bool]:
    """(image channels, encoder label mode, decoder conditional), after refusing what the
    notebook's layers cannot take."""
    if cfg.conditioning not in SUPPORTED_CONDITIONINGS:
        raise ConfigError(f"model.conditioning={cfg.conditioning!r} is not valid with model.arch={arch!r}; "
                          f"choose one of: {', '.join(SUPPORTED_CONDITIONINGS)}")
    if tuple(image_shape[1:]) != IMAGE_SIZE:
        raise ConfigError(f"model.arch={arch!r} is built for 28x28 images, got "
                          f"{image_shape[1]}x{image_shape[2]}; choose model.arch=conv or mlp")
    return image_shape[0], encoder_label_mode(cfg.conditioning), cfg.conditioning != "none"


def _conv(in_ch: int, out_ch: int, kernel: int = 3, activation: str | None = "relu",
          stride: int = 1, padding: int | None = None) -> nn.Sequential:
    """A convolution with Keras "same" padding by default, then its activation."""
    padding = kernel // 2 if padding is None else padding
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding)]
    if activation:
        layers.append(make_activation(activation))
    return nn.Sequential(*layers)


def _conv_transpose_x2(in_ch: int, out_ch: int, activation: str) -> nn.Sequential:
    """3x3 stride-2 transposed convolution with Keras "same" padding: size -> 2 * size."""
    return nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1),
                         make_activation(activation))


def _two_dense_heads(features: int, latent_dim: int) -> nn.Linear:
    """The notebook's two Dense heads (mean, log-variance) as one layer; ``keras_parts`` tells
    Glorot initialisation (model.init=glorot_uniform) to treat the halves as two layers."""
    head = nn.Linear(features, 2 * latent_dim)
    head.keras_parts = 2
    return head


def build_conv_decoder_cond(cfg, image_shape, num_classes: int):
    """Preset ``conv-decoder-cond``: a conditional decoder and, in that notebook, an unconditioned
    encoder.

    Encoder: conv 3x3 16 -> max-pool 2 -> conv 3x3 32 -> max-pool 2 -> conv 7x7 32 -> conv 7x7 16
    -> conv 7x7 1 (all ReLU, same padding; 28 -> 14 -> 7) -> flatten 49 -> dense 16 -> dense 16
    -> mean, log-variance. The description gives no activation for the two dense 16 layers. They
    use ReLU like every other hidden layer of that notebook, which keeps them from collapsing into
    one linear map.
    Decoder: [z, one-hot] -> dense 49 (ReLU) -> 1x7x7 -> conv 32 -> upsample 2 -> conv 64 -> conv 64
    -> upsample 2 -> conv 32 -> conv 16 -> conv C (3x3, same padding, ReLU except the last).
    Nearest-neighbour upsampling is the Keras ``UpSampling2D`` default. 7 -> 14 -> 28 gives exactly
    28x28.
    """
    channels, label_mode, conditional = _check_supported("ref-conv-decoder-cond", cfg, image_shape)
    in_ch = channels + (num_classes if label_mode == "channel" else 0)
    encoder_body = nn.Sequential(
        _conv(in_ch, 16), nn.MaxPool2d(2),
        _conv(16, 32), nn.MaxPool2d(2),
        _conv(32, 32, 7), _conv(32, 16, 7), _conv(16, 1, 7),
        nn.Flatten(),
        nn.Linear(49, 16), nn.ReLU(),
        nn.Linear(16, 16), nn.ReLU(),
    )
    decoder_body = nn.Sequential(
        nn.Linear(cfg.latent_dim + (num_classes if conditional else 0), 49), nn.ReLU(),
        nn.Unflatten(1, (1, 7, 7)),
        _conv(1, 32), nn.Upsample(scale_factor=2, mode="nearest"),
        _conv(32, 64), _conv(64, 64), nn.Upsample(scale_factor=2, mode="nearest"),
        _conv(64, 32), _conv(32, 16),
        _conv(16, channels, activation=None),
    )
    return (ReferenceEncoder(encoder_body, _two_dense_heads(16, cfg.latent_dim), label_mode),
            ReferenceDecoder(decoder_body, conditional))


def build_conv_label_channel(cfg, image_shape, num_classes: int):
    """Preset ``conv-label-channel``: the label enters the encoder as 10 extra image planes.

    Encoder (3x3 convolutions, swish = SiLU): conv 16 stride 2 + batch norm + swish -> conv 16
    -> conv 32 stride 2 -> conv 32 -> conv 64 stride 2 -> conv 64 (28 -> 14 -> 7 -> 4) -> flatten
    1024 -> dense 64 swish -> mean, log-variance. Batch norm follows only the first convolution, as
    described. That convolution keeps its bias, as a Keras ``Conv2D`` does by default.
    Decoder: [z, one-hot] -> dense 1024 swish -> 64x4x4 -> conv 64 -> conv-transpose 32 stride 2
    (8) -> conv 32 -> conv-transpose 16 stride 2 (16) -> conv 16 valid (14) -> conv-transpose 16
    stride 2 (28) -> conv 16 + batch norm + swish -> conv C. Every layer is 3x3 with swish except
    the last. "Valid" means no padding. It is the only reading that lands on exactly 28x28: with
    "same" padding the sizes would go 16 -> 16 -> 32.
    """
    channels, label_mode, conditional = _check_supported("ref-conv-label-channel", cfg, image_shape)
    in_ch = channels + (num_classes if label_mode == "channel" else 0)
    swish = "silu"
    encoder_body = nn.Sequential(
        nn.Conv2d(in_ch, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), make_activation(swish),
        _conv(16, 16, activation=swish),
        _conv(16, 32, activation=swish, stride=2, padding=1), _conv(32, 32, activation=swish),
        _conv(32, 64, activation=swish, stride=2, padding=1), _conv(64, 64, activation=swish),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 64), make_activation(swish),
    )
    decoder_body = nn.Sequential(
        nn.Linear(cfg.latent_dim + (num_classes if conditional else 0), 1024), make_activation(swish),
        nn.Unflatten(1, (64, 4, 4)),
        _conv(64, 64, activation=swish),
        _conv_transpose_x2(64, 32, swish), _conv(32, 32, activation=swish),
        _conv_transpose_x2(32, 16, swish), _conv(16, 16, activation=swish, padding=0),
        _conv_transpose_x2(16, 16, swish),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), make_activation(swish),
        _conv(16, channels, activation=None),
    )
    return (ReferenceEncoder(encoder_body, _two_dense_heads(64, cfg.latent_dim), label_mode),
            ReferenceDecoder(decoder_body, conditional))


def build_conv_vae(cfg, image_shape, num_classes: int):
    """Preset ``conv-vae``: the TensorFlow "Convolutional Variational Autoencoder" tutorial.

    Encoder: conv 3x3 32 stride 2 ReLU -> conv 3x3 64 stride 2 ReLU -> flatten -> dense
    2 * latent_dim (mean, log-variance). The convolutions use Keras' default "valid" padding, as in
    the tutorial: 28 -> 13 -> 6, so the dense layer sees 64 * 6 * 6 = 2304 features.
    Decoder: dense 7*7*32 ReLU -> 32x7x7 -> conv-transpose 64 stride 2 ReLU (14) -> conv-transpose
    32 stride 2 ReLU (28) -> conv-transpose C stride 1 (logits), all 3x3 with "same" padding.
    """
    channels, label_mode, conditional = _check_supported("ref-conv-vae", cfg, image_shape)
    in_ch = channels + (num_classes if label_mode == "channel" else 0)
    encoder_body = nn.Sequential(
        _conv(in_ch, 32, stride=2, padding=0), _conv(32, 64, stride=2, padding=0), nn.Flatten(),
    )
    decoder_body = nn.Sequential(
        nn.Linear(cfg.latent_dim + (num_classes if conditional else 0), 7 * 7 * 32), nn.ReLU(),
        nn.Unflatten(1, (32, 7, 7)),
        _conv_transpose_x2(32, 64, "relu"), _conv_transpose_x2(64, 32, "relu"),
        nn.ConvTranspose2d(32, channels, 3, stride=1, padding=1),
    )
    return (ReferenceEncoder(encoder_body, nn.Linear(64 * 6 * 6, 2 * cfg.latent_dim), label_mode),
            ReferenceDecoder(decoder_body, conditional))


REFERENCE_ARCHITECTURES = {
    "ref-conv-decoder-cond": build_conv_decoder_cond,
    "ref-conv-label-channel": build_conv_label_channel,
    "ref-conv-vae": build_conv_vae,
}

for _name, _builder in REFERENCE_ARCHITECTURES.items():
    register_architecture(_name, _builder)
