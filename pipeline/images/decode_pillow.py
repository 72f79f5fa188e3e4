"""The image path without TensorFlow: encoded bytes -> float32 RGB pixels, squashed to a square,
decoded by Pillow and resized by NumPy. Used whenever the backend is not TensorFlow.

It reproduces TensorFlow's path (pipeline/images/decode_tf.py) rule for rule, and offers the
same functions (pipeline/images/reading.py chooses one of the two per process):

- decoding as `tf.io.decode_image(..., dtype=uint8)` does: the first frame, 16-bit samples
  narrowed by dropping the low byte, palettes expanded, alpha dropped, gray repeated into RGB
  (after the resize, as TensorFlow's path does);
- the resize rule (pipeline/images/formats.py RESIZE_METHOD): area averaging when both sides shrink,
  bilinear (half-pixel centres) otherwise. Both are separable linear maps, so each is one matrix
  per axis, built once per (input size, output size) and applied as two matrix products.

PNG, BMP and GIF decode to the same pixels as TensorFlow's decoders, and the resized images agree
to float32 rounding (tests/test_backends.py). JPEG's inverse DCT is the decoder's own choice, so
the decoder's name and libjpeg version are part of the cache's fingerprint (`decoder_identity`):
caches never mix rows from two decoders.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.images.formats import PNG_SIGNATURE, png_without_metadata

FORMATS = frozenset({"PNG", "JPEG", "BMP", "GIF", "WEBP"})  # what tf.io.decode_image reads
NAME = "Pillow"  # what messages call this decoder
TF_DATA = False  # batches come from a pool of threads


class UndecodableImage(ValueError):
    """The bytes are not an image this path decodes (damaged, truncated, another format)."""


def decoder_identity() -> str:
    """Names the decoder in the fingerprint: Pillow and the libjpeg it was built with."""
    import PIL
    from PIL import features

    jpeg = features.version("libjpeg_turbo") or features.version("jpg") or "unknown"
    return f"pillow-{'.'.join(PIL.__version__.split('.')[:1])}-libjpeg-{'.'.join(jpeg.split('.')[:2])}"


def header_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) as Pillow reads them from the header (no decoding), or None when Pillow
    cannot read a header at all."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Exception:  # noqa: BLE001 - any header Pillow cannot read: the decoder decides
        return None


def decode(data: bytes) -> np.ndarray:
    """Encoded bytes -> uint8 (height, width, channels) with 1 (gray) or 3 (RGB) channels, as
    TensorFlow's decoders give them (alpha dropped). Raises UndecodableImage for damaged bytes."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the pipeline checks the header against its own limit first
    if data[:8] == PNG_SIGNATURE:
        data = png_without_metadata(data)  # text and colour profiles: no decoder here uses them
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in FORMATS:
                    raise UndecodableImage(f"{image.format} is not a format the pipeline reads")
                image.seek(0)
                image.load()
                if image.format == "GIF" and image.mode == "P" and isinstance(image.info.get("transparency"), int):
                    return _gif_as_tensorflow(image)
                return _as_tensorflow_channels(image)
    except UndecodableImage:
        raise
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for damaged bytes
        raise UndecodableImage(str(error) or type(error).__name__) from None


def _gif_as_tensorflow(image) -> np.ndarray:  # noqa: ANN001 - a PIL image
    """A GIF frame with a transparent colour as TensorFlow decodes it: those pixels black."""
    indices = np.asarray(image)
    pixels = np.array(image.convert("RGB"), dtype=np.uint8)
    pixels[indices == image.info["transparency"]] = 0
    return pixels


def _as_tensorflow_channels(image) -> np.ndarray:  # noqa: ANN001 - a PIL image
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit gray: TensorFlow keeps the high byte
        values = np.asarray(image).astype(np.uint32)
        return (np.clip(values, 0, 65535) >> 8).astype(np.uint8)[..., None]
    if mode == "1":
        return (np.asarray(image, dtype=np.uint8) * 255)[..., None]
    if mode in ("L", "LA"):
        return np.asarray(image.getchannel(0), dtype=np.uint8)[..., None]
    if mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


@functools.lru_cache(maxsize=64)
def _area_matrix(source: int, target: int) -> np.ndarray:
    """TensorFlow's ResizeArea along one axis: output cell y averages the source interval
    [y * scale, (y + 1) * scale), each source pixel weighted by its overlap."""
    scale = source / target
    matrix = np.zeros((target, source), np.float64)
    for y in range(target):
        start, end = y * scale, (y + 1) * scale
        for i in range(math.floor(start), min(math.ceil(end), source)):
            overlap = min(i + 1, end) - max(i, start)
            if overlap > 0:
                matrix[y, i] += overlap / scale
    return matrix.astype(np.float32)


@functools.lru_cache(maxsize=64)
def _bilinear_matrix(source: int, target: int) -> np.ndarray:
    """TensorFlow's ResizeBilinear (half-pixel centres, no antialiasing) along one axis."""
    scale = source / target
    matrix = np.zeros((target, source), np.float64)
    for y in range(target):
        position = (y + 0.5) * scale - 0.5
        floor = math.floor(position)
        lower, upper = max(floor, 0), min(math.ceil(position), source - 1)
        fraction = position - floor
        matrix[y, lower] += 1.0 - fraction
        matrix[y, upper] += fraction
    return matrix.astype(np.float32)


def resize(image: np.ndarray, image_size: int) -> np.ndarray:
    """(height, width, channels) -> float32 (image_size, image_size, channels): area when both
    sides shrink (or stay), bilinear otherwise, as pipeline/images/decode_tf.py resize_like_extract."""
    height, width = image.shape[:2]
    pixels = image.astype(np.float32)
    if height == image_size and width == image_size:
        return pixels
    matrix = _area_matrix if height >= image_size and width >= image_size else _bilinear_matrix
    rows = matrix(height, image_size)
    columns = matrix(width, image_size)
    out = np.tensordot(rows, pixels, axes=(1, 0))  # (size, width, channels)
    return np.einsum("xw,ywc->yxc", columns, out, optimize=True)


def decode_and_resize(data: bytes, image_size: int) -> np.ndarray:
    """Encoded bytes -> float32 RGB (image_size, image_size, 3) in 0..255, as TensorFlow's path."""
    try:
        pixels = resize(decode(data), image_size)
    except MemoryError:
        raise PipelineError("decoding ran out of memory: lower --batch-size or --image-size and rerun; finished "
                            "work is kept") from None
    if pixels.shape[-1] < 3:  # resized before this, as in TensorFlow's path: gray costs a third
        pixels = np.repeat(pixels[..., :1], 3, axis=-1)
    return np.ascontiguousarray(pixels[..., :3])


def decode_one(path: Path, data: bytes, image_size: int) -> tuple[np.ndarray | None, str | None]:
    """One image's bytes decoded on their own: (pixels, None), or (None, why) when they are damaged."""
    try:
        return decode_and_resize(data, image_size), None
    except UndecodableImage:
        return None, f"{NAME} cannot decode it (corrupt, truncated or not an image)"
