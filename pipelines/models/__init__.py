"""Logged models: the PyTorch model and its generator pyfunc, and finding a logged model again."""
