"""What the data cache costs and saves: loading a folder of images the first time (every file
hashed and decoded, the cache file written) against loading it again (every file hashed, the cache
file read), and again in the same process (a run's checks, training and judge classifier each load
the data: files unchanged since hashed are not hashed again), side by side, and an IDX set's load
for scale:
`python -m benchmarks.data_cache_cost [--images 2000] [--size 32] [--format png]`.

The images are made here (random RGB, 10 classes) in a temporary folder with its own cache
directory; each measure is the fastest of ``--repeats``, with the in-process digest memo cleared
before each so every load hashes the files as a new process would. Once loaded, a folder's splits
are uint8 tensors like an IDX set's, so an epoch costs the same on both: only loading differs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def make_folder(root: Path, images: int, size: int, fmt: str) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(images):
        folder = root / f"class{k % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{k:06d}.{fmt}")


def seconds(load, repeats: int, before=lambda: None, new_process: bool = True) -> float:
    from pipelines.data import digests

    best = float("inf")
    for _ in range(repeats):
        before()
        if new_process:
            digests._seen.clear()  # hash every file, as a new process does
        started = time.perf_counter()
        load()
        best = min(best, time.perf_counter() - started)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32, help="images are SIZE×SIZE RGB")
    parser.add_argument("--format", default="png", choices=("png", "jpg"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    from pipelines.config import DataConfig
    from pipelines.data import load_splits
    from pipelines.data.cache import CACHE_ENV

    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "images", Path(tmp) / "cache"
        os.environ[CACHE_ENV] = str(cache)
        make_folder(root, args.images, args.size, args.format)
        config = DataConfig(dataset=f"folder:{root}", val_size=max(1, args.images // 10))
        cpu = torch.device("cpu")
        first = seconds(lambda: load_splits(config, cpu), args.repeats, lambda: shutil.rmtree(cache, True))
        cached = seconds(lambda: load_splits(config, cpu), args.repeats)
        again = seconds(lambda: load_splits(config, cpu), args.repeats, new_process=False)
        cache_mib = sum(p.stat().st_size for p in cache.iterdir()) / 2**20
        source_mib = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20
    idx = None
    try:
        fashion = DataConfig(dataset="fashion-mnist", val_size=5000)
        idx = seconds(lambda: load_splits(fashion, cpu), args.repeats)
    except Exception as error:  # no Fashion-MNIST here: the row says why
        idx_note = f"not measured ({error})"
    what = f"{args.images:,} {args.format.upper()}s {args.size}×{args.size} RGB ({source_mib:.1f} MiB)"
    rows = [
        (f"{what}: first load (hash, decode, write the cache)", f"{first:.3f}", "s"),
        (f"{what}: cached load (hash, read the cache, {cache_mib:.1f} MiB)", f"{cached:.3f}", "s"),
        ("first / cached", f"{first / cached:.1f}", "ratio"),
        ("cached load again in the same process (files unchanged since hashed: not hashed again)", f"{again:.3f}", "s"),
        ("first load per image", f"{1000 * first / args.images:.3f}", "ms"),
        ("cached load per image", f"{1000 * cached / args.images:.3f}", "ms"),
        ("Fashion-MNIST (70,000 IDX images, read in place): load",
         f"{idx:.3f}" if idx is not None else idx_note, "s" if idx is not None else ""),
    ]
    print("| measure | value | unit |\n|---|---|---|")
    for measure, value, unit in rows:
        print(f"| {measure} | {value} | {unit} |")


if __name__ == "__main__":
    main()
