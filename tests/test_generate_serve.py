"""`generate` through `mlflow run -e generate`, and the generator pyfunc served by a real
`mlflow models serve` process on loopback."""
from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_RUN_LATENT_DIM, assert_no_running, in_process_on
from pipelines.entrypoints.generate import GRID_ARTIFACT, GRID_PADDING
from pipelines.entrypoints.generate import main as generate_main
from pipelines.models.generator_model import GenerationRequestError, GeneratorModel, default_max_rows, generator_spec
from pipelines.server_process import free_port, serving

LATENT_DIM = SHARED_RUN_LATENT_DIM
TILE = 28 + GRID_PADDING
SERVE_START_TIMEOUT_S = 90
DEFAULT_MAX_ROWS = 1000  # 1x28x28 images per request, by default


def _grid_size(rows: int, columns: int) -> tuple[int, int]:
    return columns * TILE + GRID_PADDING, rows * TILE + GRID_PADDING  # PIL's (width, height)


@pytest.mark.slow
def test_generate_logs_a_grid_with_a_row_per_label(conditional_run, tmp_path):
    output = tmp_path / "grid.png"
    done = conditional_run.store.mlflow_run("generate", {"model_uri": conditional_run.run.info.run_id, "labels": "0,1,2",
                                                 "n": "8", "output": str(output)})
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = conditional_run.store.runs("tags.generated_from != ''")
    assert run.info.status == "FINISHED"
    assert run.data.tags["generated_from"] == conditional_run.run.data.tags["model_uri"]
    logged = Path(conditional_run.store.client.download_artifacts(run.info.run_id, GRID_ARTIFACT, str(tmp_path)))
    assert logged.read_bytes() == output.read_bytes()
    with Image.open(logged) as image:
        assert image.size == _grid_size(rows=3, columns=8)
        pixels = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    tiles = [pixels[GRID_PADDING + r * TILE: (r + 1) * TILE, GRID_PADDING + c * TILE: (c + 1) * TILE]
             for r in range(3) for c in range(8)]
    assert all(t.shape == (28, 28) and t.std() > 0 for t in tiles)  # images, not blank padding


@pytest.mark.slow
def test_generate_rejects_a_label_outside_the_classes_in_one_line(conditional_run, monkeypatch, capsys):
    with in_process_on(conditional_run.store, monkeypatch, capsys) as run:
        code, stderr = run(generate_main, "--model-uri", conditional_run.run.info.run_id, "--labels", "3,10")
    assert code == 2
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: labels='3,10' is not valid: '10' is not a class of this model; expected "
                      "comma-separated class ids 0..9 (T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, "
                      "Shirt, Sneaker, Bag, Ankle boot)"], stderr[-2000:]
    assert "Traceback" not in stderr
    assert_no_running(conditional_run.store)


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_labels_with_images(conditional_run, tmp_path):
    import mlflow.pytorch

    generator_uri = conditional_run.run.data.tags["generator_model_uri"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", generator_uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]
    with serving(command, f"{url}/ping", tmp_path / "serve.log", SERVE_START_TIMEOUT_S,
                 conditional_run.store.env, conditional_run.store.root):
        status, body = _post(f"{url}/invocations", {"dataframe_records": [{"label": 3}, {"label": 9}]})
        assert status == 200, body
        images = np.asarray(body["predictions"], dtype=np.float64)
        assert images.shape == (2, 1, 28, 28)
        assert images.min() >= 0.0 and images.max() <= 1.0

        z = [[0.5, -1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]]
        status, body = _post(f"{url}/invocations",
                             {"dataframe_records": [{"label": 3, "z": z[0]}, {"label": 7, "z": z[1]}]})
        assert status == 200, body
        served = torch.tensor(body["predictions"], dtype=torch.float32)
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(conditional_run.store.uri)
        try:
            model = mlflow.pytorch.load_model(conditional_run.run.data.tags["model_uri"], map_location="cpu").eval()
        finally:
            mlflow.set_tracking_uri(previous)
        with torch.no_grad():
            expected = model.mean_image(model.decode(torch.tensor(z), torch.tensor([3, 7])))
        torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-5)  # the same decoder, served

        status, body = _post(f"{url}/invocations", {"dataframe_records": [{"label": 10}]})
        assert status == 400 and "label 10 is not valid; labels are the integer class ids 0..9" in body["message"], body
        for label in (3.5, "3", True):  # refused, not truncated or cast to 3 or 1
            status, body = _post(f"{url}/invocations", {"dataframe_records": [{"label": 1}, {"label": label}]})
            assert status == 400 and f"label {label!r} is not valid" in body["message"], (label, body)
        status, body = _post(f"{url}/invocations", {"dataframe_records": [{"label": 3.0}]})
        assert status == 200 and np.asarray(body["predictions"]).shape == (1, 1, 28, 28), body
        status, body = _post(f"{url}/invocations", {"dataframe_records": [{"label": 0}] * (DEFAULT_MAX_ROWS + 1)})
        assert status == 400 and (f"{DEFAULT_MAX_ROWS + 1} rows requested; this generator answers at most "
                                  f"{DEFAULT_MAX_ROWS} rows per request") in body["message"], body
        status, body = _post(f"{url}/invocations", {"dataframe_records": [{"label": 1, "z": [0.0]}]})
        assert status == 400 and f"expected {LATENT_DIM} finite floats" in body["message"], body


@pytest.mark.parametrize("output, reason", [
    ("/proc/grid.png", "cannot write there: No such file or directory (/proc)"),
    (".", "it is a directory: expected a file path, e.g. grid.png"),
])
def test_generate_rejects_an_unwritable_output_before_anything_is_loaded_or_logged(store, in_process, output, reason):
    # The model is not even looked up: the output is checked first, so no run can be half-written.
    code, stderr = in_process(generate_main, "--model-uri", "models:/never-looked-up", "--output", output)
    assert code == 2, stderr[-2000:]
    assert stderr.strip() == f"error: output={output!r} is not valid; {reason}", stderr[-2000:]
    assert store.runs() == []


@pytest.fixture
def generator(tmp_path):
    """The generator pyfunc as MLflow loads it (load_context on its artifacts), for a tiny model."""
    import json
    from types import SimpleNamespace

    import cvae
    from cvae import ModelConfig

    model = cvae.build(ModelConfig(latent_dim=2, hidden=(8,)), (1, 28, 28), 10)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    spec = generator_spec(model, [str(k) for k in range(10)], max_rows_per_request=5)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    loaded = GeneratorModel()
    loaded.load_context(SimpleNamespace(artifacts={"weights": str(tmp_path / "weights.pt"),
                                                   "spec": str(tmp_path / "spec.json")}, model_config={}))
    return loaded


def test_generator_takes_integer_labels_only(generator):
    import pandas as pd

    assert generator.predict(None, pd.DataFrame({"label": [3, 7]})).shape == (2, 1, 28, 28)
    assert generator.predict(None, pd.DataFrame({"label": [3.0]})).shape == (1, 1, 28, 28)
    for bad in (3.5, "3", True, float("inf"), -1, 10):
        with pytest.raises(GenerationRequestError, match=f"label {bad!r} is not valid; labels are the integer"):
            generator.predict(None, pd.DataFrame({"label": pd.Series([1, bad], dtype=object)}))
    with pytest.raises(GenerationRequestError, match="z in row 0 is not valid; expected 2 finite floats"):
        generator.predict(None, pd.DataFrame({"label": [1], "z": [["a", "b"]]}))


def test_generator_caps_the_rows_per_request_at_its_setting(generator):
    import pandas as pd

    assert generator.predict(None, pd.DataFrame({"label": [0] * 5})).shape[0] == 5
    with pytest.raises(GenerationRequestError, match=r"^6 rows requested; this generator answers at most 5 rows "
                                                     r"per request \(max_rows_per_request in its spec\)"):
        generator.predict(None, pd.DataFrame({"label": [0] * 6}))


@pytest.fixture(scope="module")
def scoring_app(tmp_path_factory):
    """MLflow's own scoring path (what `mlflow models serve` runs for /invocations: parsing each
    request form, enforcing the signature, predicting) on the generator pyfunc of a tiny model,
    saved and loaded by MLflow, in-process; its MlflowException is the server's HTTP 400."""
    import json

    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    import cvae
    from cvae import ModelConfig
    from pipelines.models import generator_model

    tmp = tmp_path_factory.mktemp("scoring")
    torch.manual_seed(0)
    model = cvae.build(ModelConfig(latent_dim=2, hidden=(8,)), (1, 28, 28), 10)
    torch.save(model.state_dict(), tmp / "weights.pt")
    (tmp / "spec.json").write_text(json.dumps(generator_spec(model, [str(k) for k in range(10)])))
    mlflow.pyfunc.save_model(tmp / "generator", python_model=generator_model.__file__,
                             artifacts={generator_model.WEIGHTS_ARTIFACT: str(tmp / "weights.pt"),
                                        generator_model.SPEC_ARTIFACT: str(tmp / "spec.json")},
                             code_paths=[str(Path(cvae.__file__).parent)],
                             signature=generator_model.generator_signature(model))
    loaded = mlflow.pyfunc.load_model(str(tmp / "generator"))
    schema = loaded.metadata.get_input_schema()

    def no_constants(name: str):
        raise AssertionError(f"the answer holds {name}, which is not JSON")

    def post(payload: dict) -> tuple[int, dict]:
        try:
            answer = scoring_server.invocations(json.dumps(payload), "application/json", loaded, schema)
        except MlflowException as error:  # what the server answers with HTTP 400
            return 400, {"message": error.message}
        return answer.status, json.loads(answer.response, parse_constant=no_constants)

    return post


def test_every_mlflow_request_form_gets_the_same_images(scoring_app):
    z = [[0.5, -1.0], [0.0, 2.0]]
    forms = [{"dataframe_records": [{"label": 3, "z": z[0]}, {"label": 9, "z": z[1]}]},
             {"dataframe_split": {"columns": ["label", "z"], "data": [[3, z[0]], [9, z[1]]]}},
             {"instances": [{"label": 3, "z": z[0]}, {"label": 9, "z": z[1]}]},
             {"inputs": [{"label": 3, "z": z[0]}, {"label": 9, "z": z[1]}]},
             {"inputs": {"label": [3, 9], "z": z}},
             {"inputs": {"label": [3.0, 9.0], "z": z}}]  # 3.0 as some clients write 3, like generate --labels
    answers = []
    for payload in forms:
        status, body = scoring_app(payload)
        assert status == 200, (payload, body)
        answers.append(np.asarray(body["predictions"]))
    assert answers[0].shape == (2, 1, 28, 28)
    for answer in answers[1:]:
        np.testing.assert_array_equal(answer, answers[0])
    status, body = scoring_app({"inputs": {"label": [3, 9]}})  # z drawn: two images still
    assert status == 200 and np.asarray(body["predictions"]).shape == (2, 1, 28, 28)


def test_a_latent_that_would_decode_to_nan_is_refused_not_answered(scoring_app, generator):
    import pandas as pd

    for payload in ({"dataframe_records": [{"label": 3, "z": [1e39, 0.0]}]}, {"inputs": {"label": [3], "z": [[1e39, 0]]}}):
        status, body = scoring_app(payload)
        assert status == 400 and ("z in row 0 is not valid; expected 2 finite floats (the model's latent_dim), got "
                                  "values beyond float32's range") in body["message"], body
    with torch.no_grad():
        next(generator.model.decoder.parameters()).fill_(float("nan"))  # any route to non-finite pixels
    with pytest.raises(GenerationRequestError, match=r"^z in row\(s\) 0, 1 decodes to non-finite pixels"):
        generator.predict(None, pd.DataFrame({"label": [1, 2]}))


def test_the_default_row_cap_holds_the_same_pixel_values_for_every_image_shape():
    assert default_max_rows((1, 28, 28)) == DEFAULT_MAX_ROWS
    assert default_max_rows((3, 32, 32)) == 255 and default_max_rows((3, 64, 64)) == 63
    assert default_max_rows((3, 4000, 4000)) == 1  # never 0


# --- a colour model: 3 x 20 x 24, three classes, names from its metadata --------------------------------

COLOUR_SHAPE = (3, 20, 24)
COLOUR_CLASSES = ("cat", "dog", "a bird with a long name")


def colour_model():
    import cvae
    from cvae import ModelConfig

    torch.manual_seed(0)
    model = cvae.build(ModelConfig(arch="conv", channels=(4, 8), latent_dim=2, conditioning="decoder"),
                       COLOUR_SHAPE, len(COLOUR_CLASSES)).eval()
    with torch.no_grad():
        model.decoder.out.bias.copy_(torch.tensor([2.0, 0.0, -2.0]))  # red, mid green, little blue
    return model


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory, data_dir):
    """A run that logged a colour model and its generator as training does (log_model, log_generator),
    its configuration naming MNIST: so the names below can only come from the logged metadata."""
    from types import SimpleNamespace

    from conftest import make_store
    from pipelines.config import RunConfig
    from pipelines.models.model_io import log_generator, log_model
    from pipelines.tracking.runs import entry_point_run

    store = make_store(tmp_path_factory.mktemp("colour"), data_dir)
    model = colour_model()
    config = RunConfig(model=model.config)
    with pytest.MonkeyPatch.context() as monkeypatch, in_process_on(store, monkeypatch):
        with entry_point_run(run_name="colour") as logger:
            info = log_model(logger, model, config, COLOUR_CLASSES)
            logger.set_tags({"model_uri": info.model_uri})
            log_generator(logger, model, config, COLOUR_CLASSES)
    (run,) = store.runs()
    return SimpleNamespace(store=store, run=run, model=model)


def test_generate_writes_a_colour_png_named_by_the_logged_classes(colour_run, monkeypatch, capsys, tmp_path):
    run_id = colour_run.run.info.run_id
    output = tmp_path / "grid.png"
    with in_process_on(colour_run.store, monkeypatch, capsys) as run:
        code, stderr = run(generate_main, "--model-uri", run_id, "--labels", "0,2", "--n", "4", "--output", str(output))
        assert code == 0, stderr[-2000:]
        refused, refusal = run(generate_main, "--model-uri", run_id, "--labels", "3")
    c, h, w = COLOUR_SHAPE
    with Image.open(output) as image:
        assert image.mode == "RGB" and image.size == (4 * (w + GRID_PADDING) + GRID_PADDING,
                                                      2 * (h + GRID_PADDING) + GRID_PADDING)
        pixels = np.asarray(image, dtype=np.float64) / 255.0
    tile = pixels[GRID_PADDING: GRID_PADDING + h, GRID_PADDING: GRID_PADDING + w]
    red, green, blue = tile.reshape(-1, 3).mean(axis=0)
    assert red > green + 0.2 and green > blue + 0.2  # the model's colours, not grey
    assert refused == 2 and refusal.strip().endswith(
        "expected comma-separated class ids 0..2 (cat, dog, a bird with a long name)"), refusal[-2000:]


def test_the_colour_generator_loads_through_mlflow_with_its_shape_in_the_signature(colour_run, monkeypatch):
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.pyfunc import scoring_server

    with in_process_on(colour_run.store, monkeypatch):
        loaded = mlflow.pyfunc.load_model(colour_run.run.data.tags["generator_model_uri"])
    (output,) = loaded.metadata.get_output_schema().inputs
    assert output.shape == (-1, *COLOUR_SHAPE)
    z = [[0.5, -1.0], [0.0, 2.0]]
    images = loaded.predict(pd.DataFrame({"label": [0, 2], "z": z}))
    with torch.no_grad():
        expected = colour_run.model.mean_image(colour_run.model.decode(torch.tensor(z), torch.tensor([0, 2])))
    torch.testing.assert_close(torch.from_numpy(images), expected)
    answer = scoring_server.invocations(json.dumps({"inputs": {"label": [1, 2, 0]}}), "application/json", loaded,
                                        loaded.metadata.get_input_schema())
    assert answer.status == 200 and np.asarray(json.loads(answer.response)["predictions"]).shape == (3, *COLOUR_SHAPE)
    assert loaded.unwrap_python_model().max_rows == default_max_rows(COLOUR_SHAPE) == 544


@pytest.mark.slow
def test_mlflow_models_serve_answers_for_a_colour_model(colour_run, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", colour_run.run.data.tags["generator_model_uri"],
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with serving(command, f"{url}/ping", tmp_path / "serve.log", SERVE_START_TIMEOUT_S, colour_run.store.env,
                 colour_run.store.root):
        status, body = _post(f"{url}/invocations", {"dataframe_records": [{"label": 2}, {"label": 0}]})
        assert status == 200, body
        images = np.asarray(body["predictions"], dtype=np.float64)
        assert images.shape == (2, *COLOUR_SHAPE) and images.min() >= 0.0 and images.max() <= 1.0
        status, body = _post(f"{url}/invocations", {"dataframe_records": [{"label": 3}]})
        assert status == 400 and ("labels are the integer class ids 0..2 (cat, dog, a bird with a long name)"
                                  in body["message"]), body
