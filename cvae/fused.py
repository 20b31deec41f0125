"""Fused training: K models of one structure trained at once, as one stacked model.

Horizontal fusion (HFTA, MLSys 2021) with PyTorch's own pieces: ``torch.func.stack_module_state``
stacks the K models' parameters and buffers along a new first dimension, and ``functional_call``
under ``vmap`` runs every layer once for all K (a batched matmul or a grouped convolution instead
of K small kernels). Only what decides tensor shapes is shared; each member keeps its own weights,
data (images, labels and the noise behind z arrive stacked, (K, N, ...)), β and free bits (tensors
(K,)) and optimizer state and learning rate (``StackedOptimizer``).

Members never interact: the loss summed over members has, for each member's parameters, exactly
that member's gradient, the optimizer updates each member with its own numbers, and gradient
clipping is per member. So a fused member trains as it would alone, up to float rounding (batched
kernels may add in another order). Pure PyTorch: no tracking, no files.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from cvae.config import KL_ESTIMATORS, ModelConfig
from cvae.model import CVAE
from cvae.objective import gaussian_kl, monte_carlo_kl

FUSABLE_ARCHS = ("mlp", "conv")
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


def fusion_refusal(config: ModelConfig) -> str | None:
    """Why a model of ``config`` cannot train fused, in one line; None when it can."""
    if config.arch not in FUSABLE_ARCHS:
        return f"model.arch={config.arch!r} does not fuse (only {' and '.join(FUSABLE_ARCHS)} do)"
    if config.arch == "conv" and config.batch_norm:
        return "model.batch_norm=true does not fuse (BatchNorm updates its running statistics in place)"
    if config.activity_l2 > 0:
        return (f"model.activity_l2={config.activity_l2!r} does not fuse (its gradient is a custom autograd "
                "function that vmap cannot batch)")
    return None


class _Terms(nn.Module):
    """One member's per-example loss terms: what ``vmap`` batches over the K members."""

    def __init__(self, model: CVAE):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None, noise: torch.Tensor, sampled: bool):
        out = self.model.forward_checked(x, labels, noise=noise)
        recon = self.model.reconstruction_nll(out.decoded.float(), x)  # (N,)
        kl = gaussian_kl(out.mu, out.logvar)  # (N, D), float32
        sampled_kl = monte_carlo_kl(out.z, out.mu, out.logvar) if sampled else torch.zeros_like(recon)
        return recon, kl, sampled_kl


class FusedCVAE:
    """K ``CVAE``s of one structure as stacked tensors; ``member(k)`` gives member k back as a plain ``CVAE``."""

    def __init__(self, models: Sequence[CVAE]):
        if not models:
            raise ValueError("a fused group needs at least one model")
        refusal = fusion_refusal(models[0].config)
        if refusal:
            raise ValueError(refusal)
        shapes = {tuple((name, tuple(p.shape)) for name, p in m.state_dict().items()) for m in models}
        if len(shapes) != 1:
            raise ValueError("fused models must have the same structure (the same tensors, of the same shapes)")
        self.template = copy.deepcopy(models[0])  # member(k) loads into copies of it
        terms = [_Terms(m) for m in models]
        self.params, self.buffers = stack_module_state(terms)
        self.base = copy.deepcopy(terms[0]).to("meta")

    @property
    def size(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def train(self, mode: bool = True) -> FusedCVAE:
        self.base.train(mode)
        return self

    def _member_terms(self, params, buffers, x, labels, noise, sampled: bool):
        return functional_call(self.base, (params, buffers), (x, labels, noise, sampled))

    def terms(self, x: torch.Tensor, labels: torch.Tensor | None, noise: torch.Tensor, sampled: bool,
              shared_inputs: bool = False):
        """Per-example terms of every member: reconstruction NLL (K, N), closed-form KL (K, N, D) and
        the single-sample KL (K, N; zeros unless ``sampled``). Inputs are stacked (K, N, ...), or,
        with ``shared_inputs``, one (N, ...) set every member sees (evaluation)."""
        data_dim = None if shared_inputs else 0
        batched = vmap(self._member_terms, in_dims=(0, 0, data_dim, None if labels is None else data_dim, data_dim,
                                                     None))
        return batched(self.params, self.buffers, x, labels, noise, sampled)

    def member(self, index: int) -> CVAE:
        """Member ``index`` as an ordinary ``CVAE``, on the stacked tensors' device, with its own weights."""
        model = copy.deepcopy(self.template)
        model.load_state_dict(self.member_state(index))
        return model

    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        """Member ``index``'s state dict, a copy (a view would keep every member's storage alive)."""
        return {name.removeprefix("model."): tensor[index].detach().clone()
                for name, tensor in {**self.params, **self.buffers}.items()}

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the members at ``index`` (in that order): the others leave, their memory is freed."""
        self.params = {name: p.detach()[index].clone().requires_grad_(True) for name, p in self.params.items()}
        self.buffers = {name: b[index].clone() for name, b in self.buffers.items()}


def stacked_losses(recon: torch.Tensor, kl: torch.Tensor, sampled_kl: torch.Tensor, kl_weight: torch.Tensor,
                   free_bits: torch.Tensor, kl_estimator: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cvae.negative_elbo`` of every member from ``FusedCVAE.terms``: (loss, recon, kl), each (K,), nats
    per example over the batch. ``kl_weight`` and ``free_bits`` are (K,); free bits apply to members with
    ``free_bits > 0`` (not to the Monte Carlo estimate, as alone)."""
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={kl_estimator!r} is not valid; choose one of: {', '.join(KL_ESTIMATORS)}")
    recon_mean = recon.float().mean(dim=1)
    kl_per_dim = kl.mean(dim=1)  # (K, D)
    kl_total = kl_per_dim.sum(dim=1)
    if kl_estimator == "monte_carlo":
        kl_used = sampled_kl.mean(dim=1)
    else:
        clamped = torch.clamp(kl_per_dim, min=free_bits[:, None]).sum(dim=1)
        kl_used = torch.where(free_bits > 0, clamped, kl_total)
    return recon_mean + kl_weight * kl_used, recon_mean, kl_total


def clip_grad_norm_per_member(params: Sequence[torch.Tensor], max_norm: torch.Tensor) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for each member on its own: the norm over member k's gradients
    (slice k of every stacked gradient), scaled down to ``max_norm[k]`` where it is larger; members with
    ``max_norm <= 0`` are not clipped. Returns the norms before clipping, (K,)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(g.shape[0], -1), 2, dim=1) for g in grads])  # (P, K)
    total = torch.linalg.vector_norm(norms, 2, dim=0)  # (K,)
    coefficient = torch.clamp(max_norm / (total + CLIP_EPS), max=1.0)
    coefficient = torch.where(max_norm > 0, coefficient, torch.ones_like(coefficient))
    for g in grads:
        g.mul_(coefficient.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))
    return total


def _per_member(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(K,) -> (K, 1, ..., 1) to broadcast over a stacked tensor."""
    return values.view(-1, *[1] * (like.dim() - 1))


class StackedOptimizer:
    """Adam, AdamW or SGD (momentum 0.9, as ``pipelines`` builds it) over stacked parameters, with a
    learning rate and weight decay per member. For each member, the same elementwise operations as
    ``torch.optim``'s single-tensor implementation on that member alone (default betas and eps), so
    equal gradients give equal updates; ``lr`` and ``weight_decay`` are (K,) float64 tensors. Where torch
    adds a scaled tensor (``add(x, alpha=s)``, one fused multiply-add on the CPU), this uses ``addcmul``
    with a per-member scale, which rounds the same way: ``a + s * b`` would not."""

    BETAS = (0.9, 0.999)
    EPS = 1e-8
    MOMENTUM = 0.9
    KINDS = ("adam", "adamw", "sgd")

    def __init__(self, params: Sequence[torch.Tensor], kind: str, lr: torch.Tensor, weight_decay: torch.Tensor):
        if kind not in self.KINDS:
            raise ValueError(f"optimizer {kind!r} does not fuse; choose one of: {', '.join(self.KINDS)}")
        self.params, self.kind = list(params), kind
        self.lr, self.weight_decay = lr.double(), weight_decay.double()
        self.steps = 0
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def keep(self, index: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        """Keep the members at ``index``; ``params``: the stacked parameters that now hold them."""
        self.params = list(params)
        self.lr, self.weight_decay = self.lr[index.cpu()], self.weight_decay[index.cpu()]
        self.state = [{name: value[index] for name, value in state.items()} for state in self.state]

    def _scalar(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-member numbers computed in float64 (as torch.optim computes its Python floats), then
        rounded to the parameters' dtype, as torch rounds a Python scalar."""
        return _per_member(values.to(like.device, like.dtype), like)

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        if self.kind == "sgd":
            self._sgd()
        else:
            self._adam()

    def _adam(self) -> None:
        beta1, beta2 = self.BETAS
        bias_correction1 = 1 - beta1 ** self.steps
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** self.steps)
        decoupled = self.kind == "adamw"
        step_size = -(self.lr / bias_correction1)
        for param, state in zip(self.params, self.state):
            grad = param.grad
            if grad is None:
                continue
            if not state:
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if decoupled:
                param.mul_(self._scalar(1 - self.lr * self.weight_decay, param))
            elif bool((self.weight_decay != 0).any()):
                grad = torch.addcmul(grad, self._scalar(self.weight_decay, param), param)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.EPS)
            # torch's addcdiv_ computes param + (value * exp_avg) / denom, in that order.
            param.add_(self._scalar(step_size, param) * exp_avg / denom)

    def _sgd(self) -> None:
        for param, state in zip(self.params, self.state):
            grad = param.grad
            if grad is None:
                continue
            if bool((self.weight_decay != 0).any()):
                grad = torch.addcmul(grad, self._scalar(self.weight_decay, param), param)
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = grad.detach().clone()
            else:
                buffer.mul_(self.MOMENTUM).add_(grad)
            param.addcmul_(self._scalar(-self.lr, param), buffer)
