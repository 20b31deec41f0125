"""Why training diverged, in one line: the likely cause among the settings, and what to change.

A NaN or infinite loss is almost always one of three things: a learning rate too high for the
optimizer, a KL weight so large that the KL term dominates and blows up, or fp16's narrow range
overflowing. The message names the setting most likely at fault (from the values and from which
term went non-finite) so the user knows what to try first, instead of reading a traceback.
"""
from __future__ import annotations

import math
from typing import Mapping

from pipelines.config import RunConfig

# Learning rates above these are unusual enough to be the first suspect for each optimizer.
HIGH_LR = {"adam": 1e-2, "adamw": 1e-2, "sgd": 1.0}
HIGH_KL_WEIGHT = 10.0


def _format_terms(terms: Mapping[str, float]) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in terms.items())


def likely_cause(config: RunConfig, terms: Mapping[str, float]) -> str:
    """The setting to change first, and how; ``terms`` are the loss terms that went non-finite."""
    optim, objective = config.optim, config.objective
    kl_broke = not math.isfinite(terms.get("kl", 0.0)) and math.isfinite(terms.get("recon", 0.0))
    if config.execution.precision == "fp16":
        return ("likely cause: execution.precision=fp16 overflowed (its range ends at 65504); "
                "use --precision bf16 or fp32")
    if optim.lr > HIGH_LR[optim.optimizer]:
        return (f"likely cause: optim.lr={optim.lr:g} is too high for {optim.optimizer}; "
                f"lower --lr (e.g. 1e-3) or set --grad-clip 1")
    if objective.kl_weight > HIGH_KL_WEIGHT or (kl_broke and objective.kl_weight > 1.0):
        return (f"likely cause: objective.kl_weight={objective.kl_weight:g} makes the KL term dominate; "
                f"lower --kl-weight or warm it up with --warmup-epochs")
    return (f"likely cause: the step size (optim.lr={optim.lr:g}, optim.grad_clip={optim.grad_clip:g}); "
            f"lower --lr or set --grad-clip 1")


def divergence_message(config: RunConfig, phase: str, epoch: int, terms: Mapping[str, float]) -> str:
    """One line: where the loss went non-finite, its terms, the likely cause and the remedy."""
    return (f"training diverged: the {phase} loss became non-finite in epoch {epoch} "
            f"({_format_terms(terms)}); {likely_cause(config, terms)}")
