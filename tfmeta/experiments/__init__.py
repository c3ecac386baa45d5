"""Reproductions of the papers' experiments, runnable from `tools/`."""
