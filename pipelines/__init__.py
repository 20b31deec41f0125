"""MLflow-tracked pipelines around the cvae core: data, training, tuning, evaluation, reproduction."""
