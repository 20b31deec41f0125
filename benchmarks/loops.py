"""Our training loop against a conventional one, side by side on the same model, data and device.

The conventional loop is written here the way most PyTorch VAE examples do it: torchvision dataset +
ToTensor, a shuffled DataLoader, a host-to-device copy and a `loss.item()` per batch. Ours is
`pipelines.training.train.train`, whose data sit on the device as uint8 and whose batches are index
slices of them. Both are timed in training examples/s, best epoch.
"""
from __future__ import annotations

import gzip
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.table import Table

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# The models compared: (arch, shown as). "default" is RunConfig's own model, unconditional like the rest.
MODELS = {"mlp": "784-400-20 MLP", "default": "default MLP 784-512-256-16", "conv": "conv 32-64"}
VALIDATION_IMAGES = 1000


def loop_config(arch: str, batch_size: int, images: int, epochs: int, device: str):
    """A training run of one of MODELS on ``images`` Fashion-MNIST images (0: all 59,000 beside
    the validation images), never stopping early."""
    from pipelines.config import RunConfig, with_overrides

    model = {"mlp": {"model.arch": "mlp", "model.hidden": "400", "model.latent_dim": 20},
             "default": {"model.arch": "mlp"},
             "conv": {"model.arch": "conv", "model.latent_dim": 16}}[arch]
    return with_overrides(RunConfig(), {
        "data.dataset": "fashion-mnist", "data.limit_train": images, "data.val_size": VALIDATION_IMAGES,
        "model.conditioning": "none", **model, "optim.batch_size": batch_size, "optim.epochs": epochs,
        "optim.patience": 0, "execution.device": device})


def our_examples_per_s(config) -> float:
    """Training examples/s of `pipelines.training.train.train` (its best epoch; validation not counted)."""
    from pipelines.training.train import train

    result = train(config)
    return max(row["examples_per_s"] for row in result.history)


def torchvision_root(tmp: Path, source: Path) -> Path:
    """A torchvision FashionMNIST root made from the .gz files in ``source`` (torchvision reads raw IDX files)."""
    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        if not (raw / name).is_file():
            with gzip.open(source / f"{name}.gz", "rb") as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return tmp


def conventional_examples_per_s(config, root: Path) -> float:
    """The loop of a typical PyTorch VAE example, on the same model architecture and data."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    import cvae

    device = torch.device(config.execution.device)
    dataset = datasets.FashionMNIST(str(root), train=True, download=False, transform=transforms.ToTensor())
    if config.data.limit_train:
        dataset = Subset(dataset, range(config.data.limit_train))
    loader = DataLoader(dataset, batch_size=config.optim.batch_size, shuffle=True)
    torch.manual_seed(0)
    model = cvae.build(config.model, (1, 28, 28), 10).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    best = 0.0
    for _ in range(config.optim.epochs):
        model.train()
        started, seen, total = time.perf_counter(), 0, 0.0
        for x, _labels in loader:
            x = x.to(device)
            out = model(x, None)
            recon = F.binary_cross_entropy_with_logits(out.decoded, x, reduction="sum")
            kl = -0.5 * torch.sum(1 + out.logvar - out.mu.pow(2) - out.logvar.exp())
            loss = (recon + kl) / len(x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            seen += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, seen / (time.perf_counter() - started))
    return best


def training_flops_per_example(config) -> float:
    """FLOPs of one forward + backward step, per example, as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    import cvae
    from cvae import negative_elbo

    model = cvae.build(config.model, (1, 28, 28), 10)
    x = torch.rand(config.optim.batch_size, 1, 28, 28)
    with FlopCounterMode(display=False) as counter:
        out = model(x, None)
        terms = negative_elbo(model.reconstruction_nll(out.decoded, x), out.mu, out.logvar, out.z, 1.0)
        terms.loss.backward()
    return counter.get_total_flops() / config.optim.batch_size


def matmul_flops_per_s(device: str, n: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if a.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.mm(a, b)
        if a.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * n ** 3 / best


def measure_loops(table: Table, setups: list[tuple[str, int]], images: int, epochs: int, root: Path, device: str,
                  prefix: str = "") -> None:
    """Ours against the conventional loop for each (arch, batch size) of ``setups``, in section
    ``{prefix}loop``; for the 784-400-20 MLP also the FLOP/s ours achieves against a large matrix
    product on ``device``, in ``{prefix}flops``."""
    for arch, batch in setups:
        config = loop_config(arch, batch, images, epochs, device)
        ours = our_examples_per_s(config)
        conventional = conventional_examples_per_s(config, root)
        name = MODELS[arch]
        table.add(f"{prefix}loop", f"{name} b{batch}: ours", ours, "examples/s")
        table.add(f"{prefix}loop", f"{name} b{batch}: conventional loop", conventional, "examples/s")
        target = {"cpu": ">= 4"}.get(device, ">= 20") if arch == "mlp" else ""
        table.add(f"{prefix}loop", f"{name} b{batch}: ours / conventional", ours / conventional, "ratio", target)
        if arch == "mlp":
            achieved = training_flops_per_example(config) * ours
            peak = matmul_flops_per_s(device)
            table.add(f"{prefix}flops", f"{name} b{batch}: achieved", achieved / 1e9, "GFLOP/s")
            table.add(f"{prefix}flops", "float32 2048² matmul, same run", peak / 1e9, "GFLOP/s")
            table.add(f"{prefix}flops", "achieved / matmul", achieved / peak, "ratio")


def colour_npz(path: Path, images: int, seed: int = 0) -> Path:
    """A synthetic labelled set like CIFAR-10's: ``images`` random 32x32 RGB uint8 images in 10 classes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, size=(images, 32, 32, 3), dtype=np.uint8),
             y=rng.integers(0, 10, size=images))
    return path


def measure_own_data(table: Table, workdir: Path, images: int, epochs: int, device: str) -> None:
    """Our loop on a synthetic 3x32x32 colour set (an npz file, through the data cache) against
    Fashion-MNIST's 1x28x28, same model (the 784-400-20 MLP's widths), batch size and number of
    training images: examples/s, and pixels/s (a pixel being one uint8 value, C*H*W per image), whose
    ratio says whether an image of another size costs what its pixels do."""
    from pipelines.config import with_overrides

    os.environ.setdefault("CVAE_CACHE_DIR", str(workdir / "data-cache"))
    fashion = loop_config("mlp", 128, images, epochs, device)
    colour = with_overrides(fashion, {
        "data.dataset": f"npz:{colour_npz(workdir / 'colour.npz', images + VALIDATION_IMAGES + images // 4)}",
        "data.limit_train": images})
    rates = {}
    for name, config, pixels in (("Fashion-MNIST 1x28x28", fashion, 784), ("synthetic 3x32x32", colour, 3072)):
        rates[name] = our_examples_per_s(config) * pixels
        table.add("own data", f"{name}, {images} images: ours", rates[name] / pixels, "examples/s")
        table.add("own data", f"{name}: ours", rates[name] / 1e6, "Mpixel/s")
    table.add("own data", "3x32x32 / 1x28x28, pixels per second", rates["synthetic 3x32x32"] /
              rates["Fashion-MNIST 1x28x28"], "ratio", "same order (0.3-3)")
