"""Stage one's plan: compare an image folder with a cache and decide, row by row, what to keep,
copy, rewrite and extract; and carry out the parts that need no backbone (copying cached rows,
rewriting shards). The backbone work is an engine's (pipeline/extraction/local_engine.py).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cache import store
from pipeline.cache.fingerprint import Fingerprint
from pipeline.cache.store import Rows, ShardIndex
from pipeline.data.dataset import ImageRecord, ScannedDataset
from pipeline.errors import PipelineError


@dataclass
class UpdatePlan:
    """What one run does to bring a cache in line with the folder."""

    keep: dict[Path, list[int]]  # shard -> rows still live (path and bytes unchanged)
    rewrite: set[Path]  # shards that lose rows or whose labels/splits/classes change
    copy: list[tuple[ImageRecord, Path, int]]  # images whose bytes are cached under another path (shard, row)
    extract: list[ImageRecord]  # images that need the backbone


def plan_update(
    dataset: ScannedDataset, shards: Sequence[ShardIndex], known_failures: set[tuple[str, str]]
) -> UpdatePlan:
    """Compare the folder with the shards: rows whose path and bytes are unchanged stay, images
    whose bytes are cached elsewhere are copied, the rest go through the backbone. Images that
    failed to decode before, with the same bytes, are not tried again."""
    current = {record.path: record for record in dataset.records}
    claimed: set[str] = set()
    by_hash: dict[str, tuple[Path, int]] = {}
    keep: dict[Path, list[int]] = {}
    rewrite: set[Path] = set()
    for shard in shards:
        rows = []
        for i, (path, digest) in enumerate(zip(shard.paths, shard.sha256)):
            by_hash.setdefault(digest, (shard.path, i))
            record = current.get(path)
            if record is None or record.sha256 != digest or path in claimed:
                continue
            claimed.add(path)
            rows.append(i)
            if record.label != shard.labels[i] or record.split != shard.splits[i]:
                rewrite.add(shard.path)
        keep[shard.path] = rows
        if len(rows) != len(shard) or shard.class_names != dataset.class_names:
            rewrite.add(shard.path)
    copy, extract = [], []
    for record in dataset.records:
        if record.path in claimed or (record.path, record.sha256) in known_failures:
            continue
        if record.sha256 and record.sha256 in by_hash:  # "" : not hashed yet (the Ray engine's first run)
            copy.append((record, *by_hash[record.sha256]))
        else:
            extract.append(record)
    return UpdatePlan(keep, rewrite, copy, extract)


def add_sibling_sources(plan: UpdatePlan, directory: Path, fingerprint: Fingerprint) -> None:
    """Images cached under the same fingerprint for another data folder (a copy, a moved
    folder, a subset) are copied from there: one backbone pass per image per fingerprint. A cache
    whose first extract was interrupted before its manifest was written donates its finished
    shards too (each shard says its own fingerprint)."""
    wanted = {record.sha256 for record in plan.extract if record.sha256}
    if not wanted:
        return
    found: dict[str, tuple[Path, int]] = {}
    siblings = [sibling for sibling, _ in store.find_caches(directory.parent, fingerprint.digest(), exclude=directory)]
    siblings += unfinished_caches(directory.parent, exclude=directory)
    for sibling in siblings:
        try:
            for shard_path in store.shard_paths(sibling):
                index = store.read_shard_index(shard_path, fingerprint)
                for row, digest in enumerate(index.sha256):
                    if digest in wanted:
                        found.setdefault(digest, (shard_path, row))
        except PipelineError:
            continue  # a damaged or foreign cache is simply not a source
    plan.copy += [(record, *found[record.sha256]) for record in plan.extract if record.sha256 in found]
    plan.extract = [record for record in plan.extract if record.sha256 not in found]


def unfinished_caches(cache_root: Path, exclude: Path) -> list[Path]:
    """Cache directories under `cache_root` with shards and no manifest yet (a first extract
    interrupted), newest first."""
    found = []
    for directory in Path(cache_root).iterdir():
        if directory == exclude or not directory.is_dir() or (directory / store.MANIFEST_NAME).exists():
            continue
        try:
            shards = store.shard_paths(directory)
        except (PipelineError, OSError):
            continue
        if shards:
            found.append((max(p.stat().st_mtime for p in shards), directory))
    return [directory for _, directory in sorted(found, key=lambda item: -item[0])]


class ShardSequence:
    """Hands out shard file names after the highest existing one."""

    def __init__(self, directory: Path) -> None:
        existing = [store.shard_number(p) for p in store.shard_paths(directory)]
        self.directory = directory
        self.next = max((n for n in existing if n is not None), default=-1) + 1

    def new_path(self) -> Path:
        path = self.directory / store.shard_name(self.next)
        self.next += 1
        return path


class ShardWriter:
    """Writes rows of images as new shards of one cache (the one writer every engine uses): named
    in sequence, or by their unit's key where a unit of work defines the shard (the Ray engine,
    whose workers write with a copy of this writer)."""

    def __init__(self, directory: Path, class_names: Sequence[str], fingerprint: Fingerprint) -> None:
        self.directory = directory
        self.class_names = list(class_names)
        self.fingerprint = fingerprint
        self._sequence: ShardSequence | None = None  # listed on the first sequential write

    def write(self, records: Sequence[ImageRecord], features: dict[str, np.ndarray], unit: str | None = None) -> Path:
        if unit is not None:
            path = self.directory / store.unit_shard_name(unit)
        else:
            self._sequence = self._sequence or ShardSequence(self.directory)
            path = self._sequence.new_path()
        store.write_shard(path, records_to_rows(records, features), self.class_names, self.fingerprint)
        return path

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_sequence": None}  # a copy on a worker never hands out sequence numbers


def unit_description(records: Sequence[ImageRecord]) -> str:
    """A unit's images as JSON: path, label, split, sha256 ("" where not known yet), size, mtime."""
    return json.dumps([[r.path, r.label, r.split, r.sha256, r.size, r.mtime_ns] for r in records])


def unit_key(description: str, fingerprint: Fingerprint, class_names: Sequence[str]) -> str:
    """What defines a unit's shard: its images (`unit_description`: paths, sizes, mtimes and the
    hashes where known, with labels and splits), the class names and the fingerprint. The same
    unit always gets the same key."""
    digest = hashlib.sha256(fingerprint.digest().encode())
    digest.update(json.dumps(list(class_names)).encode())
    digest.update(description.encode())
    return digest.hexdigest()


def cut_units(records: Sequence[ImageRecord], shard_size: int) -> list[Sequence[ImageRecord]]:
    """The images to extract in units of one shard, in plan order."""
    return list(_chunks(records, shard_size))


def copy_cached(plan: UpdatePlan, layers: Sequence[str], shard_size: int, writer: ShardWriter) -> None:
    """Images whose bytes are cached under another path (renamed, moved, duplicated): their rows
    are copied into new shards, no backbone pass."""
    for chunk in _chunks(plan.copy, shard_size):
        by_shard: dict[Path, list[int]] = defaultdict(list)
        for _, shard_path, row in chunk:
            by_shard[shard_path].append(row)
        parts = {path: store.read_shard_rows(path, layers, rows) for path, rows in by_shard.items()}
        position = {path: 0 for path in parts}
        features: dict[str, list[np.ndarray]] = defaultdict(list)
        for _, shard_path, _ in chunk:
            for name in layers:
                features[name].append(parts[shard_path].features[name][position[shard_path]])
            position[shard_path] += 1
        writer.write([r for r, _, _ in chunk], {n: np.stack(v) for n, v in features.items()})


def rewrite_changed(plan: UpdatePlan, dataset: ScannedDataset, shards: Sequence[ShardIndex], layers: Sequence[str],
                    fingerprint: Fingerprint) -> None:
    """Drop rows of removed or changed images and apply new labels, splits and class names,
    copying features: no backbone pass."""
    current = {record.path: record for record in dataset.records}
    for shard in shards:
        if shard.path not in plan.rewrite:
            continue
        rows_to_keep = plan.keep[shard.path]
        if not rows_to_keep:
            shard.path.unlink()
            continue
        rows = store.read_shard_rows(shard.path, layers, rows_to_keep)
        records = [current[p] for p in rows.paths]
        rows.labels = np.array([r.label for r in records], dtype=np.int32)
        rows.splits = [r.split for r in records]
        store.write_shard(shard.path, rows, dataset.class_names, fingerprint)


def records_to_rows(records: Sequence[ImageRecord], features: dict[str, np.ndarray]) -> Rows:
    return Rows(
        [r.path for r in records],
        [r.sha256 for r in records],
        np.array([r.label for r in records], dtype=np.int32),
        [r.split for r in records],
        features,
    )


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
