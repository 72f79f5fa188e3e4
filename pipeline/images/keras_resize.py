"""The resize rule as Keras layers (area when both sides shrink, bilinear otherwise): the classifier
takes pixels of any size through them (runs/classifier.py), and so do the test-time views that
resize first (images/views.py). Keras' own layers only, so an exported model needs no package."""

from __future__ import annotations

from typing import Any

import keras


def resize_like_extract_layers(pixels: Any, image_size: int) -> Any:
    """The Keras twin of decode_tf.resize_like_extract, in Keras' own layers (no Lambda, nothing of
    this package): area averaging when both sides are at least `image_size`, bilinear otherwise.

    Both resizes are computed and one is kept by a switch that is exactly 0 or 1, read from the
    input's shape without arithmetic: a map of ones is zero-padded by N rows below and its top N - 1
    rows cropped off; what is left holds a one (its maximum is 1) exactly when the input has a row
    N - 1, that is a height of at least N; the same for the width. Maxima of zeros and ones are
    exact at every size (an average of the map was not: float32 sums stop growing at 2^24)."""
    n = image_size
    kept = [keras.layers.Resizing(n, n, interpolation=method, name=f"resize_{method}", dtype="float32")(pixels)
            for method in ("area", "bilinear")]
    ones = keras.layers.Rescaling(0.0, offset=1.0, name="resize_ones", dtype="float32")(pixels)
    switches = []
    for axis, padding, cropping in (("height", ((0, n), (0, 0)), ((n - 1, 0), (0, 0))),
                                    ("width", ((0, 0), (0, n)), ((0, 0), (n - 1, 0)))):
        padded = keras.layers.ZeroPadding2D(padding, name=f"resize_{axis}_padding", dtype="float32")(ones)
        beyond = keras.layers.Cropping2D(cropping, name=f"resize_{axis}_from_n", dtype="float32")(padded)
        switches.append(keras.layers.GlobalMaxPooling2D(name=f"resize_{axis}_at_least_n", dtype="float32")(beyond))
    area = keras.layers.Reshape((1, 1, 3), name="resize_area_switch", dtype="float32")(
        keras.layers.Multiply(name="resize_both_at_least_n", dtype="float32")(switches))
    bilinear = keras.layers.Rescaling(-1.0, offset=1.0, name="resize_bilinear_switch", dtype="float32")(area)
    return keras.layers.Add(name="resize", dtype="float32")([
        keras.layers.Multiply(name="resize_area_kept", dtype="float32")([kept[0], area]),
        keras.layers.Multiply(name="resize_bilinear_kept", dtype="float32")([kept[1], bilinear])])
