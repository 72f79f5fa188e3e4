"""The image path on TensorFlow: encoded bytes -> float32 RGB pixels squashed to a square, as tf ops
(so that tf.data pipelines, fine-tuning and the exported SavedModel decode exactly as extract does).

- `resize_like_extract`: the resize rule (area when both sides shrink, bilinear otherwise), part
  of the cache's fingerprint (RESIZE_METHOD);
- `decode_bytes_and_resize` / `decode_and_resize`: encoded bytes or a file to float32 RGB 0..255;
- `decode_one`: one image's bytes on their own, with the classification of failures;
- `labelled_batches`: files with labels, shuffled and augmented, for training (finetune).

pipeline/images/decode_pillow.py is the same path without TensorFlow; pipeline/images/reading.py
chooses one of the two per process.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.atomic import one_line
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import tensorflow as tf

NAME = "TensorFlow"  # what messages call this decoder
TF_DATA = True  # batches come from a tf.data pipeline


def decode_and_resize(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """Read one file into a float32 RGB image of image_size x image_size in 0..255 (see
    decode_bytes_and_resize)."""
    import tensorflow as tf

    return decode_bytes_and_resize(tf.io.read_file(path), image_size)


def decode_bytes_and_resize(data: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded image bytes -> a float32 RGB image of image_size x image_size in 0..255.

    Any format TensorFlow decodes (JPEG, PNG, BMP, GIF: its first frame); grayscale and RGBA
    become RGB. The image is squashed to a square, as the classic recipe does: by area averaging
    when it shrinks (anti-aliased and about twice as fast as anti-aliased bilinear, which matters
    on a CPU where decoding shares the cores with the backbone), bilinear when it grows.
    """
    import tensorflow as tf

    image = decode_pixels(data)
    image.set_shape([None, None, None])
    image = resize_like_extract(image, image_size)
    channels = tf.shape(image)[-1]  # resized before this, so gray images cost a third
    return tf.cond(channels < 3, lambda: tf.repeat(image[..., :1], 3, axis=-1), lambda: image[..., :3])


def decode_pixels(data: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> uint8 pixels (height, width, channels) as decoded everywhere TensorFlow
    decodes for the pipeline. JPEGs with libjpeg's accurate integer inverse DCT, as Pillow
    decodes them (TensorFlow's default, the fast integer one, differed from it by up to 18 levels
    on a photo, mean 1.3, and so moved features 1%; accurate, the two agree exactly); the other
    formats by tf.io.decode_image (first GIF frame)."""
    import tensorflow as tf

    return tf.cond(tf.io.is_jpeg(data),
                   lambda: tf.io.decode_jpeg(data, dct_method="INTEGER_ACCURATE"),
                   lambda: tf.io.decode_image(data, expand_animations=False, dtype=tf.uint8))


def resize_like_extract(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """An image (height, width, channels) or a batch of them squashed to image_size x image_size,
    float32: area averaging when both sides shrink, bilinear otherwise. The one definition of
    extract's resize (the fingerprint's RESIZE_METHOD), also used inside exported SavedModels.
    pipeline/images/decode_pillow.py reproduces it without TensorFlow."""
    import tensorflow as tf

    size = (image_size, image_size)
    spatial = tf.shape(images)[-3:-1]
    shrinks = tf.reduce_all(spatial >= image_size)
    return tf.cond(shrinks,
                   lambda: tf.image.resize(images, size, method="area"),
                   lambda: tf.image.resize(images, size, method="bilinear"))


def decode_one(path: Path, data: bytes, image_size: int) -> tuple[np.ndarray | None, str | None]:
    """One image's bytes decoded on their own: (pixels, None), or (None, why) when the bytes are
    damaged. Raises PipelineError when decoding fails for another cause (memory, resources), so
    that such an image is never taken for a damaged one."""
    import tensorflow as tf

    try:
        return decode_bytes_and_resize(tf.constant(data), image_size).numpy(), None
    except tf.errors.InvalidArgumentError:
        return None, f"{NAME} cannot decode it (corrupt, truncated or not an image)"
    except tf.errors.OpError as error:
        raise PipelineError(
            f"{path}: decoding failed for lack of resources ({one_line(error.message)[:160]}), not because "
            "the image is damaged: lower --batch-size or --image-size and rerun; finished work is kept"
        ) from None


DECODER = "tensorflow-jpeg-accurate"


def decoder_identity() -> str:
    """The decoder as the fingerprint names it (its version is the backend's). Caches made before
    JPEGs were decoded accurately are named "tensorflow": another fingerprint, never continued
    with the new decoding."""
    return DECODER


def header_dimensions(data: bytes) -> tuple[int, int] | None:
    """Where the header parser cannot tell an image's size, TensorFlow has nothing safer to ask."""
    return None


def labelled_batches(files: list[str], labels: np.ndarray, image_size: int, batch_size: int,
                     augmentation: list[Any] | None = None, shuffle_seed: int | None = None) -> Any:
    """(images, labels) batches: decoded and squashed (pixels 0..255) as extract does, shuffled
    each epoch with `shuffle_seed`, augmented by `augmentation` (Keras layers) when given."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((files, labels.astype(np.int32)))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.map(lambda f, y: (decode_and_resize(f, image_size), y), num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size)
    if augmentation:
        import keras

        pipeline = keras.Sequential(augmentation)
        dataset = dataset.map(lambda x, y: (pipeline(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)
