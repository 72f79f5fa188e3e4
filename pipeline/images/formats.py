"""Image files and their headers: which files are images, their dimensions read without decoding
(so that decompression bombs are refused before any decoder allocates), the limits every image
path shares, and the file rules both decoders follow.

**One rule for every format on both backends** (`refusal`, checked on the bytes before either
decoder sees them, by extract, fine-tuning's image path and predict alike). TensorFlow's and
Pillow's decoders disagree on some valid files; those are refused on both, with one reason:

- BMP: 24- and 32-bit uncompressed BMPs, and 8-bit ones whose palette is the gray ramp, are
  read. TensorFlow reads an 8-bit BMP's palette indices as gray levels (the wrong picture for any
  other palette) and cannot read 1-, 4- and 16-bit or RLE-compressed BMPs, which Pillow reads.
- GIF: the first frame is read. A GIF whose first frame does not cover its logical screen is
  refused (the two decoders fill the rest differently), as is one whose frames reach outside
  the screen. Pixels of the transparent colour are black on both (TensorFlow's rule). The pixel
  limit counts every frame TensorFlow decodes: frames x the screen's area (`decoded_pixels`).
- PNG: a chunk whose CRC is wrong makes the file damaged on both (TensorFlow refuses it; Pillow
  read some). Text and colour-profile chunks (tEXt, zTXt, iTXt, iCCP) are ignored by both:
  Pillow, which refuses such chunks past 1 MB, is given the file without them.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
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
PNG_SIGNATURE = SIGNATURES[0]
PNG_METADATA = frozenset({b"tEXt", b"zTXt", b"iTXt", b"iCCP"})  # ignored by both decoders


def refusal(data: bytes) -> str | None:
    """Why neither decoder reads these bytes under the pipeline's file rules (module docstring),
    or None. Damage the rules do not name is left to the decoder."""
    if data[:2] == b"BM":
        return _bmp_refusal(data)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        layout = gif_layout(data)
        if layout is None:
            return "cannot decode it: a damaged GIF (its blocks end early or run past the file)"
        width, height = layout.screen
        if not layout.frames:
            return "a GIF without an image"
        for left, top, frame_width, frame_height in layout.frames:
            if left + frame_width > width or top + frame_height > height:
                return (f"a GIF with a frame ({frame_width} x {frame_height} at {left},{top}) outside its "
                        f"{width} x {height} screen")
        if layout.frames[0] != (0, 0, width, height):
            return ("a GIF whose first frame does not cover its screen: the two decoders fill the rest "
                    "differently, so neither backend reads it (save it as PNG)")
        return None
    if data[:8] == PNG_SIGNATURE:
        if png_chunks(data) is None:
            return "cannot decode it: a damaged PNG (a chunk's checksum is wrong, or the file is cut short)"
        return None
    return None


def _bmp_refusal(data: bytes) -> str | None:
    try:
        header_size, = struct.unpack("<I", data[14:18])
        if header_size < 40:
            return "an OS/2 BMP (a 12-byte header): not read on either backend (save it as PNG)"
        bits, compression = struct.unpack("<HI", data[28:34])
        colours, = struct.unpack("<I", data[46:50])
    except struct.error:
        return "cannot decode it: a damaged BMP (its header is cut short)"
    if compression not in (0, 3) or (compression == 3 and bits != 32):
        return f"a compressed BMP (compression {compression}): not read on either backend (save it as PNG)"
    if bits in (24, 32):
        return None
    if bits == 8:
        start, count = 14 + header_size, colours or 256
        palette = data[start:start + 4 * count]
        if len(palette) == 4 * count and all(palette[4 * i:4 * i + 3] == bytes((i, i, i)) for i in range(count)):
            return None  # a gray ramp: TensorFlow's gray levels are the picture
        return ("an 8-bit BMP with a colour palette: TensorFlow reads its palette indices as gray levels, so "
                "neither backend reads it (save it as PNG)")
    return (f"a {bits}-bit BMP: TensorFlow reads 8-, 24- and 32-bit BMPs only, so neither backend reads it "
            "(save it as PNG)")


def png_chunks(data: bytes) -> list[tuple[bytes, int, int]] | None:
    """(type, start, end) of every chunk of a PNG up to IEND, each CRC checked; None when a CRC is
    wrong or the chunks run past the file."""
    chunks, position = [], 8
    while position + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        end = position + 12 + length
        if end > len(data):
            return None
        crc, = struct.unpack(">I", data[end - 4:end])
        if zlib.crc32(data[position + 4:end - 4]) & 0xFFFFFFFF != crc:
            return None
        chunks.append((kind, position, end))
        position = end
        if kind == b"IEND":
            return chunks
    return None


def png_without_metadata(data: bytes) -> bytes:
    """The PNG without its text and colour-profile chunks (which no decoder here uses for pixels)."""
    chunks = png_chunks(data)
    if chunks is None or not any(kind in PNG_METADATA for kind, _, _ in chunks):
        return data
    return PNG_SIGNATURE + b"".join(data[start:end] for kind, start, end in chunks if kind not in PNG_METADATA)


@dataclass(frozen=True)
class GifLayout:
    """A GIF's logical screen, every frame's (left, top, width, height) and the transparent colour
    index of the first frame (None: none), read from its blocks without decoding."""

    screen: tuple[int, int]
    frames: list[tuple[int, int, int, int]]
    first_transparent: int | None


def gif_layout(data: bytes) -> GifLayout | None:
    """The blocks of a GIF walked to its trailer (or its end); None where they are damaged."""
    try:
        width, height, packed = struct.unpack("<HHB", data[6:11])
        position = 13 + (3 << ((packed & 7) + 1) if packed & 0x80 else 0)
        frames: list[tuple[int, int, int, int]] = []
        transparent, first_transparent = None, None
        while position < len(data):
            block = data[position]
            if block == 0x3B:  # trailer
                break
            if block == 0x21:  # extension: label, then sub-blocks
                label = data[position + 1]
                if label == 0xF9 and data[position + 2] == 4:  # graphic control: transparency of the next frame
                    flags, index = data[position + 3], data[position + 6]
                    transparent = index if flags & 1 else None
                position = _skip_sub_blocks(data, position + 2)
            elif block == 0x2C:  # image descriptor, [local colour table], LZW code size, sub-blocks
                left, top, frame_width, frame_height, flags = struct.unpack("<HHHHB", data[position + 1:position + 10])
                frames.append((left, top, frame_width, frame_height))
                if len(frames) == 1:
                    first_transparent = transparent
                transparent = None
                position += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
                position = _skip_sub_blocks(data, position + 1)
            else:
                return None
            if position > len(data):
                return None
    except (struct.error, IndexError):
        return None
    return GifLayout((width, height), frames, first_transparent)


def _skip_sub_blocks(data: bytes, position: int) -> int:
    """The position after a chain of sub-blocks (length byte, bytes; a zero length ends it)."""
    while True:
        size = data[position]
        position += 1 + size
        if size == 0:
            return position


def decoded_pixels(data: bytes, dimensions: tuple[int, int]) -> int:
    """The pixels decoding allocates, which the pixel limit bounds: width x height, and for a GIF
    every frame on its screen (TensorFlow decodes them all before keeping the first)."""
    pixels = dimensions[0] * dimensions[1]
    if data[:6] in (b"GIF87a", b"GIF89a"):
        layout = gif_layout(data)
        frames = layout.frames if layout else []
        largest = max((w * h for _, _, w, h in frames), default=0)
        return max(pixels * max(1, len(frames)), largest)
    return pixels


def too_large_error(path: Path, dimensions: tuple[int, int], max_pixels: int,
                    pixels: int | None = None) -> PipelineError:
    """An image whose header announces more than `max_pixels` decoded pixels (`pixels`, where
    that is more than width x height: a GIF's frames): held back, never decoded."""
    width, height = dimensions
    frames = "" if pixels is None or pixels == width * height else \
        f" in frames of {pixels / MEGAPIXEL:.3g} megapixels in all"
    return PipelineError(
        f"{path} is {width} x {height} pixels{frames}, above the limit of {max_pixels / MEGAPIXEL:.3g} megapixels "
        "(--max-megapixels): raise the limit if the machine has the memory, or shrink the image; the "
        "other images were processed and kept"
    )


def unreadable_reason(error: OSError) -> str:
    return f"unreadable: {error.strerror or error}"
