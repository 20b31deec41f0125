"""Conditional VAE core: pure PyTorch, no tracking, no files."""
import cvae.reference  # noqa: F401  (registers the reference notebooks' architectures)
from cvae.config import ConfigError, ModelConfig, ObjectiveConfig
from cvae.model import CVAE, CVAEOutput, build
from cvae.objective import LossTerms, gaussian_kl, kl_weight_at, loss_from_means, monte_carlo_kl, negative_elbo
from cvae.registry import architecture_names, build_networks, register_architecture

__all__ = [
    "build", "CVAE", "CVAEOutput", "ModelConfig", "ObjectiveConfig", "ConfigError",
    "negative_elbo", "loss_from_means", "kl_weight_at", "gaussian_kl", "monte_carlo_kl", "LossTerms",
    "architecture_names", "register_architecture", "build_networks",
]
