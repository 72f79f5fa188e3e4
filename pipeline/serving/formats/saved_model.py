"""--format savedmodel: a TF SavedModel for TF Serving. `serving_default` takes a batch of encoded
images (JPEG, PNG, BMP, GIF bytes) and returns `probabilities`, the top `class` and the
`class_names`; `pixels` takes a uint8 batch. Both decode and resize exactly as extract does (area
when an image shrinks, bilinear when it grows), inside the graph; test-time views are TensorFlow
ops. TensorFlow computes bfloat16 on CPUs (oneDNN) and float16 on GPUs, so `--precision run`
computes as the run did."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from pipeline import atomic
from pipeline.errors import PipelineError
from pipeline.images.views import view_steps
from pipeline.serving.formats import RESIZE_RULE, Job

FILE = "saved_model"
QUANTIZE = False
SCIKIT_LEARN_HEADS = False
RUN_PRECISION = None
OUTPUT = ("probabilities (batch, classes) float32; class (batch,) string, the most likely; class_names (batch, "
          "classes) string, in the order of the probabilities")
VIEWS_HOW = "(transposes and flips as TensorFlow ops)"


def describe_input(size: int) -> str:
    return ("serving_default: a batch of encoded images (JPEG, PNG, BMP, GIF bytes; key 'images'); pixels: uint8 RGB "
            "(batch, height, width, 3) (key 'pixels'). Decoded (grayscale and RGBA become RGB, first GIF frame) and "
            f"{RESIZE_RULE} with N = {size}, inside the graph")


class _Serving(tf.Module):
    def __init__(self, model: Any, class_names: list[str], image_size: int, tta: str = "none") -> None:
        super().__init__()
        self.model = model
        self.class_names = tf.constant(class_names)
        self.image_size = image_size
        self.tta = tta

    def _outputs(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        # the test-time views as TensorFlow ops on the N x N batch, in views.py's order (a Keras
        # model nesting the classifier would leave its Dropout's seed state unreachable here)
        views = tf_views(self.tta)
        probabilities = tf.add_n([tf.cast(self.model(view(images), training=False), tf.float32)
                                  for view in views]) / len(views)
        batch = tf.shape(probabilities)[0]
        return {
            "probabilities": probabilities,
            "class": tf.gather(self.class_names, tf.argmax(probabilities, axis=1)),
            "class_names": tf.tile(self.class_names[None], [batch, 1]),
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def from_encoded(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        from pipeline.images.decode_tf import decode_bytes_and_resize

        size = self.image_size
        pixels = tf.map_fn(lambda data: decode_bytes_and_resize(data, size), images,
                           fn_output_signature=tf.TensorSpec((size, size, 3), tf.float32))
        return self._outputs(pixels)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="pixels")])
    def from_pixels(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        from pipeline.images.decode_tf import resize_like_extract

        return self._outputs(resize_like_extract(pixels, self.image_size))


def tf_views(tta: str) -> list[Any]:
    """The views of `tta` (views.view_steps) as TensorFlow ops on (batch, N, N, channels) tensors."""
    views = []
    for transpose, horizontal, vertical in view_steps(tta):
        def view(x: tf.Tensor, t: bool = transpose, h: bool = horizontal, v: bool = vertical) -> tf.Tensor:
            x = tf.transpose(x, (0, 2, 1, 3)) if t else x
            x = tf.reverse(x, [2]) if h else x
            return tf.reverse(x, [1]) if v else x
        views.append(view)
    return views


def save(job: Job) -> tuple[Path, dict[str, Any]]:
    """tf.saved_model.save into a staging folder, renamed into place when complete."""
    path = job.out / FILE
    serving = _Serving(job.classifier, job.run.class_names, job.size, job.tta)
    with atomic.replacing_directory(path) as staging, contextlib.redirect_stdout(io.StringIO()):
        try:
            tf.saved_model.save(serving, str(staging), signatures={
                "serving_default": serving.from_encoded.get_concrete_function(),
                "pixels": serving.from_pixels.get_concrete_function(),
            })
        except tf.errors.OpError as error:  # a full disk, a quota: TensorFlow's error, not an OSError
            raise PipelineError(f"could not write the SavedModel {path}: {atomic.one_line(error.message)[:300]}; "
                                "nothing half-written was left (free some space, or export elsewhere)") from None
    return path, {}


def loader(path: Path, one_image_per_call: bool = False) -> Callable[[np.ndarray, list[str]], np.ndarray]:
    """Fed the files' encoded bytes: its own decoding and resize are what is measured."""
    serving = tf.saved_model.load(str(path)).signatures["serving_default"]
    return lambda pixels, files: serving(images=tf.constant([Path(f).read_bytes() for f in files]))[
        "probabilities"].numpy()
