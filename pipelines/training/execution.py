"""Where and how a run executes: device, seeds, determinism, mixed precision."""
from __future__ import annotations

import contextlib
import functools
import os
import random

import numpy as np
import torch

from cvae.config import ConfigError
from pipelines.config import ExecutionConfig

CUBLAS_WORKSPACE = ":4096:8"  # required by cuBLAS for deterministic results (CUDA >= 10.2)


def resolve_device(config: ExecutionConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(config.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"execution.device={config.device!r} is not valid; CUDA is not available "
                              "here; choose one of auto, cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"execution.device={config.device!r} is not valid; this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


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
    """Mixed precision on CUDA when asked for; a no-op elsewhere (CPU runs stay fp32)."""
    if config.precision == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def grad_scaler(config: ExecutionConfig, device: torch.device):
    enabled = config.precision == "fp16" and device.type == "cuda"
    return torch.amp.GradScaler("cuda", enabled=enabled) if enabled else None


def device_description(device: torch.device) -> dict[str, str]:
    info = {"device": str(device), "torch_version": torch.__version__,
            "cuda_version": str(torch.version.cuda or "none")}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info["device_name"] = torch.cuda.get_device_name(index)
        info["cudnn_version"] = str(torch.backends.cudnn.version())
    else:
        info["device_name"] = "cpu"
    return info


@functools.cache
def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware_description(device: torch.device) -> dict[str, object]:
    """What the run ran on: device type, GPU model and count, CPU model and core count."""
    on_cuda = device.type == "cuda"
    return {
        "device": str(device),
        "device_type": device.type,
        "gpu_model": device_description(device)["device_name"] if on_cuda else None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
