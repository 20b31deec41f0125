"""Every check that can be made before a run exists, in one call for the entry points.

``preflight(config)`` resolves the device, checks that the data is there and large enough (IDX
headers only), and builds the model on PyTorch's ``meta`` device (shapes without memory) to
catch what the architecture cannot take and models whose parameters alone cannot fit on the
device. Each failure is one ``ConfigError`` line, before anything is recorded.
"""
from __future__ import annotations

import logging

import torch

from cvae.config import ConfigError
from pipelines.config import RunConfig
from pipelines.data import check_available, dataset_shape
from pipelines.training.devices import free_memory_bytes, resolve_device

log = logging.getLogger(__name__)

# Training holds each parameter four times: the weights, their gradients and Adam's two moments.
COPIES_IN_TRAINING = 4


def check_model(config: RunConfig, device: torch.device) -> int:
    """Build the model without memory; return its parameter count, or raise a one-line ConfigError."""
    import cvae

    image_shape, num_classes = dataset_shape(config.data)
    try:
        with torch.device("meta"):
            model = cvae.build(config.model, image_shape, num_classes)
    except ConfigError:
        raise
    except Exception as error:  # the architecture cannot take these settings (sizes, stages)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"model.arch={config.model.arch!r} is not valid with these settings for "
                          f"{config.data.dataset} images {tuple(image_shape)}: {reason}") from None
    parameters = sum(p.numel() for p in model.parameters())
    needed = parameters * COPIES_IN_TRAINING * torch.tensor([], dtype=torch.float32).element_size()
    available = free_memory_bytes(device)
    if available is not None and needed > available:
        m = config.model
        widths = (f"model.hidden={','.join(map(str, m.hidden))}" if m.arch == "mlp"
                  else f"model.channels={','.join(map(str, m.channels))}" if m.arch == "conv" else f"model.arch={m.arch}")
        raise ConfigError(
            f"model.latent_dim={m.latent_dim}, {widths} is not valid; the model would have {parameters:,} "
            f"parameters, {needed / 2**30:.1f} GiB with their gradients and Adam's moments, more than the "
            f"{available / 2**30:.1f} GiB free on {device}: choose a smaller model")
    return parameters


def check_fits(field: str, value, needed_bytes: int, what: str, device: torch.device, remedy: str) -> None:
    """Refuse in one line a request whose memory (``needed_bytes``, an estimate) exceeds what the
    device has free, instead of an out-of-memory traceback (or swapping until killed) later."""
    free = free_memory_bytes(device)
    if free is not None and needed_bytes > free:
        raise ConfigError(f"{field}={value!r} is not valid; {what} need about {needed_bytes / 2**30:,.1f} GiB, "
                          f"more than the {free / 2**30:.1f} GiB free on {device}: {remedy}")


def preflight(config: RunConfig) -> torch.device:
    """All checks before a run exists; returns the device the run will use."""
    device = resolve_device(config.execution)
    if config.execution.precision != "fp32" and device.type == "cpu":  # autocast is for accelerators here
        log.warning(f"execution.precision={config.execution.precision} does nothing on the cpu: training in fp32")
    check_available(config.data)
    check_model(config, device)
    return device

