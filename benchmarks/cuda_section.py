"""The CUDA section of `python -m benchmarks.run`: what one GPU does with the harness, side by side.

- loop: our loop against the conventional one (784-400-20 MLP b128, the default MLP b128, conv b128
  and b512), in examples/s, and the FLOP/s ours achieves against a large matrix product;
- precision: the 784-400-20 MLP b128 on all 59,000 training images in fp32, under bf16 autocast, under
  `torch.compile` and under `torch.compile(mode="reduce-overhead")` (CUDA graphs): examples/s, a
  60,000-example epoch at that rate, the first epoch (compilation included) and the final val/loss;
- workers: one `tune` study with 1, 2 and 4 workers sharing the GPU, in trials/hour.

Targets (H100/H200): a 60,000-example epoch of the 784-400-20 MLP b128 in <= 0.5 s; ours >= 20x the
conventional loop; 4 workers >= 1.5x the trials/hour of one. Every part that fails says why in its
row and the others still run: on a GPU lent for minutes, one table must come back.

`--device cpu --quick` (benchmarks/gpu/run.sh --dry-run, in CI) goes through the same code at tiny
sizes on the CPU; compilation there uses the "eager" backend (TorchDynamo traces, no code is
generated: inductor's C++ compiler would take minutes on a CI runner).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.entry_points import run_study, study_args, warm_up_store
from benchmarks.fused_section import measure_cuda_fused
from benchmarks.loops import MODELS, loop_config, measure_loops
from benchmarks.table import Table

EXAMPLES_PER_EPOCH = 60_000
EPOCH_TARGET = "<= 0.5 (H100/H200)"


LOOP_SETUPS = (("mlp", 128), ("default", 128), ("conv", 128), ("conv", 512))


@dataclass(frozen=True)
class CudaSizes:
    loop_setups: tuple[tuple[str, int], ...]  # (arch, batch size)
    loop_images: int
    loop_epochs: int
    precision_images: int  # 0: all 59,000 training images
    precision_epochs: int
    compile_backend: str
    warm_up: bool  # a first run in the store before the studies, so that none of them pays for the store
    study_space: str
    study_images: int
    study_epochs: int
    study_trials: int
    workers: tuple[int, ...]
    fused_counts: tuple[int, ...]  # trials at a time (--fuse K), a study each
    fused_images: int
    fused_epochs: int
    fused_hundred: bool  # the hundred trials of ten epochs on all of Fashion-MNIST


FULL_CUDA = CudaSizes(loop_setups=LOOP_SETUPS, loop_images=20_000, loop_epochs=2, precision_images=0,
                      precision_epochs=3, compile_backend="inductor", warm_up=True, study_space="default",
                      study_images=10_000, study_epochs=2, study_trials=8, workers=(1, 2, 4),
                      fused_counts=(1, 8, 32, 128), fused_images=10_000, fused_epochs=2, fused_hundred=True)
# The dry run: every function of the section once, at the least cost. One loop setup (the others are
# the same code on other models), no warm-up and one worker (tests/test_benchmarks.py warms a store up,
# tests/test_cuda.py runs a study of two workers on the device, in the same dry run). No fused study:
# the fused rows are made by benchmarks.fused_section's functions, which the quick CPU benchmark runs.
QUICK_CUDA = CudaSizes(loop_setups=LOOP_SETUPS[:1], loop_images=200, loop_epochs=1, precision_images=200,
                       precision_epochs=1, compile_backend="eager", warm_up=False, study_space="smoke",
                       study_images=200, study_epochs=1, study_trials=2, workers=(1,),
                       fused_counts=(), fused_images=200, fused_epochs=1, fused_hundred=False)
# (name, precision, torch.compile options or None for eager, whether it means anything off CUDA).
# The harness's bf16 is autocast on CUDA only (fp32 elsewhere), and CUDA graphs are CUDA's: on
# another device their rows say so instead of measuring fp32 under another name.
VARIANTS = [("fp32", "fp32", None, False), ("bf16 autocast", "bf16", None, True), ("torch.compile", "fp32", {}, False),
            ("CUDA graphs (torch.compile reduce-overhead)", "fp32", {"mode": "reduce-overhead"}, True)]
NEEDS_CUDA = "not measured (needs cuda)"


@contextlib.contextmanager
def compiled_models(**options):
    """Within the block, the model `train` builds is wrapped in ``torch.compile(**options)``, so the
    compiled model goes through the harness's own loop and validation, timed as they time."""
    import cvae

    build = cvae.build
    cvae.build = lambda *args, **kwargs: torch.compile(build(*args, **kwargs), **options)
    try:
        yield
    finally:
        cvae.build = build


def measure_precisions(table: Table, sizes: CudaSizes, device: str, variants) -> None:
    from pipelines.config import with_overrides
    from pipelines.training.train import train

    name = f"{MODELS['mlp']} b128"
    for label, precision, options, cuda_only in variants:
        if cuda_only and not device.startswith("cuda"):
            table.add("cuda precision", f"{name} {label}", NEEDS_CUDA, "")
            continue
        if options is not None and sizes.compile_backend != "inductor":
            label = f"{label} ({sizes.compile_backend} backend: traced, no code generated)"
        try:
            config = with_overrides(loop_config("mlp", 128, sizes.precision_images, sizes.precision_epochs, device),
                                    {"execution.precision": precision})
            if options is None:
                history = train(config).history
            else:
                # Static shapes, as the harness's own compiled steps: a graph per batch shape.
                # Another backend than inductor takes no mode (it only traces: the dry run).
                chosen = {"dynamic": False, **(options if sizes.compile_backend == "inductor" else {}),
                          "backend": sizes.compile_backend}
                try:
                    with compiled_models(**chosen):
                        history = train(config).history
                finally:
                    torch._dynamo.reset()  # the next variant compiles afresh
        except Exception as error:  # one failing variant must not cost the others their rows
            table.failed("cuda precision", f"{name} {label}", error)
            continue
        rate = max(row["examples_per_s"] for row in history)
        table.add("cuda precision", f"{name} {label}: examples/s (best epoch)", rate, "examples/s")
        table.add("cuda precision", f"{name} {label}: a {EXAMPLES_PER_EPOCH:,}-example epoch at that rate",
                  EXAMPLES_PER_EPOCH / rate, "s", EPOCH_TARGET if label == "fp32" else "")
        if options is not None:
            table.add("cuda precision", f"{name} {label}: first epoch, compilation included",
                      history[0]["epoch_time_s"], "s")
        table.add("cuda precision", f"{name} {label}: final val/loss", history[-1]["val/loss"], "nats")


def measure_workers(table: Table, sizes: CudaSizes, workdir: Path, device: str) -> None:
    if sizes.warm_up:
        warm_up_store(table, workdir, {sizes.study_images}, section="cuda workers")
    args = study_args(workdir, sizes.study_space, sizes.study_images, sizes.study_epochs, sizes.study_trials, device)
    per_hour = {}
    for workers in sizes.workers:
        try:
            wall, trials, _ = run_study(workdir, args, f"{device}-{workers}-workers", workers)
        except Exception as error:  # the other worker counts still run
            table.failed("cuda workers", f"{workers} worker(s)", error)
            continue
        per_hour[workers] = len(trials) / wall * 3600
        table.add("cuda workers", f"{len(trials)} trials, {workers} worker(s) on one device: trials per hour",
                  per_hour[workers], "trials/h")
    most = max(sizes.workers)
    if 1 in per_hour and most in per_hour and most > 1:
        table.add("cuda workers", f"{most} workers / 1 worker, trials per hour", per_hour[most] / per_hour[1], "ratio",
                  ">= 1.5" if most == 4 else "")


def measure_cuda(table: Table, sizes: CudaSizes, workdir: Path, root: Path, device: str) -> None:
    """The whole section on ``device``: loops, fp32 and bf16, workers, and the compiled variants last
    (the likeliest to run long: a time limit then costs the fewest rows)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        table.add("cuda", "loops, precision, workers sharing a GPU", "not measured: no CUDA device", "")
        return
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        table.add("cuda", f"device: {props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}",
                  props.total_memory / 2**30, "GiB")
    try:
        measure_loops(table, list(sizes.loop_setups), sizes.loop_images, sizes.loop_epochs, root, device, prefix="cuda ")
    except Exception as error:  # the parts after it still run
        table.failed("cuda loop", "ours against the conventional loop", error)
    measure_precisions(table, sizes, device, [v for v in VARIANTS if v[2] is None])
    try:
        measure_workers(table, sizes, workdir, device)
    except Exception as error:  # the compiled variants still run
        table.failed("cuda workers", "warming up the store", error)
    measure_cuda_fused(table, workdir, device, sizes.fused_counts, sizes.fused_images, sizes.fused_epochs,
                       sizes.fused_hundred)
    measure_precisions(table, sizes, device, [v for v in VARIANTS if v[2] is not None])
