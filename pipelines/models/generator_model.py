"""The generator flavour of a logged CVAE: an MLflow pyfunc that turns requested labels (and
optional latent vectors) into images of the model's shape (C, H, W), so `mlflow models serve` can
answer sample requests.

Request rows: ``label`` (an integer class id, required for a conditional model, ignored by an
unconditional one; 3.5, "3" or true are refused, not truncated) and optional ``z`` (a list of
``latent_dim`` floats; drawn from N(0, I) when absent). The answer is a float32 array
(rows, C, H, W) of mean images in [0, 1], the shape the signature's output names. A request may ask
for at most ``max_rows_per_request`` rows (the spec's setting; by default as many images as hold
MAX_VALUES_PER_REQUEST pixel values, about 16 MB of JSON: 1000 of 1x28x28, 255 of 3x32x32); more
get HTTP 400.

It is logged as a "model from code": MLflow executes this file when it loads the model, so it
imports only cvae, torch, numpy, pandas and mlflow, never the pipelines package, and needs no
pickle. The weights travel as a state dict and the architecture as a JSON artifact (`spec`).
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import Schema, TensorSpec
from mlflow.types.schema import AnyType, ColSpec

import cvae
from cvae import CVAE, ModelConfig

WEIGHTS_ARTIFACT = "weights"
# Pixel values in one answer: 784,000 (1000 images of 1x28x28) are about 16 MB of JSON; 20,000 such
# images made a 317 MB answer and a 960 MB worker. Larger images get proportionally fewer rows.
MAX_VALUES_PER_REQUEST = 784_000
# The spec travels as an artifact, not as MLflow's model_config: MLflow would also log every
# model_config entry as a run param, duplicating the run's configuration under other names.
SPEC_ARTIFACT = "spec"
FLOAT32_MAX = float(np.finfo(np.float32).max)  # z is decoded in float32: larger values become inf


class GenerationRequestError(MlflowException):
    """A request the generator cannot answer; the scoring server returns it as HTTP 400."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def default_max_rows(image_shape) -> int:
    """The rows a request may ask for by default: as many images as hold MAX_VALUES_PER_REQUEST values."""
    return max(1, MAX_VALUES_PER_REQUEST // math.prod(int(s) for s in image_shape))


def generator_spec(model: CVAE, class_names: list[str], max_rows_per_request: int | None = None) -> dict:
    """Everything besides the weights needed to rebuild ``model``, and the serving limits."""
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model of {model.num_classes} classes")
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model.config).items()}
    rows = default_max_rows(model.image_shape) if max_rows_per_request is None else max_rows_per_request
    return {"model": config, "image_shape": list(model.image_shape), "num_classes": model.num_classes,
            "class_names": [str(name) for name in class_names], "max_rows_per_request": int(rows)}


def generator_signature(model: CVAE) -> ModelSignature:
    # `label` is typed Any, not long: with long, MLflow's scoring server casts the JSON to int64
    # while parsing it (3.5 -> 3, "3" -> 3, true -> 1) before we can refuse it; _class_id checks it.
    # `z` is Any too, not Array(double): MLflow cannot check an array column given in the columnar
    # `inputs`/`instances` form ({"z": [[...], [...]]}) and refused it; _latents checks each vector.
    inputs = Schema([ColSpec(AnyType(), "label", required=model.conditional),
                     ColSpec(AnyType(), "z", required=False)])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *model.image_shape), "images")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def generator_input_example(model: CVAE) -> pd.DataFrame:
    return pd.DataFrame({"label": np.arange(2, dtype=np.int64) % model.num_classes})


def _class_id(value, num_classes: int) -> int | None:
    """The class id ``value`` stands for, or None when it is not an integer in [0, num_classes).

    Integers only: a JSON number with an integral value (3, or 3.0 as some clients write it);
    never a fraction, a string or a boolean (bool is an int subclass in Python)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    if isinstance(value, (float, np.floating)) and not (math.isfinite(value) and float(value).is_integer()):
        return None
    label = int(value)
    return label if 0 <= label < num_classes else None


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _as_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """A row per request row, whichever of MLflow's request forms was used. ``dataframe_records``
    and ``dataframe_split`` arrive as rows; ``inputs`` and ``instances`` in the columnar form
    (``{"label": [3, 9], "z": [[...], [...]]}``) arrive as one row whose cells hold whole columns
    (the signature's Any types keep them whole): those are spread back into rows."""
    if len(frame) != 1:
        return frame
    cells = frame.iloc[0]
    label, z = cells.get("label"), cells.get("z")
    if not (_is_list(label) or (_is_list(z) and len(z) > 0 and _is_list(z[0]))):
        return frame
    columns = {name: list(cells[name]) if _is_list(cells[name]) else [cells[name]] for name in frame.columns}
    lengths = {name: len(column) for name, column in columns.items()}
    if len(set(lengths.values())) != 1:
        raise GenerationRequestError(f"the request's columns differ in length ({lengths}); give a label "
                                     "(and optionally a z) per row")
    return pd.DataFrame(columns)


class GeneratorModel(PythonModel):
    def load_context(self, context):
        if SPEC_ARTIFACT in context.artifacts:
            with open(context.artifacts[SPEC_ARTIFACT]) as spec_file:
                spec = json.load(spec_file)
        else:  # generators logged before the spec became an artifact
            spec = context.model_config
        self.class_names = list(spec["class_names"])
        self.max_rows = int(spec.get("max_rows_per_request") or default_max_rows(spec["image_shape"]))
        self.model = cvae.build(ModelConfig(**spec["model"]), tuple(spec["image_shape"]), int(spec["num_classes"]))
        state = torch.load(context.artifacts[WEIGHTS_ARTIFACT], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    def _labels(self, frame: pd.DataFrame) -> torch.Tensor | None:
        if not self.model.conditional:
            return None
        classes = f"0..{self.model.num_classes - 1} ({', '.join(self.class_names)})"
        if "label" not in frame.columns or frame["label"].isna().any():
            raise GenerationRequestError(f"every row needs a 'label': this model is conditional; "
                                         f"labels are {classes}")
        labels = [_class_id(value, self.model.num_classes) for value in frame["label"]]
        for value, label in zip(frame["label"], labels):
            if label is None:
                raise GenerationRequestError(f"label {value!r} is not valid; labels are the integer class ids "
                                             f"{classes}")
        return torch.tensor(labels, dtype=torch.long)

    def _latents(self, frame: pd.DataFrame) -> torch.Tensor:
        dim = self.model.latent_dim
        z = torch.randn(len(frame), dim)
        for row, value in enumerate(frame["z"] if "z" in frame.columns else []):
            if _is_missing(value):
                continue
            try:
                vector = np.asarray(value, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                vector = None
            if (vector is None or vector.shape[0] != dim or not np.isfinite(vector).all()
                    or (np.abs(vector) > FLOAT32_MAX).any()):
                got = ("something else" if vector is None else f"{vector.shape[0]} values" if vector.shape[0] != dim
                       else "values beyond float32's range" if np.isfinite(vector).all() else "a non-finite value")
                raise GenerationRequestError(f"z in row {row} is not valid; expected {dim} finite floats "
                                             f"(the model's latent_dim), got {got}")
            z[row] = torch.from_numpy(vector).float()
        return z

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        frame = _as_rows(model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input))
        if len(frame) > self.max_rows:
            raise GenerationRequestError(f"{len(frame)} rows requested; this generator answers at most "
                                         f"{self.max_rows} rows per request (max_rows_per_request in its "
                                         f"spec): split the request")
        labels = self._labels(frame)
        z = self._latents(frame)
        with torch.no_grad():
            images = self.model.mean_image(self.model.decode(z, labels)).float()
        bad = (~torch.isfinite(images.flatten(1))).any(dim=1).nonzero().flatten().tolist()
        if bad:  # NaN is not JSON: an answer with it would be a 200 no client can read
            raise GenerationRequestError(f"z in row(s) {', '.join(map(str, bad[:10]))} decodes to non-finite "
                                         "pixels; give latent vectors of moderate size (z ~ N(0, I))")
        return images.numpy()


# MLflow's models-from-code loader takes the model from here when it executes this file.
set_model(GeneratorModel())
