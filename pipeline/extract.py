"""Stage one: pass every image once through the frozen backbone and cache its features.

Incremental and resumable: images are known by content hash, completed shards are kept, and
only images the cache does not hold yet go through the backbone.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from pipeline import store
from pipeline.backbones import FeatureExtractor, build_backbone, get_backbone, preprocess
from pipeline.dataset import HashIndex, ImageRecord, ScannedDataset, SplitConfig, scan_dataset
from pipeline.errors import PipelineError
from pipeline.images import DEFAULT_MAX_PIXELS, MAX_IMAGE_SIZE, RESIZE_METHOD, EncodedImages
from pipeline.precision import resolve_precision
from pipeline.store import Fingerprint, Rows, ShardIndex
from pipeline.weights import ResolvedWeights, resolve_weights

DEFAULT_SHARD_SIZE = 1024


@dataclass
class ExtractOptions:
    data: Path
    backbone: str = "vgg16"
    image_size: int | None = None  # the backbone's default
    pooling: str = "none"
    layers: Sequence[str] | None = None  # the backbone's default feature layer
    precision: str | None = None  # the fastest safe choice for the hardware
    weights: str = "imagenet"
    preprocessing: str | None = None  # follows from the weights
    batch_size: int = 32
    shard_size: int = DEFAULT_SHARD_SIZE  # rounded up to a multiple of batch_size
    cache_root: Path = Path("features")
    splits: SplitConfig = field(default_factory=SplitConfig)
    rehash: bool = False  # read every file instead of trusting remembered (size, mtime) hashes
    strict: bool = False  # stop at the first image that cannot be decoded instead of skipping it
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are held back with an error, never decoded
    progress: bool = True


@dataclass
class ExtractSummary:
    cache_dir: Path
    images: int  # images the cache holds now
    new: int  # passed through the backbone in this run
    reused: int  # features taken from the cache
    skipped: list[dict[str, str]]  # images that could not be decoded: path, reason
    seconds: float
    backbone_seconds: float
    backbone_batches: int  # forward passes of the backbone in this run
    backbone_images: int  # images in those passes
    input_wait_seconds: float  # part of backbone_seconds spent waiting for decoded images

    @property
    def images_per_second(self) -> float:
        return self.new / self.backbone_seconds if self.backbone_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "cache_dir": str(self.cache_dir),
            "images": self.images,
            "new": self.new,
            "reused": self.reused,
            "skipped": len(self.skipped),
            "seconds": round(self.seconds, 2),
            "backbone_seconds": round(self.backbone_seconds, 2),
            "images_per_second": round(self.images_per_second, 1),
            "backbone_batches": self.backbone_batches,
            "backbone_images": self.backbone_images,
            "input_wait_seconds": round(self.input_wait_seconds, 2),
        }


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
        if record.sha256 in by_hash:
            copy.append((record, *by_hash[record.sha256]))
        else:
            extract.append(record)
    return UpdatePlan(keep, rewrite, copy, extract)


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _ShardSequence:
    """Hands out shard file names after the highest existing one."""

    def __init__(self, directory: Path) -> None:
        existing = [store.shard_number(p) for p in store.shard_paths(directory)]
        self.directory = directory
        self.next = max(existing, default=-1) + 1

    def new_path(self) -> Path:
        path = self.directory / store.shard_name(self.next)
        self.next += 1
        return path


class _RowBuffer:
    """Backbone outputs waiting to fill a shard, with the record index of every row."""

    def __init__(self) -> None:
        self.index: list[np.ndarray] = []
        self.features: dict[str, list[np.ndarray]] = defaultdict(list)

    def __len__(self) -> int:
        return sum(len(part) for part in self.index)

    def add(self, index: np.ndarray, features: dict[str, np.ndarray]) -> None:
        self.index.append(index)
        for name, values in features.items():
            self.features[name].append(values)

    def take(self, count: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The first `count` rows, leaving the rest buffered."""
        index = np.concatenate(self.index)
        features = {name: np.concatenate(parts) for name, parts in self.features.items()}
        self.index = [index[count:]]
        self.features = defaultdict(list, {name: [values[count:]] for name, values in features.items()})
        return index[:count], {name: values[:count] for name, values in features.items()}


def _records_to_rows(records: Sequence[ImageRecord], features: dict[str, np.ndarray]) -> Rows:
    return Rows(
        [r.path for r in records],
        [r.sha256 for r in records],
        np.array([r.label for r in records], dtype=np.int32),
        [r.split for r in records],
        features,
    )


class _StopRequest:
    """The first Ctrl-C (SIGINT) asks the extraction to stop after the batch in progress, once its
    rows are safely in a shard; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        print("\nstopping after the current batch (Ctrl-C again to stop at once)", flush=True)

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None and not self.requested:
            signal.signal(signal.SIGINT, self._previous)


class _Extraction:
    """One run of stage one over one cache directory."""

    def __init__(self, options: ExtractOptions) -> None:
        self.options = options
        self.spec = get_backbone(options.backbone)
        self.image_size = options.image_size or self.spec.default_image_size
        if not 0 < self.image_size <= MAX_IMAGE_SIZE:
            raise PipelineError(f"--image-size {self.image_size}: use 1 to {MAX_IMAGE_SIZE} pixels (a backbone's "
                                "activations at larger sizes need tens of GB per batch)")
        if options.max_pixels < 1:
            raise PipelineError("--max-megapixels must be positive")
        self.max_pixels = options.max_pixels
        self.layers = tuple(options.layers or self.spec.default_layers)
        self.precision = resolve_precision(options.precision)
        if options.batch_size < 1 or options.shard_size < 1:
            raise PipelineError("--batch-size and --shard-size must be positive")
        self.weights: ResolvedWeights = resolve_weights(
            self.spec.name, options.weights, self.spec.keras_weights, self.spec.pretrained_default,
            options.preprocessing,
        )
        self.fingerprint = Fingerprint(
            backbone=self.spec.name,
            weights_source=self.weights.source,
            weights_identity=self.weights.identity,
            image_size=self.image_size,
            resize_method=RESIZE_METHOD,
            preprocessing=self.weights.preprocessing,
            layers=self.layers,
            pooling=options.pooling,
            precision=self.precision,
            tensorflow=".".join(tf.__version__.split(".")[:2]),
        )
        batches_per_shard = -(-options.shard_size // options.batch_size)
        # Shards hold whole batches, so a resumed run feeds the backbone the same batches.
        self.shard_size = batches_per_shard * options.batch_size
        self.extractor: FeatureExtractor | None = None
        self.backbone_seconds = 0.0
        self.input_wait_seconds = 0.0  # time the backbone waited for decoded images
        self.changed_while_read: list[ImageRecord] = []  # bytes changed between the scan and the read
        self.held_back: list[str] = []  # images neither extracted nor skipped, with the reason (an error)

    def feature_extractor(self) -> FeatureExtractor:
        if self.extractor is None:
            backbone = build_backbone(self.spec, self.image_size, self.precision, self.weights)
            self.extractor = FeatureExtractor(backbone, self.layers, self.options.pooling)
        return self.extractor

    def run(self) -> ExtractSummary:
        started = time.perf_counter()
        if len(set(self.layers)) != len(self.layers):
            raise PipelineError("--layer names must be distinct")
        directory = Path(self.options.cache_root) / store.cache_directory_name(self.fingerprint, self.options.data)
        hashes = HashIndex(directory / store.HASH_INDEX_NAME, trusted=not self.options.rehash)
        dataset = scan_dataset(self.options.data, self.options.splits, hashes)
        created = not directory.exists()
        try:
            with store.exclusive_lock(directory):
                summary = self._update(directory, dataset, started)
                for record in self.changed_while_read:
                    hashes.forget(record.path)
                hashes.save()
        except BaseException:
            if created and not store.shard_paths(directory):
                shutil.rmtree(directory, ignore_errors=True)  # leave no empty cache behind
            raise
        if self.held_back:
            more = f" ({len(self.held_back) - 1} more images like it, listed by the next run)" if len(
                self.held_back) > 1 else ""
            raise PipelineError(self.held_back[0] + more)
        return summary

    def _update(self, directory: Path, dataset: ScannedDataset, started: float) -> ExtractSummary:
        store.remove_temporaries(directory)
        shards = [store.read_shard_index(p, self.fingerprint) for p in store.shard_paths(directory)]
        present = {(r.path, r.sha256) for r in dataset.records}
        try:
            earlier = store.read_manifest(directory)
        except PipelineError:
            earlier = {}  # only a summary: this run rewrites it; failed images are simply retried
        earlier_failures = [s for s in earlier.get("skipped", []) if (s["path"], s["sha256"]) in present]
        if self.options.strict and earlier_failures:
            first = earlier_failures[0]
            raise PipelineError(f"{dataset.root / first['path']}: {first['reason']} (--strict): fix or remove it "
                                "and rerun")
        plan = plan_update(dataset, shards, {(s["path"], s["sha256"]) for s in earlier_failures})
        if plan.extract:
            self._reuse_from_sibling_caches(plan, directory)
        sequence = _ShardSequence(directory)
        self._copy_cached(plan, dataset, sequence)
        new_failures = self._extract_new(plan.extract, dataset, sequence)
        self._rewrite_changed(plan, dataset, shards)
        skipped = earlier_failures + new_failures
        new = len(plan.extract) - len(new_failures) - len(self.held_back)
        images = len(dataset.records) - len(skipped) - len(self.held_back)
        summary = ExtractSummary(
            cache_dir=directory,
            images=images,
            new=new,
            reused=images - new,
            skipped=skipped,
            seconds=time.perf_counter() - started,
            backbone_seconds=self.backbone_seconds,
            backbone_batches=self.extractor.batches if self.extractor else 0,
            backbone_images=self.extractor.images if self.extractor else 0,
            input_wait_seconds=self.input_wait_seconds,
        )
        self._write_manifest(directory, dataset, summary)
        return summary

    def _reuse_from_sibling_caches(self, plan: UpdatePlan, directory: Path) -> None:
        """Images cached under the same fingerprint for another data folder (a copy, a moved
        folder, a subset) are copied from there: one backbone pass per image per fingerprint."""
        wanted = {record.sha256 for record in plan.extract}
        found: dict[str, tuple[Path, int]] = {}
        for sibling in sorted(directory.parent.iterdir()):
            if sibling == directory or not sibling.is_dir():
                continue
            try:
                if store.read_manifest(sibling).get("fingerprint_digest") != self.fingerprint.digest():
                    continue
                for shard_path in store.shard_paths(sibling):
                    index = store.read_shard_index(shard_path, self.fingerprint)
                    for row, digest in enumerate(index.sha256):
                        if digest in wanted:
                            found.setdefault(digest, (shard_path, row))
            except PipelineError:
                continue  # a damaged or foreign cache is simply not a source
        plan.copy += [(record, *found[record.sha256]) for record in plan.extract if record.sha256 in found]
        plan.extract = [record for record in plan.extract if record.sha256 not in found]

    def _copy_cached(self, plan: UpdatePlan, dataset: ScannedDataset, sequence: _ShardSequence) -> None:
        """Images whose bytes are cached under another path (renamed, moved, duplicated)."""
        for chunk in _chunks(plan.copy, self.shard_size):
            by_shard: dict[Path, list[int]] = defaultdict(list)
            for _, shard_path, row in chunk:
                by_shard[shard_path].append(row)
            parts = {path: store.read_shard_rows(path, self.layers, rows) for path, rows in by_shard.items()}
            position = {path: 0 for path in parts}
            features: dict[str, list[np.ndarray]] = defaultdict(list)
            for _, shard_path, _ in chunk:
                for name in self.layers:
                    features[name].append(parts[shard_path].features[name][position[shard_path]])
                position[shard_path] += 1
            rows = _records_to_rows([r for r, _, _ in chunk], {n: np.stack(v) for n, v in features.items()})
            store.write_shard(sequence.new_path(), rows, dataset.class_names, self.fingerprint)

    def _extract_new(self, records: Sequence[ImageRecord], dataset: ScannedDataset,
                     sequence: _ShardSequence) -> list[dict[str, str]]:
        """Pass `records` through the backbone into new shards; returns the ones that failed."""
        if not records:
            return []
        extractor = self.feature_extractor()
        source = EncodedImages([dataset.root / record.path for record in records], self.max_pixels)
        preprocessing = self.weights.preprocessing
        batches = source.batches(self.image_size, self.options.batch_size, lambda x: preprocess(x, preprocessing))

        def as_read(index: int) -> ImageRecord:
            """The record with the hash of the bytes that were decoded."""
            digest = source.sha256.get(index, records[index].sha256)
            return records[index] if digest == records[index].sha256 else dataclasses.replace(records[index],
                                                                                              sha256=digest)

        buffer = _RowBuffer()
        decoded: set[int] = set()

        def write(count: int) -> None:
            index, features = buffer.take(count)
            rows = _records_to_rows([as_read(i) for i in index], features)
            store.write_shard(sequence.new_path(), rows, dataset.class_names, self.fingerprint)

        def failed(index: int) -> PipelineError:
            reason = source.failure_reason(index, self.image_size)  # raises for what is not a damaged image
            return PipelineError(
                f"{dataset.root / records[index].path}: {reason} (--strict): fix or remove it and rerun; the "
                f"{len(decoded)} images extracted so far are kept"
            )

        started = time.perf_counter()
        expected = 0  # the next record index; batches arrive in record order, failures leave gaps
        with tqdm(total=len(records), unit="img", desc="extract", disable=not self.options.progress,
                  dynamic_ncols=True) as bar, _StopRequest() as stop:
            iterator = iter(batches)
            while True:
                waiting = time.perf_counter()
                try:
                    index, images = next(iterator)
                except StopIteration:
                    break
                self.input_wait_seconds += time.perf_counter() - waiting
                index = index.numpy()
                buffer.add(index, extractor(images))
                decoded.update(index.tolist())
                bar.update(len(index))
                gaps = sorted(set(range(expected, int(index[-1]) + 1)) - decoded)
                expected = int(index[-1]) + 1
                if self.options.strict and gaps:
                    write(len(buffer))
                    raise failed(gaps[0])
                while len(buffer) >= self.shard_size:
                    write(self.shard_size)
                if stop.requested:
                    if len(buffer):
                        write(len(buffer))
                    raise KeyboardInterrupt
            if len(buffer):
                write(len(buffer))
            if self.options.strict and expected < len(records):
                raise failed(expected)
            if len(decoded) < len(records):
                bar.set_postfix(skipped=len(records) - len(decoded))
                bar.update(len(records) - len(decoded))  # undecodable files end the bar too
        self.backbone_seconds += time.perf_counter() - started
        self.changed_while_read += [records[i] for i, digest in source.sha256.items() if digest != records[i].sha256]
        failures = []
        for index in sorted(set(range(len(records))) - decoded):
            try:
                reason = source.failure_reason(index, self.image_size)
            except PipelineError as error:  # not a damaged image: not recorded, tried again next run
                self.held_back.append(str(error))
                continue
            failures.append({"path": records[index].path, "sha256": as_read(index).sha256, "reason": reason})
        return failures

    def _rewrite_changed(self, plan: UpdatePlan, dataset: ScannedDataset, shards: Sequence[ShardIndex]) -> None:
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
            rows = store.read_shard_rows(shard.path, self.layers, rows_to_keep)
            records = [current[p] for p in rows.paths]
            rows.labels = np.array([r.label for r in records], dtype=np.int32)
            rows.splits = [r.split for r in records]
            store.write_shard(shard.path, rows, dataset.class_names, self.fingerprint)

    def _write_manifest(self, directory: Path, dataset: ScannedDataset, summary: ExtractSummary) -> None:
        shards = [store.read_shard_index(p, self.fingerprint) for p in store.shard_paths(directory)]
        manifest = store.manifest_core(self.fingerprint, dataset.class_names, shards, self.feature_shapes(shards))
        manifest |= {
            "weights": self.weights.describe(),
            "dataset": {
                "root": str(dataset.root.resolve()),
                "layout": dataset.layout,
                "split": vars(self.options.splits) if dataset.layout == "class-folders" else "as given by folders",
            },
            "skipped": summary.skipped,
            "ignored": [{"path": p, "reason": r} for p, r in dataset.ignored],
            "last_run": summary.as_dict() | {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        }
        store.write_json_atomic(directory / store.MANIFEST_NAME, manifest)

    def feature_shapes(self, shards: Sequence[ShardIndex]) -> dict[str, tuple[int, ...]]:
        if shards:
            return store.feature_shapes(shards[0].path, self.layers)
        return self.feature_extractor().output_shapes()


def extract_features(options: ExtractOptions) -> ExtractSummary:
    """Bring the cache for (options' fingerprint, data folder) up to date and summarise the run."""
    return _Extraction(options).run()
