"""The symmetries of a square image: random ones while training (`--flip dihedral`), and fixed
views averaged at test time (`--tta`).

The dihedral group of the square has eight elements: every one is a transpose or not, then a
horizontal flip or not, then a vertical flip or not. Images without an orientation (solar cells,
micrographs, satellite tiles) are the same class in all eight; photos are not (an upside-down
shoe), and get at most the horizontal flip. Images are square here: the pipeline squashes every
image to N x N before the backbone, so a transpose keeps the shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

TTA = ("none", "flip", "dihedral")  # --tta: 1, 2 or 8 views


def view_transforms(tta: str) -> list[Callable[[np.ndarray], np.ndarray]]:
    """The fixed views of `tta` on (batch, N, N, channels) arrays, the identity first."""
    if tta not in TTA:
        from pipeline.errors import PipelineError

        raise PipelineError(f"--tta {tta!r}: choose from {', '.join(TTA)}")

    def identity(x: np.ndarray) -> np.ndarray:
        return x

    def mirror(x: np.ndarray) -> np.ndarray:
        return x[:, :, ::-1]

    if tta == "none":
        return [identity]
    if tta == "flip":
        return [identity, mirror]
    views = []
    for transpose in (False, True):
        for horizontal in (False, True):
            for vertical in (False, True):
                def view(x: np.ndarray, t: bool = transpose, h: bool = horizontal, v: bool = vertical) -> np.ndarray:
                    x = np.swapaxes(x, 1, 2) if t else x
                    x = x[:, :, ::-1] if h else x
                    return x[:, ::-1] if v else x
                views.append(view)
    return views


def averaged(predict: Callable[[np.ndarray], Any], images: np.ndarray, tta: str) -> np.ndarray:
    """The model's probabilities averaged over the views of `tta` (one batch of N x N images)."""
    images = np.asarray(images)
    views = view_transforms(tta)
    total = None
    for view in views:
        probabilities = np.asarray(predict(np.ascontiguousarray(view(images))), np.float64)
        total = probabilities if total is None else total + probabilities
    return total / len(views)


def random_transpose_layer(seed: int) -> Any:
    """A Keras layer that transposes each image of a batch with probability one half: with random
    horizontal and vertical flips, every element of the dihedral group is equally likely. Used in
    the training data pipeline only (tf.data), never saved in a model."""
    import keras
    import tensorflow as tf

    class RandomTranspose(keras.layers.Layer):
        def __init__(self, seed: int) -> None:
            super().__init__(name="random_transpose")
            self.seed = seed

        def call(self, images: Any, training: bool = True) -> Any:
            if not training:
                return images
            chosen = tf.random.uniform((tf.shape(images)[0],), seed=self.seed) < 0.5
            return tf.where(chosen[:, None, None, None], tf.transpose(images, (0, 2, 1, 3)), images)

        def compute_output_shape(self, shape: Any) -> Any:
            return shape

    return RandomTranspose(seed)
