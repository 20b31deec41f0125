# Two commands do everything: `make run` (set up + a real training run) and `make test`.
VENV ?= .venv
PYTHON ?= python3
DATASET ?= fashion-mnist
EPOCHS ?= 20
DEVICE ?= auto
UI_PORT ?= 5000
DASHBOARD_PORT ?= 8080
OPTUNA_STORAGE ?= sqlite:///optuna.db
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
# Playwright (the browser test's driver) drives Debian's chromium; it must never fetch a browser.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1
BIN := $(abspath $(VENV))/bin
# `mlflow run --env-manager local` runs `python` from PATH: make it the virtualenv's.
export PATH := $(BIN):$(PATH)
# What DATASET needs before a run: Fashion-MNIST comes from Debian when it is not on disk.
DATASET_SETUP := $(if $(filter fashion-mnist,$(DATASET)),fashion-mnist)

# The suite runs on TEST_WORKERS processes (pytest-xdist): most tests wait on subprocesses,
# servers and SQLite, so more workers than the 2 cores CI has still pay (docs/development.md).
TEST_WORKERS ?= 4

.PHONY: run test test-fast ui dashboard fashion-mnist

# pip's output goes to a log: a few lines on success, the whole log when something fails.
$(VENV)/.installed: requirements.txt
	@echo "setting up $(VENV): the packages pinned in requirements.txt (first run only; a few minutes)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --upgrade pip > $(VENV)/pip.log 2>&1 \
	  && $(BIN)/python -m pip install --quiet -r requirements.txt >> $(VENV)/pip.log 2>&1 \
	  || { cat $(VENV)/pip.log; echo "error: installing requirements.txt failed (log above, also in $(VENV)/pip.log)"; exit 1; }
	@touch $@
	@echo "$(VENV) is ready"

run: $(VENV)/.installed $(DATASET_SETUP)
	$(BIN)/mlflow run . -e main --env-manager local -P dataset=$(DATASET) -P epochs=$(EPOCHS) -P device=$(DEVICE)

# --durations: CI's log names the slowest tests, where the next minute of the 15-minute budget is found.
test: $(VENV)/.installed fashion-mnist
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=30

# The inner loop: everything but the tests that train through real processes or start servers (`slow`).
test-fast: $(VENV)/.installed fashion-mnist
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow" -n 2 --dist loadgroup

# MLflow 3.17's UI opens experiments on its GenAI view unless "Model training" is chosen at the top
# left (it remembers the choice); the link below chooses it.
ui: $(VENV)/.installed
	@echo "runs: http://127.0.0.1:$(UI_PORT)/#/experiments/0?workflowType=machine_learning (or pick your experiment under Experiments)"
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port $(UI_PORT)

# Optuna's dashboard on the studies of `tune` (its default storage); needs the [dashboard] extra.
dashboard: $(VENV)/.installed
	$(BIN)/optuna-dashboard $(OPTUNA_STORAGE) --host 127.0.0.1 --port $(DASHBOARD_PORT)

# Debian's dataset-fashion-mnist: the offline copy of Fashion-MNIST the tests (and DATASET=fashion-mnist) use.
fashion-mnist:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || { \
	  echo "installing Debian's dataset-fashion-mnist (Fashion-MNIST, no download from the internet)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist > /dev/null; }
