"""Image files and their headers: which files are images, their dimensions read without decoding
(so that decompression bombs are refused before any decoder allocates), and the limits every image
path shares."""

from __future__ import annotations

import struct
from pathlib import Path

from pipeline.errors import PipelineError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})
RESIZE_METHOD = "area-down-bilinear-up"  # part of the fingerprint
MAX_IMAGE_SIZE = 2048  # --image-size above this needs tens of GB per batch in the first convolution
MEGAPIXEL = 10**6  # --max-megapixels counts millions of pixels
DEFAULT_MAX_PIXELS = 128 * MEGAPIXEL  # decoded pixels per image (a 10000 x 10000 image is 100 M)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


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


def too_large_error(path: Path, dimensions: tuple[int, int], max_pixels: int) -> PipelineError:
    """An image whose header announces more than `max_pixels`: held back, never decoded."""
    width, height = dimensions
    return PipelineError(
        f"{path} is {width} x {height} pixels, above the limit of {max_pixels / MEGAPIXEL:.3g} megapixels "
        "(--max-megapixels): raise the limit if the machine has the memory, or shrink the image; the "
        "other images were processed and kept"
    )


def unreadable_reason(error: OSError) -> str:
    return f"unreadable: {error.strerror or error}"
