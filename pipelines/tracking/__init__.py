"""The MLflow side shared by every run: the run logger, liveness, and what the UI shows."""
