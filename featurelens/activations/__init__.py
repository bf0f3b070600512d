"""Activation harvesting and the on-disk activation store."""
