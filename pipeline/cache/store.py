"""The feature cache on disk: HDF5 shards written atomically, the manifest, the finished cache.

Layout of one cache directory (see README, "Feature cache schema"):

    <cache root>/<dataset>-<backbone>-<size>-<pooling>-<precision>-<hash8>/
        manifest.json        summary written at the end of every extract run
        shard-00000.h5       rows of features with their labels, splits, paths and hashes
        shard-00001.h5 ...   (the local engine's numbers; the Ray engine's: shard-u<unit key>.h5)
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from pipeline import atomic
from pipeline.atomic import one_line
from pipeline.cache.fingerprint import Fingerprint
from pipeline.cache.memory import default_memory_budget
from pipeline.errors import PipelineError, command

FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")
UNLABELLED = -1  # the label of an image extracted without a class (a flat folder, a table of paths)
MANIFEST_NAME = "manifest.json"
HASH_INDEX_NAME = "file_hashes.json"  # a speed-up for rescans, not part of the contract
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".h5"
TEMPORARY_MARK = atomic.TEMPORARY_MARK
_TEXT = h5py.string_dtype(encoding="utf-8")


@dataclass
class Rows:
    """Rows of a shard held in memory: one entry per image in every field."""

    paths: list[str]
    sha256: list[str]
    labels: np.ndarray
    splits: list[str]
    features: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = {len(self.paths), len(self.sha256), len(self.labels), len(self.splits)}
        lengths |= {len(v) for v in self.features.values()}
        if len(lengths) > 1:
            raise ValueError(f"rows of different lengths: {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, indices: Sequence[int]) -> Rows:
        index = np.asarray(indices, dtype=np.int64)
        return Rows(
            [self.paths[i] for i in index],
            [self.sha256[i] for i in index],
            self.labels[index],
            [self.splits[i] for i in index],
            {name: values[index] for name, values in self.features.items()},
        )


@dataclass
class ShardIndex:
    """A shard's metadata columns, read without its features."""

    path: Path
    uuid: str
    class_names: list[str]
    paths: list[str]
    sha256: list[str]
    labels: np.ndarray
    splits: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def _decode(values: np.ndarray) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _damaged(path: Path, why: str) -> PipelineError:
    return PipelineError(
        f"shard {path} is damaged ({why}): delete it and rerun extract to re-extract only its images"
    )


def _check_shard_attributes(handle: h5py.File, path: Path, fingerprint: Fingerprint) -> None:
    version = int(handle.attrs.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise PipelineError(
            f"{path} was written by a newer version of this pipeline (cache format {version}, "
            f"this one reads up to {FORMAT_VERSION}): upgrade, or extract into another --cache"
        )
    if handle.attrs.get("fingerprint_digest") != fingerprint.digest():
        raise PipelineError(
            f"{path} belongs to another feature fingerprint (backbone, size, weights or precision "
            "differ): it is never mixed in; move it out of this cache directory"
        )


MAX_VALUES_PER_IMAGE = 1 << 24  # 64 MB of float32 an image: far above any backbone's map at any size
MAX_SHARD_ROWS = 1 << 22
TEXT_COLUMNS = ("paths", "sha256", "labels", "splits")
_HEX = frozenset("0123456789abcdef")


def _declared_shape_problem(handle: h5py.File, layers: Sequence[str], rows: int | None,
                            shapes: Mapping[str, Sequence[int]] | None) -> str | None:
    """What is wrong with the shapes a shard declares, found before anything is read: a column
    declaring 10^9 rows in a 300 KB file must not be allocated first."""
    declared = {}
    for name in TEXT_COLUMNS:
        shape = handle[name].shape
        if shape is None or len(shape) != 1:
            return f"column {name} has shape {shape}, not one value per image"
        declared[name] = shape[0]
    for name in layers:
        shape = handle["features"][name].shape
        if shape is None or len(shape) < 2:
            return f"features {name} have shape {shape}, not one row per image"
        declared[f"features {name}"] = shape[0]
        if int(np.prod(shape[1:], dtype=np.int64)) > MAX_VALUES_PER_IMAGE:
            return f"features {name} declare {shape[1:]} values an image, more than any backbone gives"
        if shapes is not None and name in shapes and tuple(shape[1:]) != tuple(shapes[name]):
            expected = ", ".join(map(str, shapes[name]))
            return f"features {name} have shape {tuple(shape)}, the cache's are (n, {expected})"
    lengths = set(declared.values())
    if rows is not None and lengths != {rows}:
        return f"its columns declare {sorted(lengths)} rows, the manifest {rows}"
    if len(lengths) != 1:
        return "columns of different lengths"
    if max(lengths) > MAX_SHARD_ROWS:
        return f"{max(lengths)} rows declared, more than a shard holds"
    return None


def _identity_problem(paths: Sequence[str], ids: Sequence[str]) -> str | None:
    """Content ids are sha256 hex digests; paths are relative, inside the data folder, one line each."""
    for digest in ids:
        if len(digest) != 64 or not _HEX.issuperset(digest):
            return f"id {digest[:80]!r} is not a sha256 hex digest"
    for name in paths:
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or any(c in name for c in "\n\r\0"):
            return f"path {name[:80]!r} is not a path inside the data folder"
    return None


def read_shard_index(path: Path, fingerprint: Fingerprint,
                     shapes: Mapping[str, Sequence[int]] | None = None, rows: int | None = None) -> ShardIndex:
    """A shard's metadata, checked: its fingerprint, the shapes its columns declare (against the
    manifest's `rows` and `shapes`, before reading any), labels within its classes, known split
    names, ids that are sha256 digests, relative paths, and float features of every layer."""
    try:
        with h5py.File(path, "r") as handle:
            _check_shard_attributes(handle, path, fingerprint)
            declared = _declared_shape_problem(handle, fingerprint.layers, rows, shapes)
            if declared:
                raise _damaged(path, declared)
            shard = ShardIndex(
                path,
                str(handle.attrs["shard_uuid"]),
                json.loads(handle.attrs["class_names"]),
                _decode(handle["paths"][()]),
                _decode(handle["sha256"][()]),
                handle["labels"][()].astype(np.int32),
                _decode(handle["splits"][()]),
            )
            datasets = {name: handle["features"][name] for name in fingerprint.layers}
            problem = _feature_problem(datasets, shapes)
            lengths = {len(shard)} | {dataset.shape[0] for dataset in datasets.values() if dataset.shape}
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise _damaged(path, one_line(error)) from None
    if problem:
        raise _damaged(path, problem)
    if len({len(shard.sha256), len(shard.labels), len(shard.splits)} | lengths) != 1:
        raise _damaged(path, "columns of different lengths")
    if len(shard.labels) and (shard.labels.min() < UNLABELLED or shard.labels.max() >= len(shard.class_names)):
        raise _damaged(path, f"labels outside 0..{len(shard.class_names) - 1} (or {UNLABELLED}, unlabelled)")
    unknown = set(shard.splits) - set(SPLITS)
    if unknown:
        raise _damaged(path, f"unknown split {sorted(unknown)[0]!r}")
    identity = _identity_problem(shard.paths, shard.sha256)
    if identity:
        raise _damaged(path, identity)
    return shard


def _feature_problem(datasets: Mapping[str, h5py.Dataset], shapes: Mapping[str, Sequence[int]] | None) -> str | None:
    for name, dataset in datasets.items():
        if dataset.dtype.kind != "f":
            return f"features {name} are {dataset.dtype}, not floating point"
        if len(dataset.shape) < 2:
            return f"features {name} have shape {dataset.shape}, not one row per image"
        if shapes is not None and name in shapes and tuple(dataset.shape[1:]) != tuple(shapes[name]):
            expected = ", ".join(map(str, shapes[name]))
            return f"features {name} have shape {tuple(dataset.shape)}, the cache's are (n, {expected})"
    return None


def _open_checked(path: Path, expected_uuid: str | None) -> h5py.File:
    """Open a shard for reading; with `expected_uuid`, the very version a reader indexed (extract
    replaces shards atomically, so an open file is one whole version)."""
    try:
        handle = h5py.File(path, "r")
    except FileNotFoundError:
        if expected_uuid is not None:
            raise _changed(path) from None
        raise
    if expected_uuid is not None and str(handle.attrs.get("shard_uuid")) != expected_uuid:
        handle.close()
        raise _changed(path)
    return handle


def _changed(path: Path) -> PipelineError:
    return PipelineError(
        f"{path} changed while it was being read (an extract rewrote the cache): rerun this command when the "
        "extract has finished"
    )


def _finite(path: Path, name: str, values: np.ndarray) -> np.ndarray:
    if values.dtype.kind != "f":
        raise _damaged(path, f"features {name} are {values.dtype}, not floating point")
    if not np.isfinite(values).all():
        raise _damaged(path, f"features {name} hold NaN or infinite values")
    return values


def read_shard_rows(path: Path, layers: Sequence[str], indices: Sequence[int] | None = None,
                    expected_uuid: str | None = None) -> Rows:
    """Rows of a shard with features of `layers`; all rows, or `indices` (any order)."""
    try:
        with _open_checked(path, expected_uuid) as handle:
            if indices is None:
                selection: Any = slice(None)
                order = None
            else:
                wanted = np.asarray(indices, dtype=np.int64)
                selection, order = np.unique(wanted, return_inverse=True)  # h5py wants increasing
            rows = Rows(
                _decode(handle["paths"][selection]),
                _decode(handle["sha256"][selection]),
                handle["labels"][selection].astype(np.int32),
                _decode(handle["splits"][selection]),
                {name: _finite(path, name, _read_selection(handle["features"][name], selection)) for name in layers},
            )
    except (OSError, KeyError, ValueError, TypeError, IndexError) as error:
        raise _damaged(path, one_line(error)) from None
    return rows if order is None else rows.take(order)


def read_shard_features(path: Path, layers: Sequence[str], indices: Sequence[int],
                        expected_uuid: str | None = None) -> dict[str, np.ndarray]:
    """Features of `layers` at row `indices` (any order) of a shard, without its text columns."""
    wanted = np.asarray(indices, dtype=np.int64)
    selection, order = np.unique(wanted, return_inverse=True)
    try:
        with _open_checked(path, expected_uuid) as handle:
            return {name: _finite(path, name, _read_selection(handle["features"][name], selection))[order]
                    for name in layers}
    except (OSError, KeyError, ValueError, TypeError, IndexError) as error:
        raise _damaged(path, one_line(error)) from None


def _read_selection(dataset: h5py.Dataset, selection: Any) -> np.ndarray:
    """Rows of a dataset. h5py reads a long list of indices row by row, which is far slower than
    reading the whole (shard-sized) dataset and selecting in memory; few rows are read directly."""
    if isinstance(selection, slice) or len(selection) * 8 < dataset.shape[0]:
        return dataset[selection]
    return dataset[()][selection]


def write_shard(path: Path, rows: Rows, class_names: Sequence[str], fingerprint: Fingerprint) -> str:
    """Write all columns of `rows` under a temporary name, then rename: a reader sees the whole
    shard or none of it. Replaces an existing shard of that name atomically. Returns its uuid."""
    shard_uuid = uuid.uuid4().hex
    with atomic.replacing(path, durable=True, after=_KEPT) as temporary, h5py.File(temporary, "w") as handle:
        handle.attrs["format_version"] = FORMAT_VERSION
        handle.attrs["shard_uuid"] = shard_uuid
        handle.attrs["fingerprint"] = json.dumps(fingerprint.as_dict(), sort_keys=True)
        handle.attrs["fingerprint_digest"] = fingerprint.digest()
        handle.attrs["class_names"] = json.dumps(list(class_names))
        handle.create_dataset("paths", data=np.array(rows.paths, dtype=object), dtype=_TEXT)
        handle.create_dataset("sha256", data=np.array(rows.sha256, dtype=object), dtype=_TEXT)
        handle.create_dataset("labels", data=np.asarray(rows.labels, dtype=np.int32))
        handle.create_dataset("splits", data=np.array(rows.splits, dtype=object), dtype=_TEXT)
        group = handle.create_group("features")
        for name, values in rows.features.items():
            group.create_dataset(name, data=np.asarray(values, dtype=np.float32))
    return shard_uuid


_KEPT = "nothing half-written was left and earlier shards are intact"


def shard_paths(directory: Path) -> list[Path]:
    """The cache's shard files. Anything else named like a shard (a folder, a FIFO, a device) is
    refused: opening a FIFO would wait for a writer for ever."""
    paths = sorted(p for p in directory.glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}") if not p.name.startswith("."))
    for path in paths:
        if not path.is_file():
            raise PipelineError(f"{path} is named like a shard but is not a regular file: remove it, or delete the "
                                "cache folder and extract again")
    return paths


def shard_name(number: int) -> str:
    return f"{SHARD_PREFIX}{number:05d}{SHARD_SUFFIX}"


def unit_shard_name(key: str) -> str:
    """The name of a shard defined by its content (a Ray engine unit, see plan.unit_key): a
    retried or duplicated unit writes the same file, so it appears once."""
    return f"{SHARD_PREFIX}u{key[:32]}{SHARD_SUFFIX}"


def shard_number(path: Path) -> int | None:
    """The number of a sequentially named shard (the local engine's), None for a unit's."""
    stem = path.name.removeprefix(SHARD_PREFIX).removesuffix(SHARD_SUFFIX)
    return int(stem) if stem.isdigit() else None


def remove_temporaries(directory: Path) -> None:
    """Drop files a killed run left half-written; they were never visible under a shard name."""
    for leftover in directory.glob(f".*{TEMPORARY_MARK}"):
        leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive_lock(directory: Path) -> Iterator[None]:
    """One writer per cache directory; a second one stops with a clear message."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = atomic.open_regular(directory / ".lock", os.O_WRONLY | os.O_CREAT)
    except OSError as error:  # a FIFO or a folder named .lock: never waited on
        raise PipelineError(f"{directory / '.lock'} cannot be used as the cache's lock ({error.strerror}): "
                            "remove it and rerun") from None
    with os.fdopen(descriptor, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(
                f"another extract is writing to {directory}: wait for it to finish, then rerun"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- reading a finished cache ---------------------------------------------------------------------


class SplitIndex(NamedTuple):
    """Where one split's rows are: labels and paths in shard order, and (shard number, row) of each.
    `targets`: where a labelling gives soft targets, one row of class probabilities per image
    (`labels` is then their most probable class)."""

    labels: np.ndarray
    paths: list[str]
    locations: np.ndarray
    sha256: list[str] = []  # the content hash of each row's image
    targets: np.ndarray | None = None

    def take(self, rows: np.ndarray) -> SplitIndex:
        """The index restricted to `rows` (positions in it), in that order."""
        rows = np.asarray(rows, np.int64)
        return SplitIndex(self.labels[rows], [self.paths[i] for i in rows], self.locations[rows],
                          [self.sha256[i] for i in rows] if self.sha256 else [],
                          None if self.targets is None else self.targets[rows])


@dataclass(frozen=True)
class CacheRows:
    """Every row of a cache in shard order, labelled or not: what a labelling is joined to."""

    paths: list[str]
    sha256: list[str]
    labels: np.ndarray  # the labels the shards carry (UNLABELLED for an image without a class)
    splits: list[str]
    locations: np.ndarray  # (shard number, row) of each

    def __len__(self) -> int:
        return len(self.paths)


class FeatureStore:
    """A finished cache directory, opened for reading. Checks that the manifest describes the
    shards on disk exactly, so an interrupted extract is never read as a complete one."""

    labelling: Any = None  # the labelling (pipeline/labelling) that gave class_names and split_indexes(), if any

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._split_indexes: dict[str, SplitIndex] | None = None
        self._rows_index: CacheRows | None = None
        manifest_path = self.directory / MANIFEST_NAME
        if not manifest_path.is_file():
            raise PipelineError(
                f"{self.directory} is not a feature cache (no {MANIFEST_NAME}): "
                f"point at a directory made by `{command()} extract`"
            )
        damaged = f"{manifest_path} is damaged"
        try:
            self.manifest = atomic.read_json(manifest_path)
            version = self.manifest.get("format_version", -1)
            if version > FORMAT_VERSION:
                raise PipelineError(
                    f"{self.directory} was written by a newer version of this pipeline (cache format "
                    f"{version}, this one reads up to {FORMAT_VERSION}): upgrade the pipeline"
                )
            self.fingerprint = Fingerprint.from_dict(self.manifest["fingerprint"])
            self.class_names: list[str] = [str(name) for name in self.manifest["class_names"]]
            self.layers: tuple[str, ...] = self.fingerprint.layers
            self.feature_shapes = {str(name): tuple(int(n) for n in shape)
                                   for name, shape in self.manifest.get("feature_shapes", {}).items()}
            listed = {str(entry["file"]): str(entry["uuid"]) for entry in self.manifest["shards"]}
            self._rows = {str(entry["file"]): entry["rows"] for entry in self.manifest["shards"] if "rows" in entry}
            for name, shape in self.feature_shapes.items():
                if not shape or min(shape) < 1 or int(np.prod(shape, dtype=np.int64)) > MAX_VALUES_PER_IMAGE:
                    raise ValueError(f"feature_shapes {name} {list(shape)} is not a backbone's output")
            for rows in self._rows.values():
                if isinstance(rows, bool) or not isinstance(rows, int) or not 0 <= rows <= MAX_SHARD_ROWS:
                    raise ValueError(f"a shard's rows {rows!r}")
        except (OSError, ValueError) as error:
            raise PipelineError(f"{damaged} ({one_line(error)}): rerun extract to rewrite it") from None
        except (KeyError, TypeError, AttributeError, IndexError) as error:
            raise PipelineError(f"{damaged} (missing or wrong {one_line(error)}): rerun extract to rewrite it") \
                from None
        self._check_shards_match_manifest(listed)

    @property
    def path(self) -> Path:
        return self.directory

    @property
    def data_root(self) -> str | None:
        """The image folder the cache was extracted from (resolved), as its manifest records it."""
        return self.manifest.get("dataset", {}).get("root")

    @property
    def pretrained(self) -> bool:
        """False for a cache extracted with random weights (--weights none)."""
        return self.manifest.get("weights", {}).get("pretrained", True)

    def __fspath__(self) -> str:  # a cache stands wherever a path to it does (open_cache, os.path)
        return str(self.directory)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.directory)!r})"

    def _check_shards_match_manifest(self, listed: dict[str, str]) -> None:
        on_disk = {p.name for p in shard_paths(self.directory)}
        if set(listed) != on_disk:
            raise PipelineError(
                f"{self.directory}: shards on disk differ from its manifest (an extract run was "
                "interrupted): rerun the same extract command to finish it"
            )
        self.shards = [self.directory / name for name in sorted(listed)]
        self._uuids = listed

    def _check_uuid(self, shard: ShardIndex) -> None:
        if shard.uuid != self._uuids[shard.path.name]:
            raise PipelineError(
                f"{shard.path} changed after the manifest was written (interrupted extract?): "
                "rerun the same extract command"
            )

    def iter_shards(self, split: str | None = None, layers: Sequence[str] | None = None,
                    order: Sequence[int] | None = None) -> Iterator[Rows]:
        """The rows of `split` (every split if None), one shard at a time (in `order`, shard
        numbers, when given): memory stays bounded by the shard size."""
        layers = tuple(layers or self.layers)
        for path in self.shards if order is None else [self.shards[i] for i in order]:
            index = read_shard_index(path, self.fingerprint, self.feature_shapes, self._rows.get(path.name))
            self._check_uuid(index)
            self._check_fits_memory(path, len(index), layers)
            chosen = [i for i, s in enumerate(index.splits) if split is None or s == split]
            if chosen:
                rows = read_shard_rows(path, layers, chosen, expected_uuid=index.uuid)
                yield rows

    def _check_fits_memory(self, path: Path, rows: int, layers: Sequence[str]) -> None:
        """A shard is read whole: refuse, before reading, one whose features exceed the memory budget."""
        values = sum(int(np.prod(self.feature_shapes.get(name, (1,)), dtype=np.int64)) for name in layers)
        needed, budget = rows * values * 4, default_memory_budget()
        if needed > budget:
            raise PipelineError(f"{path} holds {needed / 2**30:.1f} GiB of features, more than the memory budget "
                                f"({budget / 2**30:.1f} GiB): extract with a smaller --shard-size, or pool the "
                                "features (--pooling avg)")

    def split_indexes(self) -> dict[str, SplitIndex]:
        """For every split: labels, paths, (shard number, row) locations and content hashes, in
        shard order, read from the shards' metadata once per FeatureStore (no features). Images
        without a label are in no split. The store is a snapshot of its manifest; reading rows
        checks each shard's identity again. A relabelled store (`relabelled`) answers with its
        labelling's splits."""
        if self._split_indexes is None:
            rows = self.rows_index()
            labelled = rows.labels != UNLABELLED
            self._split_indexes = {}
            for split in SPLITS:
                chosen = np.flatnonzero(labelled & (np.asarray(rows.splits, dtype=object) == split)) if len(rows) \
                    else np.zeros(0, np.int64)
                self._split_indexes[split] = SplitIndex(rows.labels[chosen], [rows.paths[i] for i in chosen],
                                                        rows.locations[chosen], [rows.sha256[i] for i in chosen])
        return self._split_indexes

    def rows_index(self) -> CacheRows:
        """Every row of the cache, labelled or not, in shard order (read once per FeatureStore)."""
        if self._rows_index is None:
            paths: list[str] = []
            digests: list[str] = []
            splits: list[str] = []
            labels, locations = [], []
            for number, path in enumerate(self.shards):
                shard = read_shard_index(path, self.fingerprint, self.feature_shapes, self._rows.get(path.name))
                self._check_uuid(shard)
                paths.extend(shard.paths)
                digests.extend(shard.sha256)
                splits.extend(shard.splits)
                labels.append(shard.labels)
                locations.append(np.stack([np.full(len(shard), number), np.arange(len(shard))], axis=1))
            self._rows_index = CacheRows(paths, digests,
                                         np.concatenate(labels).astype(np.int32) if labels else np.zeros(0, np.int32),
                                         splits, np.concatenate(locations).astype(np.int64) if locations
                                         else np.zeros((0, 2), np.int64))
        return self._rows_index

    def labelled_rows(self) -> np.ndarray:
        """Whether each cache row (rows_index order) is in a split: labelled, by the cache or by the
        labelling that relabelled it."""
        labelled = {path for index in self.split_indexes().values() for path in index.paths}
        return np.array([path in labelled for path in self.rows_index().paths], bool)

    @property
    def unlabelled(self) -> int:
        """How many images have no label (in the cache, or in the labelling that relabelled it)."""
        return int(np.sum(~self.labelled_rows()))

    def relabelled(self, class_names: Sequence[str], indexes: Mapping[str, SplitIndex], labelling: Any) -> FeatureStore:
        """This cache seen through a labelling: the same features and rows, with `class_names` and
        the splits of `indexes` (pipeline/labelling applies one). The shards are not touched."""
        view = copy.copy(self)
        view.class_names = list(class_names)
        view._split_indexes = {split: indexes[split] for split in SPLITS}
        view.labelling = labelling
        return view

    def read_rows(self, locations: np.ndarray, layers: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Features of the rows at `locations` (from split_indexes()), in that order, reading only those rows."""
        layers = tuple(layers or self.layers)
        out: dict[str, np.ndarray] = {}
        for number in np.unique(locations[:, 0]):
            where = np.flatnonzero(locations[:, 0] == number)
            path = self.shards[number]
            features = read_shard_features(path, layers, locations[where, 1], expected_uuid=self._uuids[path.name])
            for name in layers:
                if name not in out:
                    out[name] = np.empty((len(locations), *features[name].shape[1:]), np.float32)
                out[name][where] = features[name]
        return out

    def read(self, split: str | None = None, layers: Sequence[str] | None = None) -> Rows:
        """All rows of `split` (every split if None) in memory."""
        layers = tuple(layers or self.layers)
        parts = list(self.iter_shards(split, layers))
        if not parts:
            shapes = self.manifest["feature_shapes"]
            return Rows([], [], np.zeros(0, np.int32), [], {n: np.zeros((0, *shapes[n]), np.float32) for n in layers})
        return Rows(
            [path for p in parts for path in p.paths],
            [digest for p in parts for digest in p.sha256],
            np.concatenate([p.labels for p in parts]),
            [s for p in parts for s in p.splits],
            {n: np.concatenate([p.features[n] for p in parts]) for n in layers},
        )


def manifest_core(
    fingerprint: Fingerprint, class_names: Sequence[str], shards: Sequence[ShardIndex],
    shapes: Mapping[str, Sequence[int]],
) -> dict[str, Any]:
    """The part of manifest.json a reader relies on; extract adds its run report beside it."""
    splits = [s for shard in shards for s, label in zip(shard.splits, shard.labels) if label != UNLABELLED]
    unlabelled = sum(int(np.sum(shard.labels == UNLABELLED)) for shard in shards)
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint.as_dict(),
        "fingerprint_digest": fingerprint.digest(),
        "class_names": list(class_names),
        "feature_shapes": {name: list(shape) for name, shape in shapes.items()},
        "counts": {split: splits.count(split) for split in SPLITS} | ({"unlabelled": unlabelled} if unlabelled else {}),
        "shards": [{"file": s.path.name, "uuid": s.uuid, "rows": len(s)} for s in shards],
    }


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a cache directory, or {} where there is none yet."""
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        return {}
    way_out = "delete it and rerun extract to rewrite it"
    try:
        manifest = atomic.read_json(path)
    except (OSError, ValueError) as error:
        raise PipelineError(f"{path} is damaged ({one_line(error)}): {way_out}") from None
    if not isinstance(manifest, dict):
        raise PipelineError(f"{path} is damaged (not a JSON object): {way_out}")
    return manifest


def find_caches(cache_root: Path, fingerprint_digest: str | None = None,
                exclude: Path | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Every cache directory under `cache_root` with a readable manifest (of `fingerprint_digest`
    when given), newest manifest first, as (directory, manifest). The one way caches are found
    (the latest for train-head, siblings to copy from, activations for finetune --cached); a
    damaged or foreign directory is not a cache and is skipped, never an error."""
    found = []
    for path in Path(cache_root).glob(f"*/{MANIFEST_NAME}"):
        directory = path.parent
        if exclude is not None and directory == exclude:
            continue
        try:
            manifest = read_manifest(directory)
            if not isinstance(manifest, dict) or not isinstance(manifest.get("fingerprint"), dict):
                continue
            if fingerprint_digest is not None and manifest.get("fingerprint_digest") != fingerprint_digest:
                continue
            found.append((path.stat().st_mtime, directory, manifest))
        except (PipelineError, OSError):
            continue
    return [(directory, manifest) for _, directory, manifest in sorted(found, key=lambda f: -f[0])]


def feature_shapes(shard: Path, layers: Sequence[str]) -> dict[str, tuple[int, ...]]:
    with h5py.File(shard, "r") as handle:
        return {name: tuple(handle["features"][name].shape[1:]) for name in layers}
