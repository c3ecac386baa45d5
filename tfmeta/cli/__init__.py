"""Command-line entry points (also runnable from `tools/`)."""
