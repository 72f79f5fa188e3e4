"""Runs: a run directory written whole, read once, listed, scored, turned into a model."""
