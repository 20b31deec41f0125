"""The one configuration object of a run, and everything derived from it.

``RunConfig`` groups five sections. From it we derive the command-line flags of every entry
point, the flattened MLflow params (``model.latent_dim``), and back again: a run's params are
enough to rebuild its configuration. Presets and search spaces are overrides of a base config.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from cvae.config import ConfigError, ModelConfig, ObjectiveConfig, described, require, require_choice

IDX_DATASETS = ("mnist", "fashion-mnist", "kmnist")  # read from their IDX files as they are (1x28x28)
BUILTIN_DATASETS = (*IDX_DATASETS, "cifar10", "svhn")
OWN_DATA_KINDS = ("folder", "npz")  # folder:PATH, npz:PATH: one's own images
DATASETS = (*BUILTIN_DATASETS, *(f"{kind}:PATH" for kind in OWN_DATA_KINDS))  # as docs and errors list them
IMAGE_CHANNELS = (0, 1, 3)
BINARIZATIONS = ("none", "static", "dynamic")
OPTIMIZERS = ("adam", "adamw", "sgd")
PRECISIONS = ("fp32", "bf16", "fp16")
DETERMINISM = ("auto", "true", "false")
COMPILE = ("auto", "true", "false")
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps", "xpu", "xpu:N")
MAX_SEED = 2**63 - 1  # torch generators take at most 64 bits; negative seeds are a typo, not a seed


@dataclass(frozen=True)
class DataConfig:
    dataset: str = described("mnist", "the image dataset; classes and image shape come from it; folder:PATH is a "
                                      "folder with a sub-folder of images per class, npz:PATH a file of arrays x, y "
                                      "(docs/configuration.md: Your data)", choices=DATASETS)
    # Resolved in pipelines.data, so the recorded config says what was asked, not this machine's path.
    data_dir: str = described("", "where the dataset's files are looked for first; empty: $CVAE_DATA_DIR, else "
                                    "./data (docs/configuration.md: Data)")
    binarize: str = described("none", "grey pixels as they are, thresholded at 0.5 once, or drawn from their grey "
                                      "level anew every training epoch (fixed draws for validation and test)",
                              choices=BINARIZATIONS)
    val_size: int = described(5000, "validation images, drawn from the training set with split_seed")
    split_seed: int = described(0, "seed of the train/validation split")
    limit_train: int = described(0, "train on N images of the training split (drawn with split_seed); 0 = all")
    limit_test: int = described(0, "test on the first N images of the official test set; 0 = all")
    image_size: tuple[int, ...] = described((), "H or H,W: every image resized (aspect ratio kept) and centre-cropped "
                                                 "to H×W, once, into the data cache; empty: as stored (then all must "
                                                 "be one size); not for the IDX datasets")
    image_channels: int = described(0, "1 (grey) or 3 (RGB): convert every image; 0: as stored (a folder: grey when "
                                       "every image is grey, else RGB); not for the IDX datasets")
    test_fraction: float = described(0.2, "data without a test set of its own (folder:, npz: without x_test): this "
                                          "fraction of the images, drawn with split_seed, is the test set")

    def __post_init__(self):
        object.__setattr__(self, "image_size", tuple(self.image_size))
        kind, colon, path = self.dataset.partition(":")
        if not (self.dataset in BUILTIN_DATASETS or (colon and kind in OWN_DATA_KINDS and path.strip())):
            raise ConfigError(f"data.dataset={self.dataset!r} is not valid; choose one of: {', '.join(DATASETS)}")
        require_choice("data.binarize", self.binarize, BINARIZATIONS)
        require(self.val_size >= 1, "data.val_size", self.val_size, "an integer >= 1")
        require(0 <= self.split_seed <= MAX_SEED, "data.split_seed", self.split_seed, f"an integer in 0..{MAX_SEED}")
        require(self.limit_train >= 0, "data.limit_train", self.limit_train, "an integer >= 0 (0 = all)")
        require(self.limit_test >= 0, "data.limit_test", self.limit_test, "an integer >= 0 (0 = all)")
        size = as_text(self.image_size)
        require(len(self.image_size) <= 2 and all(isinstance(v, int) and 1 <= v <= 16384 for v in self.image_size),
                "data.image_size", size, "H or H,W: one or two integers in 1..16384 (empty: as stored)")
        require(self.image_channels in IMAGE_CHANNELS, "data.image_channels", self.image_channels,
                "1 (grey) or 3 (RGB), or 0 (as stored)")
        require(0 < self.test_fraction < 1, "data.test_fraction", self.test_fraction, "a number between 0 and 1")
        for name, value, shown in (("image_size", self.image_size, size), ("image_channels", self.image_channels,
                                                                          self.image_channels)):
            if value and self.dataset in IDX_DATASETS:
                raise ConfigError(f"data.{name}={shown!r} is not valid for {self.dataset}, read from its IDX files as "
                                  "they are (1×28×28); it applies to cifar10, svhn, folder: and npz: data")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = described("adam", "the optimizer (sgd with momentum 0.9)", choices=OPTIMIZERS)
    lr: float = described(1e-3, "learning rate")
    weight_decay: float = described(0.0, "weight decay (L2 for adam and sgd, decoupled for adamw)")
    batch_size: int = described(128, "training examples per step")
    epochs: int = described(20, "most epochs to train")
    patience: int = described(5, "epochs without a lower val/loss before training stops; 0 = never stop early")
    grad_clip: float = described(0.0, "largest gradient norm; 0 = no clipping")
    restore_best: bool = described(True, "end with the best validation epoch's weights; false: the last epoch's "
                                         "(Keras' EarlyStopping without restore_best_weights)")

    def __post_init__(self):
        require_choice("optim.optimizer", self.optimizer, OPTIMIZERS)
        require(self.lr > 0, "optim.lr", self.lr, "a number > 0")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a number >= 0")
        require(self.batch_size >= 1, "optim.batch_size", self.batch_size, "an integer >= 1")
        require(self.epochs >= 1, "optim.epochs", self.epochs, "an integer >= 1")
        require(self.patience >= 0, "optim.patience", self.patience, "an integer >= 0 (0 disables)")
        require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "a number >= 0 (0 disables)")


def _is_device(text: str) -> bool:
    """auto, cpu, mps, or cuda/xpu with an optional index (cuda:1). Whether this machine has it is
    checked where the run starts (``pipelines.training.devices``), not here."""
    kind, colon, index = text.partition(":")
    if not colon:
        return kind in ("auto", "cpu", "cuda", "mps", "xpu")
    return kind in ("cuda", "xpu") and index.isdigit()


@dataclass(frozen=True)
class ExecutionConfig:
    seed: int = described(0, "seed of the initial weights, the batch order and training's random draws "
                                "(z, dynamic binarization)")
    device: str = described("auto", "where to train; auto: the accelerator torch finds (CUDA, Apple MPS or Intel "
                                    "XPU), else the CPU, and says in one line which", choices=DEVICES)
    precision: str = described("fp32", "bf16 and fp16 train under autocast on an accelerator (fp16 with a gradient "
                                       "scaler); the CPU stays fp32; losses are always float32", choices=PRECISIONS)
    deterministic: str = described("auto", "torch's deterministic algorithms, for bitwise-repeatable "
                                           "runs; auto: on for the CPU, off on accelerators (speed)", choices=DETERMINISM)
    threads: int = described(0, "torch's CPU threads; 0 = torch's default (all cores); study workers get "
                                "cores ÷ workers")
    compile: str = described("auto", "torch.compile of the training and evaluation steps (a compile failure falls "
                                      "back to eager with a warning); auto: eager, since compiling did not pay "
                                      "for a 20-epoch run where measured (docs/configuration.md: Compile)",
                             choices=COMPILE)
    system_metrics: bool = described(True, "record CPU, memory and (with NVML) GPU use as MLflow system metrics "
                                           "(system/...) while a run or trial trains and records")
    system_metrics_interval_s: float = described(5.0, "seconds between system-metric samples (what a sample "
                                                      "costs: docs/configuration.md, System metrics)")
    checkpoint_upload_s: float = described(300.0, "seconds between uploads of the latest epoch's checkpoint to the "
                                                  "run's artifacts (checkpoints/last.pt), from where another machine "
                                                  "resumes it; every epoch's is written locally; 0 = upload every "
                                                  "epoch (docs/runs.md: Resuming a killed run)")

    def __post_init__(self):
        require(_is_device(self.device), "execution.device", self.device,
                "one of auto, cpu, cuda, cuda:N, mps, xpu, xpu:N")
        require(0 <= self.seed <= MAX_SEED, "execution.seed", self.seed, f"an integer in 0..{MAX_SEED}")
        require_choice("execution.precision", self.precision, PRECISIONS)
        require_choice("execution.deterministic", self.deterministic, DETERMINISM)
        require(self.threads >= 0, "execution.threads", self.threads, "an integer >= 0 (0 = all cores)")
        require_choice("execution.compile", self.compile, COMPILE)
        require(self.system_metrics_interval_s >= 0.1,
                "execution.system_metrics_interval_s", self.system_metrics_interval_s, "a number of seconds >= 0.1")
        require(self.checkpoint_upload_s >= 0, "execution.checkpoint_upload_s", self.checkpoint_upload_s,
                "a number of seconds >= 0 (0 = every epoch)")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    preset: str = described("", "the named configuration to start from (docs/presets.md); the fields "
                                "given beside it override its values")


SECTIONS = ("data", "model", "objective", "optim", "execution")
# Not plain "preset": `mlflow run` logs its own entry-point parameters under their bare names.
PRESET_PARAM = "config.preset"


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {name: hints[name] for name in SECTIONS}


def _field_types(section_cls) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def field_index() -> dict[str, tuple[str, str, Any]]:
    """Short field name -> (section, field, type). Short names are the CLI flags and MLproject params."""
    index: dict[str, tuple[str, str, Any]] = {}
    for section, cls in _section_types().items():
        for name, typ in _field_types(cls).items():
            if name in index:
                raise RuntimeError(f"field name {name!r} is used by two sections; CLI flags must be unique")
            index[name] = (section, name, typ)
    return index


@dataclass(frozen=True)
class FieldDoc:
    """What a configuration field is, as its ``--help`` line and docs/configuration.md show it."""
    key: str  # dotted: model.latent_dim
    kind: str  # what a value is: "integer", "number", "true or false", "comma-separated integers", "text"
    default: str  # as a flag or -P parameter takes it: "512,256", "false"
    help: str  # "" when the field was declared without described(...)
    choices: tuple[str, ...]  # the accepted values; () when any value of its kind is


_KINDS = {int: "integer", float: "number", bool: "true or false", str: "text"}


def as_text(value) -> str:
    """A value as the command line takes it (and flatten() logs it): 512,256 / true / 0.001."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _field_doc(key: str, spec: dataclasses.Field, typ) -> FieldDoc:
    choices = spec.metadata.get("choices", ())
    choices = choices() if callable(choices) else choices
    kind = "comma-separated integers" if typing.get_origin(typ) is tuple else _KINDS.get(typ, "text")
    default = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
    return FieldDoc(key, kind, as_text(default), spec.metadata.get("help", ""), tuple(choices))


def field_docs() -> list[FieldDoc]:
    """Every field of RunConfig, section by section in declaration order, then ``preset``."""
    docs = []
    for section, cls in _section_types().items():
        types = _field_types(cls)
        docs += [_field_doc(f"{section}.{spec.name}", spec, types[spec.name]) for spec in fields(cls)]
    preset = next(spec for spec in fields(RunConfig) if spec.name == "preset")
    return docs + [_field_doc("preset", preset, str)]


def _parse_int(text: str) -> int:
    """'16' or '16.0' (MLflow passes float-typed params so) -> 16; anything else raises ValueError."""
    try:
        return int(text)  # exact, also beyond float precision
    except ValueError:
        as_float = float(text)
        if not as_float.is_integer():  # also rejects inf and nan
            raise
        return int(as_float)


def _typed_value(key: str, typ, raw):
    """A value that arrived typed (a search space, a JSON file): check its type, keep its value."""
    if typing.get_origin(typ) is tuple:
        return tuple(raw) if isinstance(raw, (list, tuple)) else raw  # the section checks the items
    number = isinstance(raw, (int, float)) and not isinstance(raw, bool)
    if typ is int and number and (isinstance(raw, int) or (math.isfinite(raw) and float(raw).is_integer())):
        return int(raw)
    if typ is float and number:
        return float(raw)
    if typ is bool and isinstance(raw, bool):
        return raw
    expected = {bool: "true or false", int: "an integer", float: "a finite number"}.get(typ, "a string")
    raise ConfigError(f"{key}={raw!r} is not valid; expected {expected}")


def parse_value(key: str, typ, raw):
    """Turn a string (CLI, MLflow param) into the field's type, with an error naming the key."""
    if not isinstance(raw, str):
        return _typed_value(key, typ, raw)
    text = raw.strip()
    try:
        if typ is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return _parse_int(text)
        if typ is float:
            return float(text)  # "inf", "nan": the section's check rejects them, naming its bound
        if typing.get_origin(typ) is tuple:
            parts = [p for p in text.replace(" ", "").split(",") if p]
            return tuple(_parse_int(p) for p in parts)
        return text
    except (ValueError, OverflowError):
        expected = {bool: "true or false", int: "an integer", float: "a number"}.get(
            typ, "comma-separated integers, e.g. 64,16,8")
        raise ConfigError(f"{key}={raw!r} is not valid; expected {expected}") from None


def with_overrides(base: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """Apply overrides keyed by dotted name (``model.latent_dim``) or short name (``latent_dim``).

    Values may be strings (parsed by the field's type) or already typed. Validation runs as each
    section is rebuilt, so the result is always a valid configuration.
    """
    index = field_index()
    per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    preset = base.preset
    for key, raw in overrides.items():
        if key == "preset":
            preset = str(raw)
            continue
        short = key.split(".", 1)[1] if "." in key else key
        if short not in index or ("." in key and key.split(".", 1)[0] != index[short][0]):
            raise ConfigError(f"unknown configuration key {key!r}; known keys: {', '.join(sorted(index))}")
        section, name, typ = index[short]
        per_section[section][name] = parse_value(f"{section}.{name}", typ, raw)
    sections = {s: replace(getattr(base, s), **vals) if vals else getattr(base, s)
                for s, vals in per_section.items()}
    return RunConfig(**sections, preset=preset)


def flatten(config: RunConfig) -> dict[str, str]:
    """MLflow params: dotted keys, string values; tuples as comma lists so they parse back.

    Empty values (no preset, no data directory) are left out, not shown as blank cells: each is its
    field's default, which ``from_params`` gives a missing key.
    """
    params = {PRESET_PARAM: config.preset}
    for section in SECTIONS:
        for f in fields(getattr(config, section)):
            value = getattr(getattr(config, section), f.name)
            params[f"{section}.{f.name}"] = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return {key: value for key, value in params.items() if value != ""}


def from_params(params: Mapping[str, str]) -> RunConfig:
    """Rebuild a configuration from a run's flattened params (other params are ignored; a missing
    field takes its default)."""
    known = {k: v for k, v in params.items() if "." in k and k.split(".", 1)[0] in SECTIONS}
    if params.get(PRESET_PARAM):
        known["preset"] = params[PRESET_PARAM]
    return with_overrides(RunConfig(), known)


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: Mapping[str, Any]) -> RunConfig:
    overrides = {f"{s}.{k}": v for s in SECTIONS for k, v in data.get(s, {}).items()}
    if data.get("preset"):
        overrides["preset"] = data["preset"]
    return with_overrides(RunConfig(), overrides)
