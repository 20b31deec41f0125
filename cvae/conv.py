"""Convolutional encoder and decoder whose output size equals the input size exactly.

Each encoder stage halves the spatial size with a 3x3 stride-2 convolution (size -> ceil(size/2)).
The encoder records every intermediate size, and the decoder retraces them in reverse, so any
H x W >= 1 and any number of stages round-trip without cropping or padding. With three stages,
20x24 goes 20x24 -> 10x12 -> 5x6 -> 3x3 and the decoder comes back 3x3 -> 5x6 -> 10x12 -> 20x24
(transposed convolutions with output_padding 0 where the size was odd, 1 where it was even; or
nearest upsampling to the recorded size); 64x64 halves evenly, 64 -> 32 -> 16 -> 8 and back.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from cvae.mlp import append_label_channels, encoder_label_mode, make_activation


def stage_sizes(height: int, width: int, stages: int) -> list[tuple[int, int]]:
    """Spatial sizes at the input and after each stride-2 stage (k=3, p=1): s -> (s - 1) // 2 + 1."""
    sizes = [(height, width)]
    for _ in range(stages):
        h, w = sizes[-1]
        sizes.append(((h - 1) // 2 + 1, (w - 1) // 2 + 1))
    return sizes


def _block(conv: nn.Module, channels: int, batch_norm: bool, activation: str) -> nn.Sequential:
    layers = [conv]
    if batch_norm:
        layers.append(nn.BatchNorm2d(channels))
    layers.append(make_activation(activation))
    return nn.Sequential(*layers)


class ConvEncoder(nn.Module):
    def __init__(self, image_shape, num_classes: int, channels, latent_dim: int, activation: str,
                 batch_norm: bool, label_mode: str | None):
        super().__init__()
        c, h, w = image_shape
        self.label_mode = label_mode
        in_ch = c + (num_classes if label_mode == "channel" else 0)
        stages = []
        for out_ch in channels:
            conv = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=not batch_norm)
            stages.append(_block(conv, out_ch, batch_norm, activation))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        last_h, last_w = stage_sizes(h, w, len(channels))[-1]
        features = channels[-1] * last_h * last_w + (num_classes if label_mode == "concat" else 0)
        self.mu = nn.Linear(features, latent_dim)
        self.logvar = nn.Linear(features, latent_dim)

    def forward(self, x: torch.Tensor, onehot: torch.Tensor | None):
        if self.label_mode == "channel":
            x = append_label_channels(x, onehot)
        h = self.stages(x).flatten(1)
        if self.label_mode == "concat":
            h = torch.cat([h, onehot.to(h.dtype)], dim=1)
        return self.mu(h), self.logvar(h)


class ConvDecoder(nn.Module):
    def __init__(self, image_shape, num_classes: int, channels, latent_dim: int, activation: str,
                 batch_norm: bool, conditional: bool, mode: str):
        super().__init__()
        c, h, w = image_shape
        self.conditional = conditional
        sizes = stage_sizes(h, w, len(channels))
        self.start_shape = (channels[-1], *sizes[-1])
        self.project = nn.Sequential(
            nn.Linear(latent_dim + (num_classes if conditional else 0), math.prod(self.start_shape)),
            make_activation(activation),
        )
        # Stage i maps channels[i] at sizes[i + 1] back to channels[i - 1] (or channels[0]) at sizes[i].
        stages = []
        for i in reversed(range(len(channels))):
            in_ch, out_ch = channels[i], channels[max(i - 1, 0)]
            (in_h, in_w), (out_h, out_w) = sizes[i + 1], sizes[i]
            if mode == "transpose":
                # ConvTranspose2d(k=3, s=2, p=1) gives 2*in - 1 + output_padding; pick the padding
                # (0 or 1) that lands exactly on the encoder's recorded size.
                pad = (out_h - (2 * in_h - 1), out_w - (2 * in_w - 1))
                layer = nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=pad,
                                           bias=not batch_norm)
            else:
                layer = nn.Sequential(nn.Upsample(size=(out_h, out_w), mode="nearest"),
                                      nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not batch_norm))
            stages.append(_block(layer, out_ch, batch_norm, activation))
        self.stages = nn.Sequential(*stages)
        self.out = nn.Conv2d(channels[0], c, 3, padding=1)

    def forward(self, z: torch.Tensor, onehot: torch.Tensor | None):
        if self.conditional:
            z = torch.cat([z, onehot.to(z.dtype)], dim=1)
        h = self.project(z).view(-1, *self.start_shape)
        return self.out(self.stages(h))


def build_conv(cfg, image_shape, num_classes: int):
    channels = list(cfg.channels)
    encoder = ConvEncoder(image_shape, num_classes, channels, cfg.latent_dim, cfg.activation,
                          cfg.batch_norm, encoder_label_mode(cfg.conditioning))
    decoder = ConvDecoder(image_shape, num_classes, channels, cfg.latent_dim, cfg.activation,
                          cfg.batch_norm, cfg.conditioning != "none", cfg.conv_decoder)
    return encoder, decoder
