"""How a run executes: threads, seeds, determinism, mixed precision (the device: ``devices``)."""
from __future__ import annotations

import contextlib
import functools
import os
import random

import numpy as np
import torch

from pipelines.config import ExecutionConfig

# The evaluate and generate entry points import resolve_device from here; it lives in devices.
from pipelines.training.devices import resolve_device  # noqa: F401

CUBLAS_WORKSPACE = ":4096:8"  # required by cuBLAS for deterministic results (CUDA >= 10.2)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's <malloc.h>
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit systems
_TRIM_THRESHOLD = 2**30


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to 32 MB in the heap, and not to hand the heap back.

    PyTorch's CPU tensors come from malloc. By default glibc maps big blocks afresh and returns
    them on free, so every batch of activations costs page faults while the kernel zeroes the
    pages again: a short conv run spent a fifth of its time in the kernel. Once per process; a
    no-op (False) off glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def configure_threads(config: ExecutionConfig) -> int:
    """Give torch the configured number of CPU threads (0 leaves torch's default); return it.

    Several workers on one machine each take their share: with every worker on all cores, the
    threads oversubscribe the CPU and every worker slows down several times over.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    return torch.get_num_threads()


def is_deterministic(config: ExecutionConfig, device: torch.device) -> bool:
    if config.deterministic == "auto":
        return device.type == "cpu"
    return config.deterministic == "true"


def seed_everything(seed: int) -> dict[str, int]:
    """Seed Python, NumPy and torch (CPU and every CUDA device); return what was seeded."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return {"python": seed, "numpy": seed % 2**32, "torch": seed, "cuda": seed}


def configure_determinism(deterministic: bool) -> dict[str, object]:
    """Switch torch's deterministic algorithms on or off for this process; return the settings in force.

    On CUDA this costs speed (no cuDNN autotuning, deterministic kernels only), so it is a switch
    there and the default only on the CPU.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    return {
        "deterministic": deterministic,
        "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""),
    }


def autocast(config: ExecutionConfig, device: torch.device):
    """Mixed precision when asked for, on an accelerator whose autocast torch supports (CUDA, XPU,
    MPS); a no-op on the CPU, which stays fp32 (its bf16 kernels are no faster here)."""
    if config.precision == "fp32" or not _mixed_precision_device(device):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _mixed_precision_device(device: torch.device) -> bool:
    return device.type != "cpu" and torch.amp.is_autocast_available(device.type)


def grad_scaler(config: ExecutionConfig, device: torch.device):
    """fp16's gradient scaler (its range ends at 65504), of the device's own kind; None otherwise."""
    if config.precision == "fp16" and _mixed_precision_device(device):
        return torch.amp.GradScaler(device.type)
    return None
