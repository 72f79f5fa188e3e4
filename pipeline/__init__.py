"""A two-stage bottleneck-feature pipeline for transfer-learning image classification."""

__version__ = "0.1.0"
