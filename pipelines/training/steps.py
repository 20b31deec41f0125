"""The training step and the evaluation step: what every batch goes through, compiled or not.

``train`` runs the loop (batches, epochs, early stopping); these are the two functions inside it,
written once and run either eagerly or through ``torch.compile`` (``execution.compile``):

- the training loss: forward pass under autocast, then the negative ELBO (compiled, with its
  backward through AOTAutograd); the backward call, gradient clipping and the optimizer step
  stay eager around it;
- the evaluation sums: a batch's summed reconstruction NLL, per-dimension KL and sampled KL.

Compiled steps draw the same random numbers as eager ones (inductor's ``fallback_random``), so
compiling changes speed and float rounding, never the draws. A compile failure (no C compiler,
an operator inductor cannot lower) logs one warning and the run goes on eagerly, both steps,
from the batch that failed.
"""
from __future__ import annotations

import logging
from typing import Callable, TypeVar

import torch

from cvae import CVAE, gaussian_kl, monte_carlo_kl, negative_elbo
from pipelines.config import ExecutionConfig, RunConfig
from pipelines.training.execution import autocast

log = logging.getLogger(__name__)
T = TypeVar("T")

# Device types where compile=auto compiles: none. On the CPU it was measured not to pay for a
# 20-epoch run of the default MLP (benchmarks/compile_cost.py, benchmarks/RESULTS.md). On CUDA it
# is unmeasured (no GPU has run it yet); a 20-epoch run of these models there (about 10 s at the
# issue's 0.5 s per 60k epoch) is shorter than a cold compile, so auto stays eager until
# benchmarks/compile_cost.py on a GPU says otherwise.
AUTO_COMPILE_DEVICE_TYPES: frozenset[str] = frozenset()
# A graph per batch shape (the full batch and the last one): static shapes, the fastest kernels.
COMPILE_OPTIONS = {"dynamic": False, "options": {"fallback_random": True}}


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What a failed compilation raises: Dynamo's errors (a backend failure, an unsupported
    construct) and inductor's own (C++ compiler missing or failing, an operator it cannot lower),
    which a lazily compiled backward raises unwrapped."""
    import torch._dynamo.exc as dynamo_errors

    errors: list[type[BaseException]] = [dynamo_errors.TorchDynamoException]
    try:
        import torch._inductor.exc as inductor_errors
    except ImportError:
        return tuple(errors)
    for name in ("OperatorIssue", "InvalidCxxCompiler", "CppCompileError", "CppWrapperCodegenError"):
        if isinstance(getattr(inductor_errors, name, None), type):
            errors.append(getattr(inductor_errors, name))
    return tuple(errors)


def should_compile(config: ExecutionConfig, device: torch.device) -> bool:
    if config.compile == "auto":
        return device.type in AUTO_COMPILE_DEVICE_TYPES
    return config.compile == "true"


class Steps:
    """The training loss and the evaluation sums of one model, eager or compiled."""

    def __init__(self, model: CVAE, config: RunConfig, device: torch.device, compiled: bool = False):
        self.model, self.config, self.device = model, config, device
        self.fallback_error: str | None = None  # why compiled steps fell back to eager, if they did
        self._train_loss, self._eval_sums = self.eager_train_loss, self.eager_eval_sums
        self.compiled = compiled  # True until a compile failure sends both steps back to eager
        if compiled:
            torch.compiler.reset()  # one model per process at a time: the last run's graphs are of no use
            self._train_loss = torch.compile(self.eager_train_loss, **COMPILE_OPTIONS)
            self._eval_sums = torch.compile(self.eager_eval_sums, **COMPILE_OPTIONS)

    def eager_train_loss(self, x: torch.Tensor, y: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to minimise, its terms loss/recon/kl detached), nats per example over the batch."""
        objective = self.config.objective
        with autocast(self.config.execution, self.device):
            out = self.model(x, y)
        terms = negative_elbo(self.model.reconstruction_nll(out.decoded.float(), x), out.mu.float(),
                              out.logvar.float(), out.z.float(), beta, objective.free_bits, objective.kl_estimator)
        return terms.loss, torch.stack([terms.loss, terms.recon, terms.kl]).detach()

    def eager_eval_sums(self, x: torch.Tensor, y: torch.Tensor,
                        noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Over the batch, in float64: summed reconstruction NLL, per-dimension closed-form KL summed
        over examples (D,), and summed single-sample KL (0 unless the objective samples it)."""
        with autocast(self.config.execution, self.device):
            out = self.model(x, y, noise=noise)
        recon = self.model.reconstruction_nll(out.decoded.float(), x).double().sum()
        kl_per_dim = gaussian_kl(out.mu, out.logvar).double().sum(dim=0)
        sampled = (monte_carlo_kl(out.z, out.mu, out.logvar).double().sum()
                   if self.config.objective.kl_estimator == "monte_carlo" else torch.zeros_like(recon))
        return recon, kl_per_dim, sampled

    def _guarded(self, body: Callable[[], T]) -> T:
        """``body()``; after a compile failure, once: warn, go eager for good, and run it again."""
        try:
            return body()
        except _compile_errors() as error:
            if not self.compiled:
                raise
            self.fallback_error = _one_line(error)
            log.warning(f"torch.compile failed ({self.fallback_error}); training on eagerly")
            self._train_loss, self._eval_sums = self.eager_train_loss, self.eager_eval_sums
            self.compiled = False
            return body()

    def train_step(self, optimizer: torch.optim.Optimizer, scaler, x: torch.Tensor, y: torch.Tensor,
                   beta: float) -> torch.Tensor:
        """One optimisation step on a batch; returns its (loss, recon, kl), detached, on the device."""
        def forward_backward() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss, terms = self._train_loss(x, y, beta)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            return terms

        terms = self._guarded(forward_backward)
        if self.config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return terms

    def eval_sums(self, x: torch.Tensor, y: torch.Tensor,
                  noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._guarded(lambda: self._eval_sums(x, y, noise))


def _one_line(error: BaseException) -> str:
    """``Type: message`` of what made compilation fail, on one line: Dynamo wraps the backend's own
    error (e.g. no C++ compiler) in ``BackendCompilerFailed``, whose first line names only the backend."""
    cause = getattr(error, "inner_exception", None) or error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = " ".join(lines[:1])
    if cause is not None and str(cause).strip():
        reason = f"{reason} {type(cause).__name__}: {str(cause).strip().splitlines()[0]}".strip()
    return f"{type(error).__name__}: {reason or type(error).__name__}"[:500]
