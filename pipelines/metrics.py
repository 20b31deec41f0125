"""What the harness's numbers are called and what they are: metric keys, study objectives, and the
headline metrics a run's page shows. Names and units are defined here only.

Losses are nats per example. What a negative ELBO or an IWAE value bounds depends on the run's
likelihood kind (``cvae.likelihood``, recorded as the run tag ``likelihood_kind``): only the exact
kinds bound −log p(x) of the data; Bernoulli on non-binary pixels (grey or colour levels) gives a
cross-entropy, a Gaussian a density. So the names say "neg_elbo" and "bound", and the labels say what is bounded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from cvae.likelihood import CONTINUOUS_DENSITY, CROSS_ENTROPY, is_exact, likelihood_kind
from pipelines.config import RunConfig

NATS = "nats per example"
LIKELIHOOD_KIND_TAG = "likelihood_kind"
BITS_PER_DIM_SUFFIX = "_bits_per_dim"
# The test-set IWAE: an NLL bound where the likelihood is exact, a bound of another quantity otherwise.
IWAE_NLL = "test/iwae_nll_k"
IWAE_BOUND = "test/iwae_bound_k"
_IWAE_KEY = re.compile(rf"^(?:{re.escape(IWAE_NLL)}|{re.escape(IWAE_BOUND)})(\d+)$")


def run_likelihood_kind(config: RunConfig) -> str:
    return likelihood_kind(config.model.likelihood, config.data.binarize)


def iwae_metric(kind: str, k: int) -> str:
    """``test/iwae_nll_k{K}`` where the likelihood is exact, ``test/iwae_bound_k{K}`` otherwise."""
    return f"{IWAE_NLL}{k}" if is_exact(kind) else f"{IWAE_BOUND}{k}"


def what_is_bounded(kind: str | None) -> str:
    """What a negative ELBO or IWAE value is an upper bound of, under the likelihood ``kind``."""
    if kind and is_exact(kind):
        return "upper bound on −log p(x)"
    if kind == CROSS_ENTROPY:
        return "bound on a Bernoulli cross-entropy of non-binary pixels, not −log p(x)"
    if kind == CONTINUOUS_DENSITY:
        return "bound on −log density, not a probability"
    return "upper bound; see the run's likelihood_kind"


# --- study objectives ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Objective:
    """What a study minimises: a per-epoch validation metric (or the parameter count)."""
    name: str
    metric: str | None  # the per-epoch metric it is read from; None: not a per-epoch quantity
    what: str

    def describe(self, kind: str | None) -> str:
        """What a value of this objective is, with its unit, for a study of likelihood ``kind``."""
        if self.metric is None:
            return self.what
        if self.name == "neg_elbo":
            return f"{self.what}; {what_is_bounded(kind)}; {NATS}"
        return f"{self.what}; {NATS}"


# Values are comparable across trials only under one likelihood and one conditioning (the
# `architectures` space makes both the study's).
OBJECTIVES = {objective.name: objective for objective in (
    Objective("neg_elbo", "val/neg_elbo", "validation negative ELBO (recon + KL at β = 1, comparable across β)"),
    Objective("loss", "val/loss", "validation training objective (recon + β·KL at the trial's own β)"),
    Objective("recon", "val/recon", "validation reconstruction term"),
    Objective("kl", "val/kl", "validation KL term"),
    Objective("params", None, "number of model parameters"),
)}
DEFAULT_OBJECTIVE = "neg_elbo"
# Earlier names, accepted on the command line and in the objectives a study recorded, so that
# studies made under them resume. `nll` claimed a likelihood that most kinds do not have.
OBJECTIVE_ALIASES = {"nll": "neg_elbo"}


def objective_name(name: str) -> str:
    """The current name of an objective given by its current or an earlier name."""
    return OBJECTIVE_ALIASES.get(name, name)


# --- what a run's page shows first ------------------------------------------------------------------

def headline_metrics(kind: str | None, logged: Iterable[str]) -> dict[str, str]:
    """Metric key -> label with its unit, for the headline metrics among ``logged``, in display order."""
    logged = set(logged)
    bounded = what_is_bounded(kind)
    labels = {"test/neg_elbo": f"test negative ELBO ({bounded}, {NATS})"}
    for key in sorted(logged, key=lambda k: int(m.group(1)) if (m := _IWAE_KEY.match(k)) else 0):
        match = _IWAE_KEY.match(key)
        if match:
            labels[key] = f"test IWAE, k={match.group(1)} ({bounded}, {NATS})"
    labels.update({
        "test/recon": f"test reconstruction ({NATS})",
        "test/kl": f"test KL ({NATS})",
        "test/active_units": "test active latent units (of the latent size)",
        "test/sample_accuracy": "classifier-judged accuracy of samples for the requested label (fraction)",
        "best_val_loss": f"best validation loss ({NATS})",
        "val/neg_elbo": f"validation negative ELBO of the kept weights ({bounded}, {NATS})",
    })
    return {key: label for key, label in labels.items() if key in logged}
