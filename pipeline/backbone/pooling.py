"""Pooling: how a spatial map (batch, height, width, channels) becomes a vector. The one definition,
used by extract (pooled caches), the cache reader (pooling at read time) and the classifier (the
same view as Keras layers inside a saved model). "none" keeps the map (flattened where a vector is
needed, row-major as Keras' Flatten), "avg" and "max" pool over height and width."""

from __future__ import annotations

from typing import Any

import numpy as np

POOLINGS = ("none", "avg", "max")
_KERAS_LAYERS = {"none": "Flatten", "avg": "GlobalAveragePooling2D", "max": "GlobalMaxPooling2D"}


def pool(maps: Any, pooling: str, ops: Any = np) -> Any:
    """Maps pooled over height and width with `ops` (NumPy, or keras.ops inside a model); "none"
    returns them unchanged."""
    if pooling == "avg":
        return ops.mean(maps, axis=(1, 2))
    if pooling == "max":
        return ops.max(maps, axis=(1, 2))
    return maps


def keras_layer(pooling: str, name: str) -> Any:
    """The Keras layer that turns a map into the vector a head of this pooling reads."""
    import keras

    return getattr(keras.layers, _KERAS_LAYERS[pooling])(name=name)
