"""What a person sees in a real browser: MLflow's UI over a store made by a short training run and a
smoke study, and Optuna's dashboard on that study.

Debian's chromium, headless, driven by Playwright's Python package (never a downloaded browser).
Screenshots go to test-output/browser/ (ignored by git).
"""
import contextlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, TINY_DATA, make_store
from pipelines.server_process import free_port, serving

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = REPO / "test-output" / "browser"
EPOCHS = 3
STUDY = "browse"
SERVER_START_S = 180  # `mlflow ui` on two busy cores takes a while to import and migrate its store
WAIT_MS = 60_000  # for a page element: the UI fetches runs, metrics and artifacts after loading
# MLflow 3.17's UI opens an experiment on its GenAI view unless "Model training" is picked in its
# sidebar switch (remembered by the browser) or the URL says so, as README and `make ui` do.
ML_VIEW = "workflowType=machine_learning"
# The UI's assistant panel opens itself on a first visit and would cover half of every screenshot.
CLOSED_ASSISTANT = ("try { localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                    " localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true'); } catch (e) {}")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: apt-get install chromium "
                                                                 "(.ci/run does)")]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements.txt pins it)")


@pytest.fixture(scope="module")
def browsed(tmp_path_factory, data_dir):
    """A store with a short training run and a two-trial smoke study whose best model is registered."""
    store = make_store(tmp_path_factory.mktemp("browse"), data_dir)
    done = store.cli("pipelines.entrypoints.train", *TINY_DATA, "--epochs", str(EPOCHS), "--latent-dim", "2",
                     "--hidden", "64", "--kl-weight", "1", "--patience", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    storage = f"sqlite:///{store.root / 'optuna.db'}"
    done = store.cli("pipelines.entrypoints.tune", *TINY_DATA, "--space", "smoke", "--epochs", "1", "--n-trials", "2",
                     "--study", STUDY, "--storage", storage, "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    runs = store.runs()
    (run,) = [r for r in runs if "study" not in r.data.tags]
    (parent,) = [r for r in runs if r.data.tags.get("study") == STUDY and "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    best = next(r for r in trials if r.info.run_id == parent.data.tags["best_run_id"])
    return SimpleNamespace(store=store, run=run, parent=parent, trials=trials, best=best, storage=storage,
                           experiment_id=run.info.experiment_id)


@pytest.fixture(scope="module")
def mlflow_ui(browsed):
    port = free_port()
    env = {**browsed.store.env, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", browsed.store.uri,
               "--host", "127.0.0.1", "--port", str(port)]
    with serving(command, f"http://127.0.0.1:{port}/health", browsed.store.root / "mlflow-ui.log", SERVER_START_S, env):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def dashboard(browsed):
    port = free_port()
    executable = Path(sys.executable).parent / "optuna-dashboard"
    command = [str(executable), browsed.storage, "--host", "127.0.0.1", "--port", str(port)]
    with serving(command, f"http://127.0.0.1:{port}/dashboard/", browsed.store.root / "optuna-dashboard.log",
                 SERVER_START_S, browsed.store.env):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.add_init_script(CLOSED_ASSISTANT)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def runs_table(page, url: str, experiment_id: str):
    page.goto(f"{url}/#/experiments/{experiment_id}?{ML_VIEW}")
    page.get_by_role("columnheader", name="Run Name").first.wait_for()
    return page


def test_the_experiment_opens_on_the_runs_table_with_name_dataset_source_and_models(page, mlflow_ui, browsed):
    experiment = browsed.store.client.get_experiment(browsed.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs_table(page, mlflow_ui, browsed.experiment_id)
    assert "/runs" in page.url  # the runs table, not the GenAI overview
    row = page.locator(".ag-row", has=page.get_by_role("link", name="mlp z=2 β=1", exact=True))
    row.wait_for()
    page.get_by_role("columnheader", name="Models").first.wait_for()
    page.get_by_role("link", name="generator").first.wait_for()  # the Models column: the run's LoggedModels
    # The grid draws a row in parts (pinned name column, the rest): join the parts of this row.
    index = row.first.get_attribute("row-index")
    text = " ".join(page.locator(f".ag-row[row-index='{index}']").all_inner_texts())
    assert "fashion-mnist (" in text  # the Dataset column: the splits logged as dataset inputs
    assert "train.py" in text  # the Source column
    screenshot(page, "runs-table")


def test_the_study_parent_run_nests_its_trials(page, mlflow_ui, browsed):
    runs_table(page, mlflow_ui, browsed.experiment_id)
    parent_cell = page.locator("[role=gridcell]", has=page.get_by_role("link", name=STUDY, exact=True))
    parent_cell.locator("button").first.click()  # expand the parent's child runs
    for trial in browsed.trials:
        assert trial.info.run_name.startswith(f"trial-{trial.data.tags['trial_number']} · ")
        page.get_by_role("link", name=trial.info.run_name, exact=True).wait_for()
    screenshot(page, "study-trials")


def test_a_runs_val_loss_chart_has_a_point_per_epoch(page, mlflow_ui, browsed):
    run = browsed.run
    page.goto(f"{mlflow_ui}/#/experiments/{browsed.experiment_id}/runs/{run.info.run_id}/model-metrics?{ML_VIEW}")
    page.get_by_placeholder("Search metric charts").fill("val/loss")
    page.get_by_text(f"{run.info.run_name} (val/loss)").wait_for()  # the legend: this run's val/loss
    page.get_by_text("Step", exact=True).first.wait_for()  # the x axis: epochs are the steps
    (chart,) = page.locator(".js-plotly-plot").all()  # the search left this one chart
    line = chart.locator("path.js-line").first
    line.wait_for(state="attached")
    path = line.get_attribute("d")
    assert path.count("L") + 1 == EPOCHS, path  # one point per epoch, joined by a line
    screenshot(page, "val-loss-chart")


def _decoded_size(image) -> list[int]:
    image.wait_for()
    page = image.page
    page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=image.element_handle())
    return image.evaluate("i => [i.naturalWidth, i.naturalHeight]")


def test_the_latent_scatter_figure_is_shown(page, mlflow_ui, browsed):
    client = browsed.store.client
    for run in (browsed.run, browsed.best):
        figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
        if run is browsed.best and "figures/latent_scatter_test.png" not in figures:
            continue  # trials record figures only when the study chooses them; this one was not
        page.goto(f"{mlflow_ui}/#/experiments/{browsed.experiment_id}/runs/{run.info.run_id}"
                  f"/artifacts/figures/latent_scatter_test.png?{ML_VIEW}")
        width, height = _decoded_size(page.locator("img").first)
        assert width > 0 and height > 0
    screenshot(page, "latent-scatter")


def test_the_run_description_shows_metrics_links_and_the_scatter(page, mlflow_ui, browsed):
    run = browsed.run
    page.goto(f"{mlflow_ui}/#/experiments/{browsed.experiment_id}/runs/{run.info.run_id}?{ML_VIEW}")
    page.get_by_text("test negative ELBO").wait_for()
    with contextlib.suppress(sync_api.TimeoutError):
        page.get_by_text("Show more", exact=True).click(timeout=5000)
    page.get_by_role("link", name="loss curves").wait_for()
    width, _ = _decoded_size(page.locator("img[src*='latent_scatter_test.png']").first)
    assert width > 0
    page.get_by_text("fashion-mnist (").first.wait_for()  # the Datasets section
    screenshot(page, "run-overview")


def test_the_registered_best_model_is_listed_with_its_alias(page, mlflow_ui, browsed):
    page.goto(f"{mlflow_ui}/#/models/{STUDY}?{ML_VIEW}")
    page.get_by_role("link", name="Version 1").wait_for()
    page.get_by_text("@ best").first.wait_for()
    assert browsed.best.info.run_id in page.inner_text("body")  # the version's mlflow_run_id tag
    screenshot(page, "registered-model")


def test_optuna_dashboard_serves_the_study(page, dashboard, browsed):
    page.goto(f"{dashboard}/dashboard/")
    page.get_by_text(f"1. {STUDY}").click()
    page.get_by_text(f"{STUDY} (id=1)").wait_for()
    page.get_by_text(f"Best Trial (number={browsed.parent.data.tags['best_trial_number']})").wait_for()
    screenshot(page, "optuna-dashboard")
