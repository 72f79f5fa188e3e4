"""Images into batches: the one path from image files to decoded, squashed pixels, shared by
extract, finetune, predict and the exported SavedModel.

- `resize_like_extract`: the resize rule (area when both sides shrink, bilinear otherwise), part
  of the cache's fingerprint (RESIZE_METHOD);
- `decode_bytes_and_resize` / `decode_and_resize`: encoded bytes or a file to float32 RGB 0..255;
- `EncodedImages`: reads each file's bytes once, hashes them and decodes those same bytes, in a
  parallel tf.data pipeline (extract, predict); over-large images are held back by their header;
- `labelled_batches`: files with labels, shuffled and augmented, for training (finetune).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from pipeline.atomic import one_line
from pipeline.errors import PipelineError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})
RESIZE_METHOD = "area-down-bilinear-up"  # part of the fingerprint
MAX_IMAGE_SIZE = 2048  # --image-size above this needs tens of GB per batch in the first convolution
DEFAULT_MAX_PIXELS = 128 * 2**20  # decoded pixels per image (a 10000 x 10000 image is 100 M)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def decode_and_resize(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """Read one file into a float32 RGB image of image_size x image_size in 0..255 (see
    decode_bytes_and_resize)."""
    return decode_bytes_and_resize(tf.io.read_file(path), image_size)


def decode_bytes_and_resize(data: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded image bytes -> a float32 RGB image of image_size x image_size in 0..255.

    Any format TensorFlow decodes (JPEG, PNG, BMP, GIF: its first frame); grayscale and RGBA
    become RGB. The image is squashed to a square, as the classic recipe does: by area averaging
    when it shrinks (anti-aliased and about twice as fast as anti-aliased bilinear, which matters
    on a CPU where decoding shares the cores with the backbone), bilinear when it grows.
    """
    image = tf.io.decode_image(data, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, None])
    image = resize_like_extract(image, image_size)
    channels = tf.shape(image)[-1]  # resized before this, so gray images cost a third
    return tf.cond(channels < 3, lambda: tf.repeat(image[..., :1], 3, axis=-1), lambda: image[..., :3])


def resize_like_extract(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """An image (height, width, channels) or a batch of them squashed to image_size x image_size,
    float32: area averaging when both sides shrink, bilinear otherwise. The one definition of
    extract's resize (the fingerprint's RESIZE_METHOD), also used inside exported SavedModels."""
    size = (image_size, image_size)
    spatial = tf.shape(images)[-3:-1]
    shrinks = tf.reduce_all(spatial >= image_size)
    return tf.cond(shrinks,
                   lambda: tf.image.resize(images, size, method="area"),
                   lambda: tf.image.resize(images, size, method="bilinear"))


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from a PNG, GIF, BMP or JPEG header without decoding, or None where
    the header does not say (the decoder then decides). Used to refuse decompression bombs."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return struct.unpack(">II", data[16:24])
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data[:2] == b"BM":
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)
        if data[:2] == b"\xff\xd8":
            return _jpeg_dimensions(data)
    except struct.error:
        return None
    return None


_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            position += 2
            continue
        length = struct.unpack(">H", data[position + 2:position + 4])[0]
        if marker in _JPEG_FRAMES:
            height, width = struct.unpack(">HH", data[position + 5:position + 9])
            return width, height
        position += 2 + length
    return None


class EncodedImages:
    """Image files read once each: their bytes are hashed and those same bytes decoded, so what is
    decoded is always what was hashed, even when a file is overwritten meanwhile. Images whose
    header announces more than `max_pixels` are held back (never decoded); files that fail are
    reported by index with the reason."""

    def __init__(self, files: Sequence[Path], max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.files = [Path(f) for f in files]
        self.max_pixels = max_pixels
        self.sha256: dict[int, str] = {}  # file index -> hash of the bytes that were decoded
        self.too_large: dict[int, tuple[int, int]] = {}
        self.unreadable: dict[int, str] = {}

    def _encoded(self) -> Iterator[tuple[int, bytes]]:
        for index, path in enumerate(self.files):
            try:
                data = path.read_bytes()
            except OSError as error:
                self.unreadable[index] = f"unreadable: {error.strerror or error}"
                continue
            self.sha256[index] = hashlib.sha256(data).hexdigest()
            dimensions = image_dimensions(data)
            if dimensions and dimensions[0] * dimensions[1] > self.max_pixels:
                self.too_large[index] = dimensions
                continue
            yield index, data

    def batches(self, image_size: int, batch_size: int,
                transform: Callable[[tf.Tensor], tf.Tensor] | None = None) -> tf.data.Dataset:
        """(file indices, batch of images) in file order, decoded and resized in parallel ahead of
        the consumer, `transform` (a backbone's preprocessing) applied per batch. Files that fail
        are dropped here and known by their missing index (see failure_reason)."""
        encoded = tf.data.Dataset.from_generator(self._encoded, output_signature=(
            tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.string)))
        images = encoded.map(lambda i, data: (i, decode_bytes_and_resize(data, image_size)),
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        batches = images.ignore_errors().batch(batch_size)
        if transform is not None:
            batches = batches.map(lambda i, x: (i, transform(x)), num_parallel_calls=tf.data.AUTOTUNE,
                                  deterministic=True)
        return batches.prefetch(tf.data.AUTOTUNE)

    def failure_reason(self, index: int, image_size: int) -> str:
        """Why a file gave no image, when its bytes cannot be decoded; raises PipelineError when
        the cause is anything else (memory, the pixel limit), so that it is never taken for a
        damaged image."""
        path = self.files[index]
        if index in self.too_large:
            width, height = self.too_large[index]
            raise PipelineError(
                f"{path} is {width} x {height} pixels, above the limit of {self.max_pixels / 1e6:.0f} megapixels "
                "(--max-megapixels): raise the limit if the machine has the memory, or shrink the image; the "
                "other images were processed and kept"
            )
        if index in self.unreadable:
            return self.unreadable[index]
        try:
            data = path.read_bytes()
        except OSError as error:
            return f"unreadable: {error.strerror or error}"
        if not data:
            return "empty file"
        try:
            decode_bytes_and_resize(tf.constant(data), image_size)
        except tf.errors.InvalidArgumentError:
            return "TensorFlow cannot decode it (corrupt, truncated or not an image)"
        except tf.errors.OpError as error:
            raise PipelineError(
                f"{path}: decoding failed for lack of resources ({one_line(error.message)[:160]}), not because "
                "the image is damaged: lower --batch-size or --image-size and rerun; finished work is kept"
            ) from None
        raise PipelineError(
            f"{path} failed to decode in the pipeline but decodes on its own (the file changed while being read, "
            "or memory ran short): rerun the same command; finished work is kept"
        )


def labelled_batches(files: list[str], labels: np.ndarray, image_size: int, batch_size: int,
                     augmentation: list[Any] | None = None, shuffle_seed: int | None = None) -> Any:
    """(images, labels) batches: decoded and squashed (pixels 0..255) as extract does, shuffled
    each epoch with `shuffle_seed`, augmented by `augmentation` (Keras layers) when given."""
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
