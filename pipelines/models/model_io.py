"""Logging a trained model to MLflow and loading it back."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from typing import Sequence

import mlflow.pytorch
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import Schema, TensorSpec

from cvae import CVAE
from pipelines.config import RunConfig, flatten
from pipelines.tracking.runs import REPO_ROOT, RunLogger, new_logged_model

MODEL_NAME = "model"
GENERATOR_NAME = "generator"
CLASS_NAMES_KEY = "class_names"  # in the logged model's metadata (its MLmodel file)


def signature_for(model: CVAE) -> ModelSignature:
    """Two named inputs, the image batch and its labels; the output is the decoder's batch."""
    c, h, w = model.image_shape
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, c, h, w), "x"),
                     TensorSpec(np.dtype(np.int64), (-1,), "labels")])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, c, h, w), "decoded")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example_for(model: CVAE) -> dict[str, np.ndarray]:
    c, h, w = model.image_shape
    return {"x": np.zeros((2, c, h, w), dtype=np.float32),
            "labels": np.arange(2, dtype=np.int64) % model.num_classes}


def log_model(logger: RunLogger, model: CVAE, config: RunConfig, class_names: Sequence[str]) -> ModelInfo:
    """Log as a LoggedModel (MLflow 3) linked to the logger's run, with the cvae package as code and
    the dataset's class names in its metadata (CLASS_NAMES_KEY; `generate` names its rows by them).

    The model is moved to the CPU first so it loads on machines without a GPU. The generator
    (``log_generator``) is a separate step: a study logs it for its chosen trials only.
    """
    device = next(model.parameters()).device
    cpu_model = model.to("cpu").eval()
    def log(client) -> ModelInfo:  # into the run's store now (its server's, or the spool's: see RunLogger)
        with _quiet_expected_mlflow_warnings():
            return mlflow.pytorch.log_model(
                cpu_model, name=MODEL_NAME, run_id=logger.run_id,
                model_id=new_logged_model(client, logger.run_id, MODEL_NAME, flatten(config)),
                signature=signature_for(cpu_model), input_example=input_example_for(cpu_model),
                metadata={CLASS_NAMES_KEY: [str(name) for name in class_names]},
                code_paths=[str(REPO_ROOT / "cvae")], params=flatten(config),
                serialization_format="pickle",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )

    try:
        return logger.call(log)
    finally:
        model.to(device)


def log_generator(logger: RunLogger, model: CVAE, config: RunConfig, class_names: Sequence[str]) -> ModelInfo:
    """Log the generator pyfunc (labels in, images out) as its own LoggedModel, GENERATOR_NAME,
    and tag the run with its URI (`generator_model_uri`) so `mlflow models serve` can find it."""
    import mlflow.pyfunc
    from mlflow.models import Model

    from pipelines.models import generator_model

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.pt")
        torch.save({name: tensor.cpu() for name, tensor in model.state_dict().items()}, weights)
        spec = os.path.join(tmp, "spec.json")
        with open(spec, "w") as spec_file:
            json.dump(generator_model.generator_spec(model, class_names), spec_file)
        # Model.log, not mlflow.pyfunc.log_model: only it takes an explicit run_id.
        info = logger.call(lambda client: Model.log(
            artifact_path=None, name=GENERATOR_NAME, flavor=mlflow.pyfunc, run_id=logger.run_id,
            model_id=new_logged_model(client, logger.run_id, GENERATOR_NAME, flatten(config)),
            python_model=generator_model.__file__,
            artifacts={generator_model.WEIGHTS_ARTIFACT: weights, generator_model.SPEC_ARTIFACT: spec},
            code_paths=[str(REPO_ROOT / "cvae")],
            signature=generator_model.generator_signature(model),
            input_example=generator_model.generator_input_example(model), params=flatten(config),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        ))
    logger.set_tags({"generator_model_uri": info.model_uri})
    return info


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def _quiet_expected_mlflow_warnings():
    """Drop two warnings that are expected here and would only alarm users.

    The pytorch flavour's pyfunc scores a single tensor, so MLflow cannot validate our two-input
    example (the model itself loads and runs; tests check it). Pickle is the chosen format because
    forward returns a NamedTuple, which the pt2 graph export cannot trace.
    """
    drop = _DropMessages(("Failed to validate serving input example", "Saving pytorch model by Pickle"))
    loggers = [logging.getLogger("mlflow.models.model"), logging.getLogger("mlflow.pytorch")]
    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)
