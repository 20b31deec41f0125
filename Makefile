# Two commands do everything: `make run` (set up + a real training run) and `make test`.
VENV ?= .venv
PYTHON ?= python3
DATASET ?= mnist
EPOCHS ?= 20
DEVICE ?= auto
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
BIN := $(abspath $(VENV))/bin
# `mlflow run --env-manager local` runs `python` from PATH: make it the virtualenv's.
export PATH := $(BIN):$(PATH)

.PHONY: run test ui fashion-mnist tune

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	touch $@

run: $(VENV)/.installed
	$(BIN)/mlflow run . -e main --env-manager local -P dataset=$(DATASET) -P epochs=$(EPOCHS) -P device=$(DEVICE)

test: $(VENV)/.installed fashion-mnist
	$(BIN)/python -m pytest

ui: $(VENV)/.installed
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI)

# Debian's dataset-fashion-mnist: the offline copy of Fashion-MNIST the tests use.
fashion-mnist:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }
