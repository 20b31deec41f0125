"""Fully connected encoder and decoder, plus the small helpers other families reuse."""
from __future__ import annotations

import math

import torch
from torch import nn

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "tanh": nn.Tanh,
}


def make_activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


def append_label_channels(x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) + (N, K) -> (N, C + K, H, W): each class is a constant plane."""
    n, _, h, w = x.shape
    planes = onehot.to(x.dtype)[:, :, None, None].expand(n, onehot.shape[1], h, w)
    return torch.cat([x, planes], dim=1)


def encoder_label_mode(conditioning: str) -> str | None:
    """How the encoder sees the label: 'concat', 'channel', or None (not at all)."""
    return conditioning if conditioning in ("concat", "channel") else None


class _ActivityL2Gradient(torch.autograd.Function):
    """Identity forward; backward adds the gradient of ``c * mean_n sum_j h_nj^2``.

    That is Keras' ``activity_regularizer=l2(c)`` (whose loss Keras divides by the batch size) as
    far as training is concerned, without adding a non-likelihood term to the logged nats.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, coefficient: float) -> torch.Tensor:
        ctx.save_for_backward(h)
        ctx.coefficient = coefficient
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (h,) = ctx.saved_tensors
        return grad + (2.0 * ctx.coefficient / h.shape[0]) * h, None


def add_activity_l2_gradient(h: torch.Tensor, coefficient: float) -> torch.Tensor:
    return _ActivityL2Gradient.apply(h, coefficient)


def mlp_stack(widths: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(w_in, w_out), make_activation(activation)]
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    def __init__(self, image_shape, num_classes: int, hidden, latent_dim: int, activation: str,
                 label_mode: str | None):
        super().__init__()
        c, h, w = image_shape
        self.label_mode = label_mode
        if label_mode == "channel":
            in_features = (c + num_classes) * h * w
        elif label_mode == "concat":
            in_features = c * h * w + num_classes
        else:
            in_features = c * h * w
        self.body = mlp_stack([in_features, *hidden], activation)
        self.mu = nn.Linear(hidden[-1], latent_dim)
        self.logvar = nn.Linear(hidden[-1], latent_dim)
        self.activity_l2 = 0.0  # set by CVAE from model.activity_l2: on the first hidden layer

    def forward(self, x: torch.Tensor, onehot: torch.Tensor | None):
        if self.label_mode == "channel":
            x = append_label_channels(x, onehot)
        h = x.flatten(1)
        if self.label_mode == "concat":
            h = torch.cat([h, onehot.to(h.dtype)], dim=1)
        h = self.body[:2](h)  # the first hidden layer, after its activation
        if self.activity_l2 and self.training and torch.is_grad_enabled():
            h = add_activity_l2_gradient(h, self.activity_l2)
        h = self.body[2:](h)
        return self.mu(h), self.logvar(h)


class MLPDecoder(nn.Module):
    def __init__(self, image_shape, num_classes: int, hidden, latent_dim: int, activation: str,
                 conditional: bool):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.conditional = conditional
        widths = [latent_dim + (num_classes if conditional else 0), *reversed(hidden)]
        self.body = mlp_stack(widths, activation)
        self.out = nn.Linear(widths[-1], math.prod(self.image_shape))

    def forward(self, z: torch.Tensor, onehot: torch.Tensor | None):
        if self.conditional:
            z = torch.cat([z, onehot.to(z.dtype)], dim=1)
        return self.out(self.body(z)).view(-1, *self.image_shape)


def build_mlp(cfg, image_shape, num_classes: int):
    hidden = list(cfg.hidden)
    encoder = MLPEncoder(image_shape, num_classes, hidden, cfg.latent_dim, cfg.activation,
                         encoder_label_mode(cfg.conditioning))
    decoder = MLPDecoder(image_shape, num_classes, hidden, cfg.latent_dim, cfg.activation,
                         cfg.conditioning != "none")
    return encoder, decoder
