"""Finding a logged CVAE from what a user types: ``models:/<model_id>``, ``models:/NAME@alias``,
``models:/NAME/<version>``, or the id of the run that trained it; and loading it with the
configuration it was trained with."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.config import RunConfig, from_params
from pipelines.errors import UserError
from pipelines.models.model_io import CLASS_NAMES_KEY, GENERATOR_NAME, MODEL_NAME

ACCEPTED_FORMS = "models:/<model_id>, models:/NAME@alias, models:/NAME/<version>, or a run id"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class ResolvedModel:
    model_uri: str  # loadable by mlflow.pytorch.load_model
    model_id: str | None  # the LoggedModel, when there is one
    source_run_id: str | None  # the training run
    config: RunConfig


def _invalid(spec: str, reason: str) -> UserError:
    return UserError(f"model_uri={spec!r} is not valid: {reason}; expected {ACCEPTED_FORMS}")


def _model_id_of_run(client: MlflowClient, run_id: str, spec: str) -> str:
    """The run's `model_uri` tag, else the LoggedModel named MODEL_NAME among its outputs."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise _invalid(spec, "no run has this id") from None
    tagged = run.data.tags.get("model_uri", "")
    if tagged.startswith("models:/"):
        return tagged[len("models:/"):]
    outputs = run.outputs.model_outputs if run.outputs else []
    for output in outputs:
        if client.get_logged_model(output.model_id).name == MODEL_NAME:
            return output.model_id
    raise _invalid(spec, f"run {run_id} logged no model named {MODEL_NAME!r}")


def _registered_version(client: MlflowClient, name_part: str, spec: str):
    try:
        if "@" in name_part:
            name, alias = name_part.rsplit("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, version = name_part.split("/", 1)
        return client.get_model_version(name, version)
    except MlflowException as error:
        raise _invalid(spec, str(error).splitlines()[0]) from None


def _logged_model_id_in(source: str | None) -> str | None:
    """'models:/m-…' -> 'm-…' (some stores keep a version's LoggedModel only in its source)."""
    if not source or not source.startswith("models:/"):
        return None
    rest = source[len("models:/"):]
    return rest if rest and "/" not in rest and "@" not in rest else None


def resolve_model(spec: str, client: MlflowClient | None = None) -> ResolvedModel:
    """Where the model is and how it was configured; a UserError naming ``model_uri`` otherwise."""
    client = client or MlflowClient()
    spec = (spec or "").strip()
    if not spec:
        raise UserError(f"model_uri is required; give {ACCEPTED_FORMS}")
    if _RUN_ID.match(spec):
        model_id = _model_id_of_run(client, spec, spec)
    elif spec.startswith("models:/"):
        rest = spec[len("models:/"):]
        if "@" in rest or "/" in rest:
            version = _registered_version(client, rest, spec)
            model_id = version.model_id or _logged_model_id_in(version.source)
            if not model_id:  # registered from a run's artifacts, before LoggedModels
                run_params = client.get_run(version.run_id).data.params
                return ResolvedModel(spec, None, version.run_id, from_params(run_params))
        else:
            model_id = rest
    else:
        raise _invalid(spec, "unrecognised form")
    try:
        logged = client.get_logged_model(model_id)
    except MlflowException:
        raise _invalid(spec, f"no logged model has id {model_id!r}") from None
    if logged.name == GENERATOR_NAME:
        raise _invalid(spec, f"{logged.model_id} is the generator pyfunc of run {logged.source_run_id}; "
                             f"pass that run's {MODEL_NAME!r} (its model_uri tag) or the run id")
    if logged.name != MODEL_NAME:  # e.g. the judge classifier: its params say nothing of a cVAE
        raise _invalid(spec, f"{logged.model_id} is the {logged.name!r} model of run {logged.source_run_id}, "
                             f"not a cVAE (a {MODEL_NAME!r} logged by train or a study trial)")
    return ResolvedModel(f"models:/{model_id}", model_id, logged.source_run_id, from_params(logged.params))


def load_cvae(resolved: ResolvedModel, device: torch.device):
    """The model on ``device``; a UserError naming the model and where its files should be when
    they cannot be read (artifacts deleted, moved, or of another store)."""
    import mlflow.pytorch

    try:
        model = mlflow.pytorch.load_model(resolved.model_uri, map_location=device)
    except (MlflowException, OSError) as error:
        where = ""
        if resolved.model_id:
            where = f" at {MlflowClient().get_logged_model(resolved.model_id).artifact_location}"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"model {resolved.model_uri} (run {resolved.source_run_id}) cannot be loaded: its files "
                        f"are missing or unreadable{where} ({reason})") from None
    return model.to(device).eval()


def class_names_of(resolved: ResolvedModel, num_classes: int) -> list[str]:
    """The class names logged in the model's metadata. A model logged before they were there was
    trained on one of the built-in datasets: that dataset's names; failing both, the class ids."""
    from mlflow.models import get_model_info

    from pipelines.data import DATASETS

    try:
        names = (get_model_info(resolved.model_uri).metadata or {}).get(CLASS_NAMES_KEY)
    except (MlflowException, OSError):
        names = None
    if not names:
        known = DATASETS.get(resolved.config.data.dataset)
        names = known.classes if known else None
    if not names or len(names) != num_classes:
        return [str(k) for k in range(num_classes)]
    return [str(name) for name in names]
