"""Which device a run trains on, and what that device is.

``resolve_device`` turns ``execution.device`` into a ``torch.device``: ``auto`` asks
``torch.accelerator`` for the machine's accelerator (CUDA, Apple MPS, Intel XPU; CUDA alone on a
torch without that API), else the CPU, and says in one log line which it chose; an explicit device
this machine lacks is a one-line ``ConfigError``. ``device_description`` and
``hardware_description`` are the facts a run records about it (tags, manifest): its name, total
memory in GiB, and on CUDA the CUDA, cuDNN and NVIDIA driver versions (the driver through NVML
when ``nvidia-ml-py`` and the driver's library are present; absent otherwise, never an error).
"""
from __future__ import annotations

import functools
import logging
import os
import platform

import torch

from cvae.config import ConfigError
from pipelines.config import ExecutionConfig

log = logging.getLogger(__name__)

ACCELERATORS = ("cuda", "mps", "xpu")  # the accelerators the harness trains on
_NAMES = {"cuda": "CUDA", "mps": "Apple MPS", "xpu": "Intel XPU"}
_announced: set[str] = set()  # what `auto` chose, said once per process (preflight and train both resolve)


def _backend(kind: str):
    """torch.cuda, torch.mps or torch.xpu; None where this torch has no such module."""
    return getattr(torch, kind, None)


def is_available(kind: str) -> bool:
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    backend = _backend(kind)
    return bool(backend is not None and backend.is_available())


def device_count(kind: str) -> int:
    if kind == "cpu":
        return 1
    if not is_available(kind):
        return 0
    backend = _backend(kind)
    count = getattr(backend, "device_count", None)
    return int(count()) if count else 1  # MPS: one device


def available_devices() -> list[str]:
    """What ``execution.device`` can be on this machine, for error messages."""
    found = ["auto", "cpu"]
    for kind in ACCELERATORS:
        count = device_count(kind)
        if count:
            found += [kind] + ([f"{kind}:0..{kind}:{count - 1}"] if kind != "mps" else [])
    return found


def machine_accelerator() -> tuple[torch.device | None, str]:
    """The accelerator ``auto`` takes, with the reason when there is none.

    ``torch.accelerator`` (torch >= 2.6) names the one this torch was built for and whether it is
    usable; older torch builds are asked about CUDA only.
    """
    api = getattr(torch, "accelerator", None)
    if api is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device()), ""
        return None, "no accelerator found"
    if not api.is_available():
        return None, "no accelerator found"
    found = api.current_accelerator()
    if found is None or found.type not in ACCELERATORS:
        kind = found.type if found is not None else "unknown"
        return None, f"torch's accelerator {kind!r} is not one the harness trains on ({', '.join(ACCELERATORS)})"
    index = api.current_device_index() if found.type != "mps" else 0
    return torch.device(found.type, index), ""


def _unavailable(config: ExecutionConfig, kind: str) -> ConfigError:
    return ConfigError(f"execution.device={config.device!r} is not valid; {_NAMES[kind]} is not available here; "
                       f"choose one of {', '.join(available_devices())}")


def resolve_device(config: ExecutionConfig, announce: bool = False) -> torch.device:
    """``execution.device`` as a torch device this machine has; a one-line ``ConfigError`` otherwise.
    ``announce``: say which device ``auto`` chose, once per process. Only where the work begins (the
    training loop, an evaluation or generation past its checks): a command refused for bad input
    says one line, the reason, and nothing before it."""
    if config.device == "auto":
        device, reason = machine_accelerator()
        device = device or torch.device("cpu")
        said = f"device: auto chose {device} ({reason or device_summary(device)})"
        if announce and said not in _announced:
            _announced.add(said)
            log.info(said)
        return device
    device = torch.device(config.device)
    if device.type == "cpu":
        return device
    if not is_available(device.type):
        raise _unavailable(config, device.type)
    count = device_count(device.type)
    if device.index is not None and device.index >= count:
        raise ConfigError(f"execution.device={config.device!r} is not valid; this machine has {count} "
                          f"{_NAMES[device.type]} device(s): {device.type}:0..{device.type}:{count - 1}")
    return device


def device_index(device: torch.device) -> int:
    if device.index is not None:
        return device.index
    backend = _backend(device.type)
    current = getattr(backend, "current_device", None)
    return int(current()) if current else 0


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings); nothing to wait for on the CPU."""
    if device.type == "mps":
        torch.mps.synchronize()
    elif device.type != "cpu":
        _backend(device.type).synchronize(device)


def ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device``: the GPU's own, else the machine's RAM (the CPU's, and MPS's unified
    memory); None when it cannot be told."""
    if device.type in ("cuda", "xpu"):
        return int(_backend(device.type).get_device_properties(device_index(device)).total_memory)
    return ram_bytes()


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory ``device`` can still give: CUDA's free memory, or the kernel's MemAvailable for the CPU
    (free pages plus the cache it can drop); the total when that cannot be told, None when neither can."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return device_memory_bytes(device)


@functools.cache
def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@functools.cache
def nvidia_driver() -> dict[str, str]:
    """The NVIDIA driver's version and the newest CUDA it supports, through NVML (``nvidia-ml-py``);
    {} where NVML or its library is missing or answers with an error. Once per process."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except Exception as error:  # no driver library, no GPU: no driver facts, never a failed run
        log.debug(f"NVML unavailable: {error}")
        return {}
    facts = {}
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        facts["nvidia_driver_version"] = driver.decode() if isinstance(driver, bytes) else str(driver)
        cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())  # e.g. 12080 for 12.8
        facts["cuda_driver_version"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
    except Exception as error:
        log.debug(f"NVML did not tell the driver version: {error}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return facts


def device_name(device: torch.device) -> str:
    if device.type in ("cuda", "xpu"):
        return str(_backend(device.type).get_device_name(device_index(device)))
    if device.type == "mps":
        return f"{cpu_model()} GPU (MPS)"
    return cpu_model()


def gib(size: int | None) -> float | None:
    return None if size is None else round(size / 2**30, 1)


def device_summary(device: torch.device) -> str:
    """'NVIDIA H200, 139.8 GiB': what the log line of ``auto`` says about its choice."""
    memory = gib(device_memory_bytes(device))
    return device_name(device) + (f", {memory} GiB" if memory is not None else "")


def device_description(device: torch.device) -> dict[str, str]:
    """The run's tags about its device: what it is, its total memory (GiB), and the software that
    drives it. ``cuda_version`` is the CUDA torch was built with ("none" for a CPU-only torch);
    ``cuda_driver_version`` the newest CUDA the installed driver supports."""
    info = {"device": str(device), "device_type": device.type, "device_name": device_name(device),
            "torch_version": torch.__version__, "cuda_version": str(torch.version.cuda or "none")}
    memory = gib(device_memory_bytes(device))
    if memory is not None:
        info["device_memory_gib"] = str(memory)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device_index(device))
        info["cuda_compute_capability"] = f"{major}.{minor}"
        info["cudnn_version"] = str(torch.backends.cudnn.version())
        info.update(nvidia_driver())
    elif device.type == "xpu":
        driver = getattr(torch.xpu.get_device_properties(device_index(device)), "driver_version", None)
        if driver:
            info["xpu_driver_version"] = str(driver)
    elif device.type == "mps":
        info["macos_version"] = platform.mac_ver()[0] or "unknown"
    return info


def hardware_description(device: torch.device) -> dict[str, object]:
    """What the run ran on (the manifest's ``hardware``): the device and its facts, GPU model and
    count, CPU model and core count, torch's threads."""
    facts = device_description(device)
    on_gpu = device.type in ("cuda", "xpu")
    return {
        "device": str(device),
        "device_type": device.type,
        "device_name": facts["device_name"],
        "device_memory_gib": gib(device_memory_bytes(device)),
        "gpu_model": facts["device_name"] if on_gpu else None,
        "gpu_count": device_count("cuda") + device_count("xpu"),
        **{key: facts[key] for key in ("cuda_compute_capability", "nvidia_driver_version", "cuda_driver_version",
                                       "xpu_driver_version", "macos_version") if key in facts},
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "ram_gib": gib(ram_bytes()),
        "torch_threads": torch.get_num_threads(),
    }
