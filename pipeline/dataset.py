"""Scan an image folder into records (path, label, split, content hash) with stable stratified
splits, and the content-hash index that makes rescans cheap."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import artefacts, atomic
from pipeline.errors import PipelineError
from pipeline.images import IMAGE_EXTENSIONS, is_image_file

SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}


@dataclass(frozen=True)
class ImageRecord:
    path: str  # relative to the dataset root, with forward slashes
    label: int
    split: str
    sha256: str  # "" where not known yet: a scan without reading (the Ray engine); its worker hashes
    size: int = field(default=-1, compare=False)  # bytes, as the scan saw the file
    mtime_ns: int = field(default=-1, compare=False)


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
        return self.lookup(path, key)[0]

    def lookup(self, path: Path, key: str, read: bool = True) -> tuple[str, int, int]:
        """(sha256, size, mtime_ns) of a file: the remembered hash where (size, mtime) still match,
        else the file is read (`read=False`: "" instead, for a worker to hash as it decodes)."""
        stat = path.stat()
        known = self.entries.get(key)
        trusted_before = self.saved_at_ns - self.RACY_SECONDS * 1_000_000_000
        if known and known[:2] == (stat.st_size, stat.st_mtime_ns) and stat.st_mtime_ns < trusted_before:
            digest = known[2]
        else:
            digest = artefacts.file_sha256(path) if read else ""
        self._seen[key] = (stat.st_size, stat.st_mtime_ns, digest)
        return digest, stat.st_size, stat.st_mtime_ns

    def learn(self, key: str, size: int, mtime_ns: int, digest: str) -> None:
        """A hash computed elsewhere (a worker, from the bytes it decoded): kept where the file's
        (size, mtime) are those the scan saw, else dropped so that the next scan reads it again."""
        seen = self._seen.get(key)
        if seen is not None and seen[:2] == (size, mtime_ns):
            self._seen[key] = (size, mtime_ns, digest)
        else:
            self.forget(key)

    def forget(self, key: str) -> None:
        """Drop a file whose bytes changed after it was hashed: the next scan reads it again."""
        self._seen.pop(key, None)

    def save(self) -> None:
        """Keep the entries of this scan (removed files and files not hashed yet drop out)."""
        if self.path is None:
            return
        files = {key: entry for key, entry in self._seen.items() if entry[2]}
        atomic.write_json(self.path, {"saved_at_ns": time.time_ns(), "files": files}, compact=True)


def scan_dataset(root: Path, splits: SplitConfig = SplitConfig(), hashes: HashIndex | None = None,
                 read_unknown: bool = True) -> ScannedDataset:
    """Read DIR/<class>/<image> or DIR/{train,validation|val,test}/<class>/<image> into records.

    Class names are sorted, so labels do not depend on the file system's order. Files the hash
    index does not know are read and hashed, or with `read_unknown=False` listed with sha256 ""
    (only their size and mtime are read).
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
        digest, size, mtime_ns = hashes.lookup(path, relative, read=read_unknown)
        records.append(ImageRecord(relative, label_of[name], split, digest, size, mtime_ns))
    return ScannedDataset(root, layout, class_names, records, ignored)


def _class_folder_names(root: Path, layout: str) -> set[str]:
    if layout == "class-folders":
        return {p.name for p in _subfolders(root)}
    return {c.name for s in _subfolders(root) if s.name in SPLIT_FOLDERS for c in _subfolders(s)}
