"""Images into batches: the one path from image files to decoded, squashed pixels, shared by
extract, finetune, predict and the exported SavedModel.

- `resize_like_extract`: the resize rule (area when both sides shrink, bilinear otherwise), part
  of the cache's fingerprint (RESIZE_METHOD);
- `decode_bytes_and_resize` / `decode_and_resize`: encoded bytes or a file to float32 RGB 0..255;
- `EncodedImages`: reads each file's bytes once, hashes them and decodes those same bytes, in a
  parallel tf.data pipeline (extract, predict); over-large images are held back by their header;
- `read_and_decode`: the same for one file on its own (the Ray engine's decode tasks), with the
  same classification of failures (`decode_one`, `too_large_error`);
- `labelled_batches`: files with labels, shuffled and augmented, for training (finetune).

On the TensorFlow backend images decode in a tf.data pipeline; on any other backend Pillow and
NumPy do the same (pipeline/images/decode_pillow.py) in a pool of threads, and this module imports no
TensorFlow (`decoder_identity` names the decoder in the cache's fingerprint).
"""

from __future__ import annotations

import collections
import hashlib
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import backend
from pipeline.atomic import one_line
from pipeline.errors import PipelineError
from pipeline.images import decode_pillow as pixels

if TYPE_CHECKING:
    import tensorflow as tf

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})
RESIZE_METHOD = "area-down-bilinear-up"  # part of the fingerprint
MAX_IMAGE_SIZE = 2048  # --image-size above this needs tens of GB per batch in the first convolution
DEFAULT_MAX_PIXELS = 128 * 2**20  # decoded pixels per image (a 10000 x 10000 image is 100 M)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def decoder_identity() -> str:
    """The decoder of this process's backend, as the fingerprint names it: "tensorflow" (its
    version is the fingerprint's backend version) or Pillow with its libjpeg."""
    return "tensorflow" if backend.is_tensorflow() else pixels.decoder_identity()


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

    image = tf.io.decode_image(data, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, None])
    image = resize_like_extract(image, image_size)
    channels = tf.shape(image)[-1]  # resized before this, so gray images cost a third
    return tf.cond(channels < 3, lambda: tf.repeat(image[..., :1], 3, axis=-1), lambda: image[..., :3])


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


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from a PNG, GIF, BMP, WebP or JPEG header without decoding, or None
    where the header does not say. Used to refuse decompression bombs, so it reads what the
    decoders accept: the format by its signature whatever the file's extension, and a JPEG's
    frame header after stray bytes between markers (libjpeg skips them with a warning)."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return struct.unpack(">II", data[16:24])
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data[:2] == b"BM":
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_dimensions(data)
        if data[:2] == b"\xff\xd8":
            return _jpeg_dimensions(data)
    except struct.error:
        return None
    return None


def _webp_dimensions(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: the canvas size, 24 bits each, minus one
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    if chunk == b"VP8L":  # lossless: 14 bits each, minus one, after the signature byte 0x2f
        if data[20] != 0x2F:
            return None
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":  # lossy: after the frame tag and the start code 9d 01 2a
        if data[23:26] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:  # stray bytes before a marker: skipped, as libjpeg does
            following = data.find(b"\xff", position)
            if following < 0:
                return None
            position = following
            continue
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x00, 0x01, *range(0xD0, 0xD8)):  # markers without a length (0x00: a stuffed byte)
            position += 2
            continue
        if marker == 0xD9:  # end of image before any frame
            return None
        length = struct.unpack(">H", data[position + 2:position + 4])[0]
        if marker in _JPEG_FRAMES:
            height, width = struct.unpack(">HH", data[position + 5:position + 9])
            return width, height
        position += 2 + length
    return None


SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"\xff\xd8")  # and RIFF....WEBP


def unchecked_reason(data: bytes) -> str:
    """Why an image whose dimensions cannot be read is not decoded: a decoder would have to
    allocate whatever the file asks for, so such files are refused before decoding."""
    if not data:
        return "empty file"
    known = data.startswith(SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
    if not known:
        decoder = "TensorFlow" if backend.is_tensorflow() else "Pillow"
        return f"{decoder} cannot decode it (corrupt, truncated or not an image)"
    return "cannot decode it safely: its header does not say how large it is (corrupt or truncated)"


def header_dimensions(data: bytes) -> tuple[int, int] | None:
    """The dimensions the pixel limit is checked against: the header parser's, and where it
    cannot tell, Pillow's reading of the header (on the backends that decode with Pillow)."""
    dimensions = image_dimensions(data)
    if dimensions is None and not backend.is_tensorflow():
        dimensions = pixels.dimensions(data)
    return dimensions


def too_large_error(path: Path, dimensions: tuple[int, int], max_pixels: int) -> PipelineError:
    """An image whose header announces more than `max_pixels`: held back, never decoded."""
    width, height = dimensions
    return PipelineError(
        f"{path} is {width} x {height} pixels, above the limit of {max_pixels / 2**20:.3g} megapixels "
        "(--max-megapixels): raise the limit if the machine has the memory, or shrink the image; the "
        "other images were processed and kept"
    )


def unreadable_reason(error: OSError) -> str:
    return f"unreadable: {error.strerror or error}"


def decode_one(path: Path, data: bytes, image_size: int) -> tuple[np.ndarray | None, str | None]:
    """One image's bytes decoded on their own: (pixels, None), or (None, why) when the bytes are
    damaged. Raises PipelineError when decoding fails for another cause (memory, resources), so
    that such an image is never taken for a damaged one."""
    if not data:
        return None, "empty file"
    if not backend.is_tensorflow():
        try:
            return pixels.decode_and_resize(data, image_size), None
        except pixels.UndecodableImage:
            return None, "Pillow cannot decode it (corrupt, truncated or not an image)"
    import tensorflow as tf

    try:
        return decode_bytes_and_resize(tf.constant(data), image_size).numpy(), None
    except tf.errors.InvalidArgumentError:
        return None, "TensorFlow cannot decode it (corrupt, truncated or not an image)"
    except tf.errors.OpError as error:
        raise PipelineError(
            f"{path}: decoding failed for lack of resources ({one_line(error.message)[:160]}), not because "
            "the image is damaged: lower --batch-size or --image-size and rerun; finished work is kept"
        ) from None


@dataclass
class ReadImage:
    """One image file read once: the hash and stat of the bytes read, and either their pixels, the
    reason they cannot be decoded (`skipped`), or an error that is not the image's fault
    (`held_back`: the pixel limit, resources), after which the image is tried again next run."""

    sha256: str | None
    size: int
    mtime_ns: int
    pixels: np.ndarray | None = None
    skipped: str | None = None
    held_back: str | None = None


def read_and_decode(path: Path, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> ReadImage:
    """Read, hash and decode one file from a single read (the Ray engine's decode tasks)."""
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            data = handle.read()
    except OSError as error:
        return ReadImage(None, -1, -1, skipped=unreadable_reason(error))
    read = ReadImage(hashlib.sha256(data).hexdigest(), stat.st_size, stat.st_mtime_ns)
    dimensions = header_dimensions(data)
    if dimensions is None:
        read.skipped = unchecked_reason(data)
        return read
    if dimensions[0] * dimensions[1] > max_pixels:
        read.held_back = str(too_large_error(path, dimensions, max_pixels))
        return read
    try:
        read.pixels, read.skipped = decode_one(path, data, image_size)
    except PipelineError as error:
        read.held_back = str(error)
    return read


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
        self.failed: dict[int, ReadImage] = {}  # the threaded path: how each failed file failed

    def _encoded(self) -> Iterator[tuple[int, bytes]]:
        for index, path in enumerate(self.files):
            try:
                data = path.read_bytes()
            except OSError as error:
                self.unreadable[index] = unreadable_reason(error)
                continue
            self.sha256[index] = hashlib.sha256(data).hexdigest()
            dimensions = header_dimensions(data)
            if dimensions is None:
                self.unreadable[index] = unchecked_reason(data)
                continue
            if dimensions[0] * dimensions[1] > self.max_pixels:
                self.too_large[index] = dimensions
                continue
            yield index, data

    def batches(self, image_size: int, batch_size: int, transform: Callable[[Any], Any] | None = None,
                workers: int | None = None) -> Any:
        """(file indices, batch of images) in file order, decoded and resized in parallel ahead of
        the consumer, `transform` (a backbone's preprocessing) applied to the images. Files that
        fail are dropped here and known by their missing index (see failure_reason). On the
        TensorFlow backend a tf.data pipeline of tensors; on others NumPy arrays from `workers`
        threads (default: every core)."""
        if not backend.is_tensorflow():
            return self._threaded_batches(image_size, batch_size, transform, workers or os.cpu_count() or 1)
        import tensorflow as tf

        encoded = tf.data.Dataset.from_generator(self._encoded, output_signature=(
            tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.string)))
        images = encoded.map(lambda i, data: (i, decode_bytes_and_resize(data, image_size)),
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        batches = images.ignore_errors().batch(batch_size)
        if transform is not None:
            batches = batches.map(lambda i, x: (i, transform(x)), num_parallel_calls=tf.data.AUTOTUNE,
                                  deterministic=True)
        return batches.prefetch(tf.data.AUTOTUNE)

    def _threaded_batches(self, image_size: int, batch_size: int, transform: Callable[[Any], Any] | None,
                          workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The same batches without TensorFlow: each file read, hashed, checked and decoded from
        one read by a pool of threads (Pillow and NumPy release the GIL while they work), a
        bounded window of files ahead of the consumer, in file order."""

        def load(index: int) -> tuple[int, ReadImage]:
            read = read_and_decode(self.files[index], image_size, self.max_pixels)
            if read.pixels is not None and transform is not None:
                read.pixels = np.asarray(transform(read.pixels), np.float32)
            return index, read

        window = max(2 * batch_size, 4 * workers)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
            pending: collections.deque = collections.deque()
            upcoming = iter(range(len(self.files)))
            indices: list[int] = []
            images: list[np.ndarray] = []
            try:
                while True:
                    while len(pending) < window:
                        index = next(upcoming, None)
                        if index is None:
                            break
                        pending.append(pool.submit(load, index))
                    if not pending:
                        break
                    index, read = pending.popleft().result()
                    if read.sha256 is not None:
                        self.sha256[index] = read.sha256
                    if read.pixels is None:
                        self.failed[index] = read
                        continue
                    indices.append(index)
                    images.append(read.pixels)
                    if len(indices) == batch_size:
                        yield np.asarray(indices, np.int64), np.stack(images)
                        indices, images = [], []
                if indices:
                    yield np.asarray(indices, np.int64), np.stack(images)
            finally:
                for future in pending:
                    future.cancel()

    def failure_reason(self, index: int, image_size: int) -> str:
        """Why a file gave no image, when its bytes cannot be decoded; raises PipelineError when
        the cause is anything else (memory, the pixel limit), so that it is never taken for a
        damaged image."""
        path = self.files[index]
        if index in self.failed:
            read = self.failed[index]
            if read.held_back:
                raise PipelineError(read.held_back)
            return read.skipped or "cannot be decoded"
        if index in self.too_large:
            raise too_large_error(path, self.too_large[index], self.max_pixels)
        if index in self.unreadable:
            return self.unreadable[index]
        try:
            data = path.read_bytes()
        except OSError as error:
            return unreadable_reason(error)
        _, reason = decode_one(path, data, image_size)
        if reason is not None:
            return reason
        raise PipelineError(
            f"{path} failed to decode in the pipeline but decodes on its own (the file changed while being read, "
            "or memory ran short): rerun the same command; finished work is kept"
        )


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
