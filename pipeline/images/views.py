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


def view_steps(tta: str) -> list[tuple[bool, bool, bool]]:
    """Each view of `tta` as (transpose, horizontal flip, vertical flip), applied in that order,
    the identity first: the one definition of the views and their order, which the NumPy views
    below, the Keras layers of `with_averaged_views` and the SavedModel's TensorFlow ops follow."""
    if tta not in TTA:
        from pipeline.errors import PipelineError

        raise PipelineError(f"--tta {tta!r}: choose from {', '.join(TTA)}")
    if tta == "none":
        return [(False, False, False)]
    if tta == "flip":
        return [(False, False, False), (False, True, False)]
    return [(t, h, v) for t in (False, True) for h in (False, True) for v in (False, True)]


def view_transforms(tta: str) -> list[Callable[[np.ndarray], np.ndarray]]:
    """The fixed views of `tta` on (batch, N, N, channels) arrays, the identity first."""
    views = []
    for transpose, horizontal, vertical in view_steps(tta):
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


def averaged_by_image(predict: Callable[[np.ndarray], Any], source: Any, image_size: int, batch_size: int,
                      tta: str) -> dict[int, np.ndarray]:
    """Every readable image of `source` (an EncodedImages) decoded and resized as extract does,
    its probabilities averaged over the views of `tta`, by its index in `source`; an image that
    cannot be read has no entry (its reason: source.failure_reason)."""
    rows: dict[int, np.ndarray] = {}
    for indices, batch in source.batches(image_size, batch_size):
        indices = np.asarray(indices).tolist()
        for index, row in zip(indices, averaged(predict, np.asarray(batch), tta)[:len(indices)]):
            rows[index] = row
    return rows


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


def with_averaged_views(model: Any, tta: str, image_size: int, resize: bool = True) -> Any:
    """`model` averaging its probabilities over the views of `tta`, in Keras' own layers only (so
    an export holding it loads with Keras alone, and converts to TFLite and ONNX): the same views
    in the same order as `view_transforms`, taken of the N x N image. A transpose is a Permute; a
    flip is a Permute, a fixed Dense whose kernel is the reversing permutation (1 and 0: the
    products and sums are exact in float32), and the Permute back; the views' probabilities are
    averaged by an Average layer.

    resize True: `model` takes pixels of any size (the classifier with its resize); the result too:
    it resizes by extract's rule first, and `model`'s own resize leaves the N x N views as they are
    (exactly: area and bilinear at scale 1 copy their input). resize False: `model` takes N x N
    pixels already squashed (the form for TFLite and ONNX); the result too. tta "none": `model`."""
    import keras

    steps = view_steps(tta)  # refuses an unknown name
    if tta == "none":
        return model
    n = image_size
    pixels = keras.Input((None, None, 3) if resize else (n, n, 3), name="pixels", dtype="float32")
    if resize:
        from pipeline.images.keras_resize import resize_like_extract_layers

        square = resize_like_extract_layers(pixels, n)
    else:
        square = pixels
    reverse = np.eye(n, dtype=np.float32)[::-1]
    flips = {}
    for axis in ("width", "height"):
        flips[axis] = keras.layers.Dense(n, use_bias=False, trainable=False, name=f"view_reverse_{axis}",
                                         dtype="float32")
        flips[axis].build((None, n))
        flips[axis].set_weights([reverse])
    counter = iter(range(1_000))

    def permute(x: Any, order: tuple[int, int, int]) -> Any:
        return keras.layers.Permute(order, name=f"view_permute_{next(counter)}", dtype="float32")(x)

    def flipped(x: Any, axis: str) -> Any:  # (batch, H, W, C): the width is axis 2, the height axis 1
        order = (1, 3, 2) if axis == "width" else (3, 2, 1)  # the flipped axis last, then back
        return permute(flips[axis](permute(x, order)), order)

    views = []
    for transpose, horizontal, vertical in steps:
        x = permute(square, (2, 1, 3)) if transpose else square
        x = flipped(x, "width") if horizontal else x
        views.append(flipped(x, "height") if vertical else x)
    probabilities = keras.layers.Average(name=f"averaged_views_{tta}", dtype="float32")([model(v) for v in views])
    return keras.Model(pixels, probabilities, name=f"{model.name}_tta_{tta}")
