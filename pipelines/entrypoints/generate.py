"""`generate` entry point: a PNG grid of samples from a logged model (a row per label, ``n`` per row),
logged to a new MLflow run as ``generated/samples.png`` and optionally written to ``--output``."""
from __future__ import annotations

import argparse
import math
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from pipelines.config import ExecutionConfig
from pipelines.entrypoints.command_line import CommandParser, add_run_arguments, integer
from pipelines.entrypoints.common import run_main
from pipelines.errors import UserError
from pipelines.training.execution import resolve_device
from pipelines.training.preflight import check_fits

GRID_ARTIFACT = "generated/samples.png"
GRID_PADDING = 2  # pixels between tiles, torchvision's make_grid default
# About the memory a generated image takes, per pixel: the decoder's activations (a few float32 per
# pixel for these nets), the float32 sample, the grid's three float32 channels and its 8-bit copies.
BYTES_PER_GENERATED_PIXEL = 40


def parse_labels(text: str, class_names: Sequence[str]) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; '' -> every class. Each label must be a class id of the dataset, an
    integer also when written 3.0, as the served generator takes it (and `integer` every count)."""
    valid = f"class ids 0..{len(class_names) - 1} ({', '.join(class_names)})"
    if not text.strip():
        return list(range(len(class_names)))
    labels = []
    for part in text.replace(" ", "").split(","):
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value.is_integer() and 0 <= value < len(class_names)):
            raise UserError(f"labels={text!r} is not valid: {part!r} is not a class of this model; "
                            f"expected comma-separated {valid}")
        labels.append(int(value))
    return labels


def writable_output(text: str) -> Path | None:
    """The ``--output`` path, checked before anything is loaded or logged: its folder must exist
    (a typo must not make folders) and the file must be writable there (None when no output was asked for)."""
    if not text.strip():
        return None
    path = Path(text).expanduser().absolute()
    if path.is_dir():
        raise UserError(f"output={text!r} is not valid; it is a directory: expected a file path, e.g. grid.png")
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"output={text!r} is not valid; no such folder: {folder} (create it first)")
    try:  # try it for real: permission bits say nothing for root or on read-only mounts
        if path.exists():
            with open(path, "ab"):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".generate-probe-"):
                pass
    except OSError as error:
        raise UserError(f"output={text!r} is not valid; cannot write there: "
                        f"{error.strerror or type(error).__name__} ({path if path.exists() else folder})") from None
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m pipelines.entrypoints.generate",
                                     description="Write a grid of generated images from a logged CVAE.")
    parser.add_argument("--model-uri", required=True,
                        help="models:/<model_id>, models:/NAME@alias, models:/NAME/<version>, or a run id")
    parser.add_argument("--labels", default="", help="comma-separated class ids, a row each (default: all classes)")
    parser.add_argument("--n", type=integer(1), default=8, help="samples per label (per row; default %(default)s)")
    parser.add_argument("--seed", type=integer(0), default=0, help="seed of the latent draws (default %(default)s)")
    parser.add_argument("--output", default="", help="also write the PNG here")
    parser.add_argument("--device", default=ExecutionConfig.device, help="auto, cpu, cuda or cuda:N (default %(default)s)")
    add_run_arguments(parser, run_name="generate")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    n, seed = args.n, args.seed
    output = writable_output(args.output)
    device = resolve_device(ExecutionConfig(device=args.device))
    import torch
    from torchvision.utils import save_image

    from pipelines.data import class_names as dataset_class_names
    from pipelines.models.model_resolution import load_cvae, resolve_model
    from pipelines.tracking.runs import entry_point_run

    resolved = resolve_model(args.model_uri)
    class_names = list(dataset_class_names(resolved.config.data))
    model = load_cvae(resolved, device)
    labels = parse_labels(args.labels, class_names[: model.num_classes])
    rows = len(labels) if model.conditional else 1
    check_fits("n", n, rows * n * math.prod(model.image_shape) * BYTES_PER_GENERATED_PIXEL,
               f"{rows} row(s) of {n:,} images", device, "choose a smaller --n or fewer --labels")
    generator = torch.Generator(device=device).manual_seed(seed)
    if model.conditional:
        images = model.sample(torch.tensor(labels, device=device), n, generator=generator)
        rows = [f"{label} ({class_names[label]})" for label in labels]
    else:
        images = model.sample(None, n, generator=generator)
        rows = ["unconditional"]
    resolve_device(ExecutionConfig(device=args.device), announce=True)  # past every check: say which
    with entry_point_run(args.experiment, args.run_name) as logger, tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp) / Path(GRID_ARTIFACT).name
        save_image(images.float().cpu(), grid, nrow=n, padding=GRID_PADDING, pad_value=1.0)
        logger.log_params({"generate.model_uri": resolved.model_uri, "generate.labels": ",".join(map(str, labels)),
                           "generate.n": n, "generate.seed": seed})
        logger.set_tags({"generated_from": resolved.model_uri, "source_run_id": resolved.source_run_id or ""})
        logger.log_artifact(str(grid), str(Path(GRID_ARTIFACT).parent))
        if output:
            shutil.copyfile(grid, output)
    print(f"generate run {logger.run_id}: {len(rows)} x {n} grid ({'; '.join(rows)}) from {resolved.model_uri} "
          f"-> {GRID_ARTIFACT}" + (f" and {args.output}" if args.output else ""))
    return 0


if __name__ == "__main__":
    run_main(main)
