"""Reading images once: each file's bytes are read, hashed and decoded from that one read, on the
image path this process uses (TensorFlow's, or Pillow's on other backends), chosen once.

- `decoder()`: the path of this process (pipeline/images/decode_tf.py or decode_pillow.py; the
  Keras backend cannot change once Keras is imported, so neither can it);
- `EncodedImages`: files read once each in a parallel pipeline (extract, predict); over-large
  images are held back by their header;
- `read_and_decode`: the same for one file on its own (the Ray engine's decode tasks), with the
  same classification of failures (`decode_one`, `too_large_error`).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from pipeline import backend
from pipeline.errors import PipelineError
from pipeline.images.formats import (
    DEFAULT_MAX_PIXELS,
    SIGNATURES,
    decoded_pixels,
    image_dimensions,
    refusal,
    too_large_error,
    unreadable_reason,
)


def one_blas_thread_each(workers: int) -> Any:
    """While several decode threads resize with NumPy, each BLAS call runs in its caller's thread:
    OpenBLAS's own pool (one thread a core) called from every decode thread at once oversubscribes
    the cores and serialises the calls. On a 16-core H200 machine (bench/decode.py) that took the
    image path from 187 to 583 images/s (3.1x) and VGG16's extract from 172 to 692 images/s; with a
    single decode thread BLAS's own pool is faster, so it is left alone there."""
    import contextlib

    if workers <= 1 or os.environ.get("PIPELINE_DECODE_BLAS_THREADS") == "all":  # one thread: BLAS's pool helps
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


@functools.cache
def decoder() -> ModuleType:
    """This process's image path: TensorFlow's on the TensorFlow backend, Pillow's on any other."""
    if backend.is_tensorflow():
        from pipeline.images import decode_tf

        return decode_tf
    from pipeline.images import decode_pillow

    return decode_pillow


def decoder_identity() -> str:
    """The decoder of this process, as the fingerprint names it."""
    return decoder().decoder_identity()


def unchecked_reason(data: bytes) -> str:
    """Why an image whose dimensions cannot be read is not decoded: a decoder would have to
    allocate whatever the file asks for, so such files are refused before decoding."""
    if not data:
        return "empty file"
    known = data.startswith(SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
    if not known:
        return f"{decoder().NAME} cannot decode it (corrupt, truncated or not an image)"
    return "cannot decode it safely: its header does not say how large it is (corrupt or truncated)"


def header_dimensions(data: bytes) -> tuple[int, int] | None:
    """The dimensions the pixel limit is checked against: the header parser's, and where it
    cannot tell, the decoder's own reading of the header (Pillow's; TensorFlow has none)."""
    return image_dimensions(data) or decoder().header_dimensions(data)


def open_image_file(path: Path) -> Any:
    """An image file opened for reading only if it is a regular file (a link to one is followed, as
    the scan reads links to files): a FIFO named like an image (given to predict, or swapped in
    after the scan) is refused at once, never waited on."""
    from pipeline.atomic import open_regular

    return os.fdopen(open_regular(Path(path), follow_links=True), "rb")


def read_image_bytes(path: Path) -> bytes:
    with open_image_file(path) as handle:
        return handle.read()


def checked_before_decoding(data: bytes, max_pixels: int) -> tuple[str | None, Any]:
    """What happens to these bytes before any decoder sees them, the same on every backend:
    ("skipped", why) when the header says nothing of the size or the file rules refuse them
    (formats.refusal), ("too large", (width, height)) past the pixel limit (every GIF frame
    counted), else (None, (width, height))."""
    dimensions = header_dimensions(data)
    if dimensions is None:
        return "skipped", unchecked_reason(data)
    refused = refusal(data)
    if refused is not None:
        return "skipped", refused
    if decoded_pixels(data, dimensions) > max_pixels:
        return "too large", dimensions
    return None, dimensions


def decode_one(path: Path, data: bytes, image_size: int) -> tuple[np.ndarray | None, str | None]:
    """One image's bytes decoded on their own: (pixels, None), or (None, why) when the bytes are
    damaged; PipelineError when decoding fails for another cause (memory, resources)."""
    if not data:
        return None, "empty file"
    return decoder().decode_one(path, data, image_size)


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
        with open_image_file(path) as handle:
            stat = os.fstat(handle.fileno())
            data = handle.read()
    except OSError as error:
        return ReadImage(None, -1, -1, skipped=unreadable_reason(error))
    read = ReadImage(hashlib.sha256(data).hexdigest(), stat.st_size, stat.st_mtime_ns)
    problem, dimensions = checked_before_decoding(data, max_pixels)
    if problem == "skipped":
        read.skipped = dimensions
        return read
    if problem == "too large":
        read.held_back = str(too_large_error(path, dimensions, max_pixels, decoded_pixels(data, dimensions)))
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
        self.too_large_pixels: dict[int, int] = {}
        self.unreadable: dict[int, str] = {}
        self.failed: dict[int, ReadImage] = {}  # the threaded path: how each failed file failed

    def _encoded(self) -> Iterator[tuple[int, bytes]]:
        for index, path in enumerate(self.files):
            try:
                data = read_image_bytes(path)
            except OSError as error:
                self.unreadable[index] = unreadable_reason(error)
                continue
            self.sha256[index] = hashlib.sha256(data).hexdigest()
            problem, found = checked_before_decoding(data, self.max_pixels)
            if problem == "skipped":
                self.unreadable[index] = found
                continue
            if problem == "too large":
                self.too_large[index] = found
                self.too_large_pixels[index] = decoded_pixels(data, found)
                continue
            yield index, data

    def batches(self, image_size: int, batch_size: int, transform: Callable[[Any], Any] | None = None,
                workers: int | None = None) -> Any:
        """(file indices, batch of images) in file order, decoded and resized in parallel ahead of
        the consumer, `transform` (a backbone's preprocessing) applied to the images. Files that
        fail are dropped here and known by their missing index (see failure_reason). On the
        TensorFlow backend a tf.data pipeline of tensors; on others NumPy arrays from `workers`
        threads (default: every core)."""
        if not decoder().TF_DATA:
            return self._threaded_batches(image_size, batch_size, transform, workers or os.cpu_count() or 1)
        import tensorflow as tf

        from pipeline.images import decode_tf

        encoded = tf.data.Dataset.from_generator(self._encoded, output_signature=(
            tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.string)))
        images = encoded.map(lambda i, data: (i, decode_tf.decode_bytes_and_resize(data, image_size)),
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
        with one_blas_thread_each(workers), \
                ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
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
            raise too_large_error(path, self.too_large[index], self.max_pixels, self.too_large_pixels.get(index))
        if index in self.unreadable:
            return self.unreadable[index]
        try:
            data = read_image_bytes(path)
        except OSError as error:
            return unreadable_reason(error)
        _, reason = decode_one(path, data, image_size)
        if reason is not None:
            return reason
        raise PipelineError(
            f"{path} failed to decode in the pipeline but decodes on its own (the file changed while being read, "
            "or memory ran short): rerun the same command; finished work is kept"
        )
