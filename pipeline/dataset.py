"""Scan an image folder into records (path, label, split, content hash) with stable stratified
splits, and decode images for tf.data."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tensorflow as tf

from pipeline import atomic
from pipeline.errors import PipelineError
from pipeline.store import SPLITS

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})
SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
RESIZE_METHOD = "area-down-bilinear-up"  # part of the fingerprint


@dataclass(frozen=True)
class ImageRecord:
    path: str  # relative to the dataset root, with forward slashes
    label: int
    split: str
    sha256: str


@dataclass(frozen=True)
class SplitConfig:
    """How a flat DIR/<class>/ folder is split. A file's split depends only on its name, the seed
    and the fractions, so adding images never moves existing ones."""

    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        fractions = (self.validation_fraction, self.test_fraction)
        if not all(math.isfinite(f) for f in fractions):
            raise PipelineError(f"validation and test fractions must be finite numbers, not {fractions[0]} and "
                                f"{fractions[1]}: e.g. --val-fraction 0.15 --test-fraction 0.15")
        if min(fractions) < 0 or sum(fractions) >= 1:
            raise PipelineError(
                "validation and test fractions must be >= 0 and leave some images for training"
            )


@dataclass
class ScannedDataset:
    root: Path
    layout: str  # "class-folders" | "split-folders"
    class_names: list[str]
    records: list[ImageRecord]
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def split_counts(self) -> dict[str, int]:
        return {split: sum(r.split == split for r in self.records) for split in SPLITS}


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p.name))


def check_class_name(folder: Path) -> str:
    """Class names are written one per line (labels.txt) and shown in reports: a name holding a
    newline or another control character would break them, so such a folder is refused here."""
    name = folder.name
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise PipelineError(f"class folder {str(folder)!r} has a control character (newline, tab...) in its "
                            "name: rename it")
    return name


def _images_below(folder: Path, ignored: list[tuple[str, str]], root: Path) -> list[Path]:
    """Image files in `folder` and its visible subfolders, sorted. Links to folders are not
    followed (no loops); links to files are read like files."""
    found = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if _visible(d))
        for name in sorted(files):
            path = Path(directory) / name
            if not _visible(name):
                continue
            if not is_image_file(path):
                ignored.append((path.relative_to(root).as_posix(), "not an image file extension"))
            elif not path.is_file():
                ignored.append((path.relative_to(root).as_posix(), "broken link"))
            else:
                found.append(path)
    return found


_NOHASH = re.compile(r"_nohash_.*$")


def split_position(relative_to_class: str, seed: int) -> float:
    """A stable number in [0, 1) for a file. Everything after `_nohash_` in the file name is
    ignored, so variants of one object (`cat1_nohash_a.jpg`, `cat1_nohash_b.jpg`) share a split."""
    stem, suffix = os.path.splitext(relative_to_class)
    key = _NOHASH.sub("", stem) + suffix.lower()
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _assign_splits(names: Sequence[str], config: SplitConfig) -> list[str]:
    """Split one class by position thresholds; a class of three or more images gets at least one
    image in each split that has a non-zero fraction."""
    positions = [split_position(name, config.seed) for name in names]
    test_cut = config.test_fraction
    validation_cut = test_cut + config.validation_fraction
    splits = ["test" if p < test_cut else "validation" if p < validation_cut else "train" for p in positions]
    if len(names) >= 3:
        for split, wanted in (("test", config.test_fraction), ("validation", config.validation_fraction)):
            if wanted > 0 and split not in splits:
                train = [i for i, s in enumerate(splits) if s == "train"]
                if len(train) > 1:
                    splits[min(train, key=lambda i: positions[i])] = split
    return splits


def sha256_of_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class HashIndex:
    """Content hashes remembered by (size, mtime) so that rescanning a large unchanged folder
    reads no image bytes.

    Like git's index, an entry is trusted only if the file's mtime is at least RACY_SECONDS older
    than the moment the index was saved: a file rewritten with the same size within the same
    clock tick as the save is hashed again rather than taken for unchanged.
    """

    RACY_SECONDS = 2

    def __init__(self, path: Path | None = None, trusted: bool = True) -> None:
        """`path`: where the index lives (None: nowhere); `trusted=False` hashes every file again."""
        self.path = path
        self.saved_at_ns = 0
        self.entries: dict[str, tuple[int, int, str]] = {}
        if trusted and path is not None and path.is_file():
            try:
                content = json.loads(path.read_text())
                self.saved_at_ns = int(content["saved_at_ns"])
                self.entries = {k: (int(v[0]), int(v[1]), str(v[2])) for k, v in content["files"].items()}
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                self.saved_at_ns, self.entries = 0, {}  # only a speed-up: start afresh
        self._seen: dict[str, tuple[int, int, str]] = {}

    def sha256(self, path: Path, key: str) -> str:
        stat = path.stat()
        known = self.entries.get(key)
        trusted_before = self.saved_at_ns - self.RACY_SECONDS * 1_000_000_000
        if known and known[:2] == (stat.st_size, stat.st_mtime_ns) and stat.st_mtime_ns < trusted_before:
            digest = known[2]
        else:
            digest = sha256_of_file(path)
        self._seen[key] = (stat.st_size, stat.st_mtime_ns, digest)
        return digest

    def forget(self, key: str) -> None:
        """Drop a file whose bytes changed after it was hashed: the next scan reads it again."""
        self._seen.pop(key, None)

    def save(self) -> None:
        """Keep the entries of this scan (removed files drop out)."""
        if self.path is None:
            return
        atomic.write_json(self.path, {"saved_at_ns": time.time_ns(), "files": self._seen}, compact=True)


def scan_dataset(root: Path, splits: SplitConfig = SplitConfig(), hashes: HashIndex | None = None) -> ScannedDataset:
    """Read DIR/<class>/<image> or DIR/{train,validation|val,test}/<class>/<image> into records.

    Class names are sorted, so labels do not depend on the file system's order.
    """
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"data folder {root} does not exist or is not a folder")
    top = _subfolders(root)
    split_folders = [p for p in top if p.name in SPLIT_FOLDERS]
    ignored: list[tuple[str, str]] = []
    files: list[tuple[Path, str, str]] = []  # (path, class name, split)
    if split_folders and "train" in {p.name for p in split_folders}:
        layout = "split-folders"
        seen = [SPLIT_FOLDERS[p.name] for p in split_folders]
        if len(seen) != len(set(seen)):
            raise PipelineError(f"{root} has both val/ and validation/: keep one")
        for split_folder in split_folders:
            for class_folder in _subfolders(split_folder):
                name = check_class_name(class_folder)
                for path in _images_below(class_folder, ignored, root):
                    files.append((path, name, SPLIT_FOLDERS[split_folder.name]))
    else:
        layout = "class-folders"
        for class_folder in top:
            class_name = check_class_name(class_folder)
            images = _images_below(class_folder, ignored, root)
            names = [p.relative_to(class_folder).as_posix() for p in images]
            for path, split in zip(images, _assign_splits(names, splits)):
                files.append((path, class_name, split))

    class_names = sorted({name for _, name, _ in files} | _class_folder_names(root, layout))
    counts = {name: 0 for name in class_names}
    for _, name, _ in files:
        counts[name] += 1
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise PipelineError(
            f"class folder(s) {', '.join(empty)} in {root} hold no images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}): add images or remove the folder"
        )
    if len(class_names) < 2:
        found = f"only the class {class_names[0]!r}" if class_names else "no class folders with images"
        raise PipelineError(f"{root} has {found}: a classifier needs at least two DIR/<class>/ folders")

    label_of = {name: index for index, name in enumerate(class_names)}
    hashes = hashes or HashIndex()
    records = []
    for path, name, split in files:
        relative = path.relative_to(root).as_posix()
        records.append(ImageRecord(relative, label_of[name], split, hashes.sha256(path, relative)))
    return ScannedDataset(root, layout, class_names, records, ignored)


def _class_folder_names(root: Path, layout: str) -> set[str]:
    if layout == "class-folders":
        return {p.name for p in _subfolders(root)}
    return {c.name for s in _subfolders(root) if s.name in SPLIT_FOLDERS for c in _subfolders(s)}


# --- decoding for tf.data --------------------------------------------------------------------------


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
