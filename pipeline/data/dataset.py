"""Scan an image folder into records (path, label, split, content hash) with stable stratified
splits, and the content-hash index that makes rescans cheap."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import artefacts, atomic
from pipeline.errors import PipelineError
from pipeline.images.formats import IMAGE_EXTENSIONS, is_image_file

SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
UNLABELLED = -1  # pipeline/cache/store.UNLABELLED: an image without a class (a flat folder, a table of paths)
UNLABELLED_LAYOUTS = ("unlabelled", "table")  # layouts whose images carry no class: labels come from a table


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
    """How a flat DIR/<class>/ folder is split, and how a validation (or test) split is carved out
    of train/ where a split layout has no folder for it. A new file's split depends only on its
    name, the seed and the fractions; a file the cache already holds keeps its split, so adding
    images never moves existing ones.

    `given` names the fractions the user chose explicitly ("validation", "test"): a fraction that
    a layout's folders make meaningless is refused rather than ignored."""

    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    given: frozenset[str] = field(default=frozenset(), compare=False)

    @classmethod
    def from_flags(cls, validation: float | None, test: float | None, seed: int) -> SplitConfig:
        """From command-line flags, None meaning "not given" (the default fraction)."""
        given = frozenset(name for name, value in (("validation", validation), ("test", test)) if value is not None)
        defaults = cls()
        return cls(defaults.validation_fraction if validation is None else validation,
                   defaults.test_fraction if test is None else test, seed, given)

    def fraction(self, split: str) -> float:
        return self.validation_fraction if split == "validation" else self.test_fraction

    def as_dict(self) -> dict[str, float]:
        return {"validation_fraction": self.validation_fraction, "test_fraction": self.test_fraction,
                "seed": self.seed}

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
    layout: str  # "class-folders" | "split-folders" | "unlabelled" (a flat folder) | "table" (a table of paths)
    class_names: list[str]
    records: list[ImageRecord]
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    carved: dict[str, float] = field(default_factory=dict)  # split-folders: split -> fraction taken from train/
    splits: SplitConfig = field(default_factory=SplitConfig)

    def split_rule(self) -> dict[str, object] | str:
        """How the splits came about, for the manifest and the summary."""
        if self.layout in UNLABELLED_LAYOUTS:
            return "none: the images are unlabelled (labels and splits come from a labels table)"
        if self.layout == "class-folders":
            return self.splits.as_dict()
        if not self.carved:
            return "as given by folders"
        return {"folders": sorted(set(SPLIT_FOLDERS.values()) - set(self.carved)),
                "carved_from_train": self.carved, "seed": self.splits.seed}

    def keep_earlier_splits(self, earlier: dict[str, str]) -> None:
        """Give every image the cache already holds (path -> split) the split it had, and split
        only the new ones: adding images never moves existing ones. A class that would lack a
        validation or test image gets one from its new images only."""
        if self.layout in UNLABELLED_LAYOUTS or (self.layout == "split-folders" and not self.carved):
            return
        by_class: dict[int, list[int]] = {}
        for i, record in enumerate(self.records):
            if self.layout == "class-folders" or record.path.startswith("train/"):
                by_class.setdefault(record.label, []).append(i)
        config = self._carving_config()
        for indexes in by_class.values():
            names = [self._name_in_class(self.records[i]) for i in indexes]
            kept = [earlier.get(self.records[i].path) for i in indexes]
            for i, split in zip(indexes, assign_splits(names, config, kept)):
                self.records[i] = dataclasses.replace(self.records[i], split=split)

    def _carving_config(self) -> SplitConfig:
        if self.layout == "class-folders":
            return self.splits
        return _carving(self.carved, self.splits.seed)

    def _name_in_class(self, record: ImageRecord) -> str:
        """The path below the class folder: what a split position is computed from."""
        parts = record.path.split("/")
        return "/".join(parts[1:] if self.layout == "class-folders" else parts[2:])


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p.name))


NOT_UTF8 = "its name is not valid UTF-8 (rename it): names are stored as UTF-8 in the cache and the reports"


def is_utf8(name: str) -> bool:
    """False for a file name whose bytes are not UTF-8 (Python holds them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(path: Path) -> str:
    """A path as UTF-8 text, bytes that are not UTF-8 shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_class_name(folder: Path) -> str:
    """Class names are written one per line (labels.txt) and shown in reports: a name holding a
    newline or another control character would break them, so such a folder is refused here."""
    name = folder.name
    if not is_utf8(name):
        raise PipelineError(f"class folder {printable(folder)!r}: {NOT_UTF8}")
    if any(unicodedata.category(c) == "Cc" for c in name) or "".join(name.splitlines()) != name:
        raise PipelineError(f"class folder {str(folder)!r} has a control character or a line break (newline, "
                            "tab, U+2028...) in its name: rename it")
    return name


def _images_below(folder: Path, ignored: list[tuple[str, str]], root: Path) -> list[Path]:
    """Image files in `folder` and its visible subfolders, sorted. Links to folders are not
    followed (no loops); links to files are read like files."""
    found = []
    for directory, subdirs, files in os.walk(folder):
        for name in [d for d in subdirs if _visible(d) and not is_utf8(d)]:
            ignored.append((printable(Path(directory, name).relative_to(root)), NOT_UTF8))
        subdirs[:] = sorted(d for d in subdirs if _visible(d) and is_utf8(d))
        for name in sorted(files):
            path = Path(directory) / name
            if not _visible(name):
                continue
            if not is_utf8(name):
                ignored.append((printable(path.relative_to(root)), NOT_UTF8))
            elif not is_image_file(path):
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


def assign_splits(names: Sequence[str], config: SplitConfig, kept: Sequence[str | None] | None = None) -> list[str]:
    """Split one class's files by position thresholds. `kept`: the split each file already has in
    the cache (None for a new file), which it keeps. A class of three or more images gets at least
    one image in each split that has a non-zero fraction, taken from its new files (never by moving
    a file the cache holds)."""
    kept = list(kept) if kept is not None else [None] * len(names)
    positions = [split_position(name, config.seed) for name in names]
    test_cut = config.test_fraction
    validation_cut = test_cut + config.validation_fraction
    splits = [k or ("test" if p < test_cut else "validation" if p < validation_cut else "train")
              for k, p in zip(kept, positions)]
    if len(names) >= 3:
        for split, wanted in (("test", config.test_fraction), ("validation", config.validation_fraction)):
            if wanted > 0 and split not in splits:
                train = [i for i, s in enumerate(splits) if s == "train"]
                movable = [i for i in train if kept[i] is None]
                if len(train) > 1 and movable:
                    splits[min(movable, key=lambda i: positions[i])] = split
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
                content = atomic.read_json(path)
                self.saved_at_ns = int(content["saved_at_ns"])
                self.entries = {k: (int(v[0]), int(v[1]), str(v[2])) for k, v in content["files"].items()}
            except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
                self.saved_at_ns, self.entries = 0, {}  # only a speed-up: start afresh (e.g. "files": [])
        self._seen: dict[str, tuple[int, int, str]] = {}

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
    carved: dict[str, float] = {}
    if split_folders and "train" in {p.name for p in split_folders}:
        layout = "split-folders"
        seen = [SPLIT_FOLDERS[p.name] for p in split_folders]
        if len(seen) != len(set(seen)):
            raise PipelineError(f"{root} has both val/ and validation/: keep one")
        others = [p.name for p in top if p.name not in SPLIT_FOLDERS]
        if others:
            raise PipelineError(
                f"{root} mixes split folders ({', '.join(p.name for p in split_folders)}) with other folders "
                f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}): use either "
                "DIR/{train,validation,test}/<class>/ or DIR/<class>/, not both")
        for split in ("validation", "test"):
            if split in seen and split in splits.given:
                flag = "--val-fraction" if split == "validation" else "--test-fraction"
                raise PipelineError(f"{flag} does not apply: {root} has a {split} folder, which is the {split} "
                                    f"split; drop {flag} (it carves a split out of train/ only where there is no "
                                    "such folder)")
        carved = {split: splits.fraction(split) for split in ("validation", "test") if split not in seen}
        carving = _carving(carved, splits.seed)
        for split_folder in split_folders:
            for class_folder in _subfolders(split_folder):
                name = check_class_name(class_folder)
                images = _images_below(class_folder, ignored, root)
                if split_folder.name == "train" and carved:
                    names = [p.relative_to(class_folder).as_posix() for p in images]
                    chosen = assign_splits(names, carving)
                else:
                    chosen = [SPLIT_FOLDERS[split_folder.name]] * len(images)
                files.extend((path, name, split) for path, split in zip(images, chosen))
    else:
        layout = "class-folders"
        for class_folder in top:
            class_name = check_class_name(class_folder)
            images = _images_below(class_folder, ignored, root)
            names = [p.relative_to(class_folder).as_posix() for p in images]
            for path, split in zip(images, assign_splits(names, splits)):
                files.append((path, class_name, split))

    if layout == "class-folders" and not files:
        ignored.clear()  # walked again below, whole
        loose = _images_below(root, ignored, root)
        if loose:  # a flat folder: every image, unlabelled
            records = [_record(root, path, UNLABELLED, "train", hashes or HashIndex(), read_unknown) for path in loose]
            return ScannedDataset(root, "unlabelled", [], records, ignored, {}, splits)

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
        records.append(_record(root, path, label_of[name], split, hashes, read_unknown))
    return ScannedDataset(root, layout, class_names, records, ignored, carved, splits)


def _record(root: Path, path: Path, label: int, split: str, hashes: HashIndex, read_unknown: bool) -> ImageRecord:
    relative = path.relative_to(root).as_posix()
    digest, size, mtime_ns = hashes.lookup(path, relative, read=read_unknown)
    return ImageRecord(relative, label, split, digest, size, mtime_ns)


def table_root(table: Any, data: Path | None, path_column: str = "path") -> Path:
    """The folder a table's images are relative to: `data` where given, else the table's own folder;
    for a dataframe of absolute paths, the deepest folder that holds them all."""
    from pipeline.data.table import Table, is_dataframe

    if data is not None:
        return Path(data)
    if not is_dataframe(table):
        return Table(table, "--images").folder or Path(".")
    opened = Table(table, "--images")
    opened.require(path_column, "--path-column")
    folders = {os.path.dirname(os.path.normpath(str(cell))) for _, (cell,) in opened.rows([path_column])
               if cell is not None}
    if not folders or not all(os.path.isabs(folder) for folder in folders):
        raise PipelineError("a dataframe of relative image paths needs the folder they are relative to: pass "
                            "data=FOLDER")
    return Path(os.path.commonpath(sorted(folders)))


def scan_table(table_source: Any, path_column: str, root: Path, hashes: HashIndex | None = None,
               read_unknown: bool = True, missing: str = "error") -> ScannedDataset:
    """The images a table names (its `path_column`; relative to `root`, or absolute under it), unlabelled:
    labels come from a labels table at train time. A path that is not an image file under `root`
    is refused with the count and the first few, or skipped with `missing="skip"` (listed as ignored)."""
    from pipeline.data.table import Table

    table = Table(table_source, "--images")
    table.require(path_column, "--path-column")
    root = Path(root).resolve()
    if not root.is_dir():
        raise PipelineError(f"data folder {root} does not exist or is not a folder")
    hashes = hashes or HashIndex()
    found: dict[str, Path] = {}
    problems: list[tuple[str, str]] = []
    for _, (cell,) in table.rows([path_column]):
        if cell is None:
            continue
        name = str(cell)
        candidate = Path(os.path.normpath(name if Path(name).is_absolute() else root / name))
        try:
            relative = candidate.relative_to(root).as_posix()
        except ValueError:
            problems.append((name, f"outside the data folder {root}"))
            continue
        if relative in found:
            continue
        if not is_utf8(name):
            problems.append((printable(Path(name)), NOT_UTF8))
        elif not is_image_file(candidate):
            problems.append((name, "not an image file extension"))
        elif not candidate.is_file():
            problems.append((name, "no such file"))
        else:
            found[relative] = candidate
    if problems and missing != "skip":
        first = "; ".join(f"{name} ({why})" for name, why in problems[:3])
        raise PipelineError(f"{len(problems)} path(s) in column {path_column!r} of {table} are not image files under "
                            f"{root}: {first}; fix them, pass --data FOLDER (the folder they are relative to), or "
                            "--missing skip")
    if not found:
        raise PipelineError(f"column {path_column!r} of {table} names no image file under {root}")
    records = [_record(root, found[key], UNLABELLED, "train", hashes, read_unknown) for key in sorted(found)]
    return ScannedDataset(root, "table", [], records, problems, {}, SplitConfig())


def _carving(carved: dict[str, float], seed: int) -> SplitConfig:
    """How train/ is split where a split layout lacks a validation or test folder."""
    return SplitConfig(carved.get("validation", 0.0), carved.get("test", 0.0), seed)


def _class_folder_names(root: Path, layout: str) -> set[str]:
    if layout == "class-folders":
        return {p.name for p in _subfolders(root)}
    return {c.name for s in _subfolders(root) if s.name in SPLIT_FOLDERS for c in _subfolders(s)}
