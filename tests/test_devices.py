"""Which device a run takes, what it says about it, and what it records of it.

`auto` is checked against every answer torch.accelerator can give (CUDA, MPS, XPU, another kind,
none, an older torch without the API) by standing in for it; the facts a real run records are
read from the shared session run.
"""
from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest
import torch

from cvae.config import ConfigError
from pipelines.config import ExecutionConfig, RunConfig, with_overrides
from pipelines.training import devices
from pipelines.training.devices import resolve_device

ON_GPU = torch.cuda.is_available()


@pytest.fixture
def fresh(monkeypatch):
    """Nothing announced yet in this process, no cached driver facts."""
    monkeypatch.setattr(devices, "_announced", set())
    devices.nvidia_driver.cache_clear()
    yield monkeypatch
    devices.nvidia_driver.cache_clear()


def accelerator(monkeypatch, kind: str | None):
    """torch.accelerator answering as on a machine with ``kind`` (None: no usable accelerator)."""
    api = torch.accelerator
    monkeypatch.setattr(api, "is_available", lambda: kind is not None)
    monkeypatch.setattr(api, "current_accelerator", lambda check_available=False: torch.device(kind or "cuda"))
    monkeypatch.setattr(api, "current_device_index", lambda: 0)


def auto(caplog) -> torch.device:
    with caplog.at_level(logging.INFO, logger="pipelines"):
        return resolve_device(ExecutionConfig(device="auto"), announce=True)


def announced(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("device: auto chose")]


def test_auto_takes_apples_mps_and_says_so_in_one_line(fresh, caplog):
    accelerator(fresh, "mps")
    assert auto(caplog) == torch.device("mps", 0)
    (line,) = announced(caplog)
    assert line.startswith("device: auto chose mps:0 (") and "GPU (MPS)" in line and line.endswith(" GiB)")


def test_auto_takes_an_intel_xpu_with_its_name_and_memory(fresh, caplog):
    accelerator(fresh, "xpu")
    fresh.setattr(torch.xpu, "get_device_name", lambda index: "Intel Data Center GPU Max 1550")
    fresh.setattr(torch.xpu, "get_device_properties", lambda index: SimpleNamespace(total_memory=64 * 2**30))
    assert auto(caplog) == torch.device("xpu", 0)
    assert announced(caplog) == ["device: auto chose xpu:0 (Intel Data Center GPU Max 1550, 64.0 GiB)"]


def test_auto_takes_the_cpu_without_an_accelerator_and_says_it_once(fresh, caplog):
    accelerator(fresh, None)
    assert auto(caplog) == torch.device("cpu")
    assert auto(caplog) == torch.device("cpu")  # preflight and train both resolve: one line
    assert announced(caplog) == ["device: auto chose cpu (no accelerator found)"]


def test_auto_leaves_an_accelerator_the_harness_does_not_train_on(fresh, caplog):
    accelerator(fresh, "hpu")
    assert auto(caplog) == torch.device("cpu")
    (line,) = announced(caplog)
    assert "torch's accelerator 'hpu' is not one the harness trains on (cuda, mps, xpu)" in line


def test_auto_asks_for_cuda_alone_on_a_torch_without_torch_accelerator(fresh, caplog):
    fresh.delattr(torch, "accelerator")
    fresh.setattr(torch.cuda, "is_available", lambda: False)
    assert auto(caplog) == torch.device("cpu")
    assert announced(caplog) == ["device: auto chose cpu (no accelerator found)"]


@pytest.mark.parametrize("device, says", [
    ("cuda", "CUDA is not available here"),
    ("cuda:1", "CUDA is not available here"),
    ("mps", "Apple MPS is not available here"),
    ("xpu:0", "Intel XPU is not available here"),
])
def test_an_explicit_device_this_machine_lacks_is_one_line_naming_what_it_has(device, says):
    kind = device.split(":")[0]
    if devices.is_available(kind):
        pytest.skip(f"this machine has {kind}")
    with pytest.raises(ConfigError) as error:
        resolve_device(ExecutionConfig(device=device))
    message = str(error.value)
    assert message.startswith(f"execution.device={device!r} is not valid; {says}; choose one of auto, cpu")
    assert "\n" not in message


def test_a_gpu_index_past_the_last_names_the_ones_there(fresh):
    fresh.setattr(devices, "is_available", lambda kind: kind == "xpu")
    fresh.setattr(torch.xpu, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"this machine has 2 Intel XPU device\(s\): xpu:0..xpu:1$"):
        resolve_device(ExecutionConfig(device="xpu:2"))


@pytest.mark.parametrize("device", ["mps", "xpu", "xpu:3", "cuda:0"])
def test_the_configuration_accepts_every_accelerator(device):
    assert with_overrides(RunConfig(), {"device": device}).execution.device == device


@pytest.mark.parametrize("device", ["mps:1", "tpu", "xpu:", "cuda:x"])
def test_the_configuration_rejects_what_torch_cannot_train_on(device):
    with pytest.raises(ConfigError, match="one of auto, cpu, cuda, cuda:N, mps, xpu, xpu:N"):
        with_overrides(RunConfig(), {"device": device})


def test_the_driver_comes_from_nvml_when_it_answers(fresh):
    fake = SimpleNamespace(nvmlInit=lambda: None, nvmlShutdown=lambda: None,
                           nvmlSystemGetDriverVersion=lambda: "570.86.15", nvmlSystemGetCudaDriverVersion=lambda: 12080)
    fresh.setitem(sys.modules, "pynvml", fake)
    assert devices.nvidia_driver() == {"nvidia_driver_version": "570.86.15", "cuda_driver_version": "12.8"}


def test_no_nvml_means_no_driver_facts_never_an_error(fresh):
    def no_library():
        raise RuntimeError("NVML Shared Library Not Found")

    fresh.setitem(sys.modules, "pynvml", SimpleNamespace(nvmlInit=no_library))
    assert devices.nvidia_driver() == {}
    fresh.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    devices.nvidia_driver.cache_clear()
    assert devices.nvidia_driver() == {}


def test_mixed_precision_is_for_accelerators_the_cpu_stays_fp32():
    from pipelines.training.execution import autocast, grad_scaler

    config = ExecutionConfig(precision="fp16")
    cpu = torch.device("cpu")
    assert grad_scaler(config, cpu) is None
    with autocast(config, cpu):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.slow
def test_a_run_records_its_device_as_tags_and_in_its_manifest(conditional_run):
    from pipelines.recording.manifest import load_manifest

    tags = conditional_run.run.data.tags
    facts = devices.device_description(torch.device("cuda:0" if ON_GPU else "cpu"))
    for key in ("device", "device_type", "device_name", "device_memory_gib", "torch_version", "cuda_version"):
        assert tags[key] == facts[key], key
    assert float(tags["device_memory_gib"]) > 0
    assert tags["compiled"] == "false"  # compile=auto: eager (pipelines/training/steps.py)
    manifest = load_manifest(conditional_run.store.client, conditional_run.run.info.run_id)
    hardware = manifest["hardware"]
    assert hardware["device_name"] == tags["device_name"]
    assert hardware["device_memory_gib"] == float(tags["device_memory_gib"])
    assert hardware["ram_gib"] > 0
    assert manifest["compile"] == {"requested": "auto", "compiled": False, "fallback_error": None}
    if not ON_GPU:
        assert tags["device_name"] == devices.cpu_model() and "nvidia_driver_version" not in tags
