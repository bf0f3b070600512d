"""Evaluating SAEs: ground-truth recovery on synthetic data (more metrics land with the eval issue)."""
