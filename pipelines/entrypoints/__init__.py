"""Command-line entry points; MLproject calls these modules with ``python -m``."""
