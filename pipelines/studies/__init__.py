"""Optuna studies: settings, storage, the trials' MLflow runs, chosen trials, worker processes."""
