"""Stage one: pass every image once through the frozen backbone and cache its features.

Incremental and resumable: images are known by content hash, completed shards are kept, and
only images the cache does not hold yet go through the backbone. This module holds one run
together: the fingerprint, the cache's lock, the scan, the plan (pipeline/extraction/plan.py), the engine
that runs the backbone (pipeline/extraction/local_engine.py), and the manifest, written last.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic, backend
from pipeline.backbone import int8
from pipeline.backbone.network import (
    FeatureExtractor,
    build_backbone,
    extractor_key,
    keep_extractor,
    preprocess,
    take_kept_extractor,
)
from pipeline.backbone.pooling import POOLINGS
from pipeline.backbone.precision import resolve_precision
from pipeline.backbone.registry import BackboneSpec, get_backbone
from pipeline.backbone.weights import ResolvedWeights
from pipeline.cache import store
from pipeline.cache.fingerprint import Fingerprint, cache_directory_name
from pipeline.cache.store import SPLITS, FeatureStore, ShardIndex
from pipeline.data.dataset import UNLABELLED_LAYOUTS, HashIndex, ScannedDataset, SplitConfig, scan_dataset, scan_table
from pipeline.errors import PipelineError
from pipeline.extraction.engine import ENGINES, Engine, EngineResult, strict_error
from pipeline.extraction.local_engine import LocalEngine
from pipeline.extraction.plan import ShardWriter, add_sibling_sources, copy_cached, plan_update, rewrite_changed
from pipeline.extraction.ray_engine import BackboneRecipe, RayCluster, RayEngine
from pipeline.images import decode_tf
from pipeline.images.formats import DEFAULT_MAX_PIXELS, MAX_IMAGE_SIZE, RESIZE_METHOD, image_dimensions
from pipeline.images.reading import EncodedImages, decoder_identity
from pipeline.labelling.labelling import MISSING

DEFAULT_SHARD_SIZE = 1024


@dataclass
class ExtractOptions:
    data: Path | None  # the image folder; with `images`, the folder the table's paths are relative to
    backbone: str = "vgg16"
    image_size: int | None = None  # the backbone's default
    pooling: str | None = None  # the backbone's default (none: full maps; avg for EfficientNet-Lite's layers)
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
    engine: str = "local"  # "local" (this process) or "ray" (pipeline/extraction/ray_engine.py)
    ray_address: str | None = None  # None: a local Ray instance for the command; "auto" or HOST:PORT: join one
    workers: int | None = None  # Ray engine: backbone actors (default: one per GPU, else one per node)
    images: Any = None  # a table of image paths (CSV, TSV, Parquet or a dataframe) instead of a folder scan
    path_column: str = "path"  # the table's column of paths
    missing: str = "error"  # a path in the table that is not an image file: "error", or "skip" it

    def __post_init__(self) -> None:
        """The one check of extract's options, for the command line and Python alike."""
        get_backbone(self.backbone)  # an unknown name: one line listing the known ones
        if self.missing not in MISSING:
            raise PipelineError(f"--missing {self.missing!r}: choose {' or '.join(MISSING)}")
        if self.images is None and self.data is None:
            raise PipelineError("extract needs --data DIR (an image folder), or --images TABLE (a table of paths)")
        if self.images is None and (self.path_column != "path" or self.missing != "error"):
            raise PipelineError("--path-column and --missing read a table of images: add --images TABLE")
        if self.images is not None:
            from pipeline.data.dataset import table_root

            self.data = table_root(self.images, self.data, self.path_column)
        if self.image_size is not None and not 0 < self.image_size <= MAX_IMAGE_SIZE:
            raise PipelineError(f"--image-size {self.image_size}: use 1 to {MAX_IMAGE_SIZE} pixels (a backbone's "
                                "activations at larger sizes need tens of GB per batch)")
        if self.max_pixels < 1:
            raise PipelineError("--max-megapixels must be positive")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise PipelineError(f"--pooling {self.pooling!r}: choose from {', '.join(POOLINGS)}")
        if self.layers is not None:
            if isinstance(self.layers, str) or not all(isinstance(name, str) and name for name in self.layers):
                raise PipelineError("--layer takes layer names (a list in Python), e.g. block4_pool,block5_pool")
            if len(set(self.layers)) != len(self.layers):
                raise PipelineError("--layer names must be distinct")
        if self.engine not in ENGINES:
            raise PipelineError(f"unknown engine {self.engine!r}: choose {' or '.join(ENGINES)}")
        if self.engine == "local" and (self.ray_address or self.workers):
            raise PipelineError("--ray-address and --workers belong to --engine ray: add it, or leave them out")
        if self.workers is not None and self.workers < 1:
            raise PipelineError("--workers must be positive")
        if self.batch_size < 1 or self.shard_size < 1:
            raise PipelineError("--batch-size and --shard-size must be positive")


@dataclass
class ExtractSummary:
    cache_dir: Path
    images: int  # images the cache holds now
    new: int  # passed through the backbone in this run
    reused: int  # features taken from the cache
    skipped: list[dict[str, str]]  # images that could not be decoded: path, reason
    seconds: float
    loop_seconds: float  # the extraction loop: waiting for decoded images, the backbone, writing shards
    backbone_batches: int  # forward passes of the backbone in this run
    backbone_images: int  # images in those passes
    input_wait_seconds: float  # part of loop_seconds spent waiting for decoded images
    engine: str = "local"
    retried_units: int = 0  # Ray engine: units of work Ray started more than once
    restarted_actors: int = 0  # Ray engine: backbone actors Ray started again after one died
    nodes: int = 0  # Ray engine: nodes whose workers wrote shards in this run
    warmup_seconds: float = 0.0  # part of loop_seconds until the backbone was warm (local: the first batch)
    warmup_images: int = 0  # new images done within warmup_seconds
    actor_build_seconds: float = 0.0  # Ray engine: the slowest actor's set-up (imports, weights, model)
    notes: list[str] = field(default_factory=list)  # what the user should know: carved splits, small images, ...

    @property
    def images_per_second(self) -> float:
        """New images per second of the extraction loop."""
        return self.new / self.loop_seconds if self.loop_seconds > 0 else 0.0

    @property
    def warm_images_per_second(self) -> float:
        """New images per second once the backbone was warm (compiled, first batch done): the
        steady rate a long run tends to. 0 when the run had nothing after its first batch."""
        seconds = self.loop_seconds - self.warmup_seconds
        images = self.backbone_images - self.warmup_images
        return images / seconds if seconds > 0 and images > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "cache_dir": str(self.cache_dir),
            "images": self.images,
            "new": self.new,
            "reused": self.reused,
            "skipped": len(self.skipped),
            "seconds": round(self.seconds, 2),
            "loop_seconds": round(self.loop_seconds, 2),
            "images_per_second": round(self.images_per_second, 1),
            "backbone_batches": self.backbone_batches,
            "backbone_images": self.backbone_images,
            "input_wait_seconds": round(self.input_wait_seconds, 2),
            "engine": self.engine,
            "retried_units": self.retried_units,
            "restarted_actors": self.restarted_actors,
            "nodes": self.nodes,
            "warmup_seconds": round(self.warmup_seconds, 2),
            "warm_images_per_second": round(self.warm_images_per_second, 1),
            "actor_build_seconds": round(self.actor_build_seconds, 2),
            "notes": self.notes,
        }


class ExtractedCache(FeatureStore):
    """What extract returns: the cache as it now stands (a FeatureStore, passed on to train_head as it
    is), with `summary`, what this extract did (images new, cached, failed; seconds; throughput)."""

    def __init__(self, summary: ExtractSummary) -> None:
        super().__init__(summary.cache_dir)
        self.summary = summary


class _Extraction:
    """One run of stage one over one cache directory."""

    def __init__(self, options: ExtractOptions, cluster: RayCluster | None = None) -> None:
        self.options = options
        self.spec = get_backbone(options.backbone)
        self.image_size = options.image_size or self.spec.default_image_size
        self.max_pixels = options.max_pixels
        self.layers = tuple(options.layers or self.spec.default_layers)
        self.pooling = options.pooling or self.spec.default_pooling
        if options.engine == "ray" and not backend.is_tensorflow():
            raise PipelineError("--engine ray runs on the tensorflow backend: use --engine local with --backend "
                                f"{backend.current()}, or --backend tensorflow")
        self.precision = resolve_precision(options.precision, gpu=(lambda: bool(cluster.gpus)) if cluster else None)
        self.int8_notes: list[str] = []
        if self.precision == "int8":
            self._check_int8(options)
        self.weights: ResolvedWeights = self.spec.resolve_weights(options.weights, options.preprocessing)
        backend.exact_float32(self.precision)
        library, version = backend.identity()
        if self.precision == "int8":  # computed by ONNX Runtime from the float graph TensorFlow converted
            library, runtime = "onnxruntime", int8.runtime_identity()
        self.fingerprint = Fingerprint(
            backbone=self.spec.name,
            weights_source=self.weights.source,
            weights_identity=self.weights.identity,
            image_size=self.image_size,
            resize_method=RESIZE_METHOD,
            preprocessing=self.weights.preprocessing,
            layers=self.layers,
            pooling=self.pooling,
            precision=self.precision,
            tensorflow=version if library in ("tensorflow", "onnxruntime") else "none",
            backend=library if library == "tensorflow" else runtime if library == "onnxruntime" else
            f"{library}-{version}",
            decoder=decoder_identity(),
            calibration=int8.CALIBRATION_RULE if self.precision == "int8" else "none",
        )
        batches_per_shard = -(-options.shard_size // options.batch_size)
        # Shards hold whole batches, so a resumed run feeds the backbone the same batches.
        self.shard_size = batches_per_shard * options.batch_size
        self.extractor: FeatureExtractor | None = None
        self.extractor_key = extractor_key(self.spec, self.image_size, self.precision, self.weights, self.layers,
                                           self.pooling)
        self.scanned: tuple[Path, ScannedDataset] | None = None  # the cache and its images, once scanned (int8)
        self.engine: Engine
        if cluster is None:
            self.engine = LocalEngine(self.feature_extractor, self.image_size, self.weights.preprocessing,
                                      options.batch_size, self.shard_size, self.max_pixels, options.strict,
                                      options.progress)
        else:
            self.engine = RayEngine(self.backbone_weights, self.backbone_recipe, self.image_size, self.shard_size,
                                    self.max_pixels, options.workers, options.strict, options.progress, cluster)
        self.engine_result = EngineResult()
        self.small_note: str | None = None
        self.early_notes: list[str] = []  # said before the backbone pass, and again in the summary

    def _cache_of_earlier_jpeg_decoding(self) -> Path | None:
        """The cache of these settings that TensorFlow filled before JPEGs were decoded accurately
        (its fingerprint's decoder was "tensorflow"), where there is one."""
        if self.fingerprint.decoder != decode_tf.DECODER:
            return None
        earlier = dataclasses.replace(self.fingerprint, backend="tensorflow", decoder="tensorflow")
        directory = Path(self.options.cache_root) / cache_directory_name(earlier, self.options.data)
        return directory if (directory / store.MANIFEST_NAME).is_file() else None

    def _check_int8(self, options: ExtractOptions) -> None:
        """int8 runs here, on ONNX Runtime, from a graph TensorFlow converts: refused in one line
        elsewhere, or for a backbone and size whose heads failed the certificate."""
        if options.engine == "ray":
            raise PipelineError("--precision int8 runs the quantised backbone on ONNX Runtime in this process: use "
                                "--engine local (or --precision bf16/fp32 on Ray)")
        if not backend.is_tensorflow():
            raise PipelineError(f"--precision int8 converts the backbone with TensorFlow (tf2onnx), not "
                                f"{backend.current()}: use --backend tensorflow (the int8 graph then runs on ONNX "
                                "Runtime)")
        int8.require_runtime()
        self.int8_notes = int8.check_offered(self.spec.name, self.image_size)

    def feature_extractor(self) -> FeatureExtractor:
        if self.extractor is None:
            if self.precision == "int8":
                self.extractor = self._int8_extractor()
            else:  # the one the last extract of this backbone kept, else built (network.keep_extractor)
                self.extractor = take_kept_extractor(self.extractor_key)
                if self.extractor is None:
                    backbone = build_backbone(self.spec, self.image_size, self.precision, self.weights)
                    self.extractor = FeatureExtractor(backbone, self.layers, self.pooling)
        return self.extractor

    def _keep_extractor(self) -> None:
        """The run's extractor kept for the process's next extract of this backbone."""
        if self.extractor is not None and self.precision != "int8":
            keep_extractor(self.extractor_key, self.extractor)

    def _int8_extractor(self) -> Any:
        """The cache's quantised backbone (pipeline/backbone/int8.py), calibrated on its own images."""
        if self.scanned is None:
            raise PipelineError("an int8 backbone is calibrated on a scanned dataset")  # not reached by a user
        directory, dataset = self.scanned

        def float_extractor() -> FeatureExtractor:
            backbone = build_backbone(self.spec, self.image_size, "fp32", self.weights)
            return FeatureExtractor(backbone, self.layers, self.pooling)

        def pixels(files: list[Path]) -> Any:
            source = EncodedImages(files, self.max_pixels)
            mode = self.weights.preprocessing
            for _, batch in source.batches(self.image_size, self.options.batch_size, lambda x: preprocess(x, mode)):
                yield np.asarray(batch, np.float32)

        return int8.prepare(directory, float_extractor, self.image_size, dataset.records, dataset.root, pixels,
                            self.options.progress)

    def backbone_weights(self) -> list[np.ndarray]:
        """The backbone's weights as arrays, for workers that build it themselves (the Ray engine)."""
        return build_backbone(self.spec, self.image_size, self.precision, self.weights).get_weights()

    def backbone_recipe(self, checksum: str) -> BackboneRecipe:
        return BackboneRecipe(self.spec.name, self.image_size, self.precision, self.layers, self.pooling,
                              self.weights.preprocessing, self.options.batch_size, checksum)

    def run(self) -> ExtractSummary:
        started = time.perf_counter()
        data, cache_root = Path(self.options.data).resolve(), Path(self.options.cache_root).resolve()
        if self.options.images is None and (cache_root == data or data in cache_root.parents):
            raise PipelineError(f"--cache {self.options.cache_root} is inside the data folder {self.options.data}: "
                                "the next scan would take it for a class folder; put the cache elsewhere "
                                "(default features/)")
        directory = Path(self.options.cache_root) / cache_directory_name(self.fingerprint, self.options.data)
        earlier_decoding = self._cache_of_earlier_jpeg_decoding()
        if earlier_decoding is not None and not directory.exists():
            self.early_notes.append(
                f"{earlier_decoding} holds these images' features decoded with TensorFlow's fast JPEG inverse DCT "
                "(up to 18 levels from Pillow's); JPEGs are now decoded accurately, as on every backend, so that "
                "cache is not continued: this one starts afresh (delete the old one when done with it)")
        hashes = HashIndex(directory / store.HASH_INDEX_NAME, trusted=not self.options.rehash)
        # The Ray engine's driver reads no image bytes: files the hash index does not know are
        # listed by (path, size, mtime) and hashed by the worker that decodes them.
        read_unknown = isinstance(self.engine, LocalEngine)
        if self.options.images is not None:
            dataset = scan_table(self.options.images, self.options.path_column, self.options.data, hashes,
                                 read_unknown, self.options.missing)
        else:
            dataset = scan_dataset(self.options.data, self.options.splits, hashes, read_unknown=read_unknown)
        # said now, from a sample of headers, not after the backbone pass it is about
        self.small_note = small_image_note(dataset, self.image_size, self.spec)
        if self.small_note:
            self.early_notes.append(self.small_note)
        self.early_notes += self.int8_notes
        self.scanned = (directory, dataset)
        if self.options.progress:
            for note in self.early_notes:
                print(f"note: {note}", file=sys.stderr, flush=True)
        created = not directory.exists()
        try:
            with store.exclusive_lock(directory):
                summary = self._update(directory, dataset, hashes, started)
                for record in self.engine_result.changed:
                    hashes.forget(record.path)  # read again next time: the row has the new bytes' hash
                for path, size, mtime_ns, digest in self.engine_result.hashed:
                    hashes.learn(path, size, mtime_ns, digest)
                hashes.save()
        except BaseException:
            if created and not store.shard_paths(directory):
                shutil.rmtree(directory, ignore_errors=True)  # leave no empty cache behind
            raise
        finally:
            self._keep_extractor()
        held_back = self.engine_result.held_back
        if held_back:
            more = f" ({len(held_back) - 1} more images like it)" if len(held_back) > 1 else ""
            raise PipelineError(held_back[0] + more)
        return summary

    def _update(self, directory: Path, dataset: ScannedDataset, hashes: HashIndex, started: float) -> ExtractSummary:
        """Plan the update, carry out its no-backbone parts, hand the rest to the engine, and
        write the manifest last."""
        store.remove_temporaries(directory)
        shards = [store.read_shard_index(p, self.fingerprint) for p in store.shard_paths(directory)]
        _hash_cached_paths(dataset, shards, hashes)
        try:
            earlier = store.read_manifest(directory)
        except PipelineError:
            earlier = {}  # only a summary: this run rewrites it; failed images are simply retried
        recorded = earlier.get("dataset") if isinstance(earlier.get("dataset"), dict) else {}
        if recorded.get("split") == dataset.split_rule():  # other fractions or seed: a deliberate re-split
            dataset.keep_earlier_splits({p: s for shard in shards for p, s in zip(shard.paths, shard.splits)})
        present = {(r.path, r.sha256) for r in dataset.records}
        skipped = earlier.get("skipped") if isinstance(earlier.get("skipped"), list) else []
        earlier_failures = [s for s in skipped if isinstance(s, dict) and isinstance(s.get("path"), str)
                            and isinstance(s.get("sha256"), str) and isinstance(s.get("reason"), str)
                            and (s["path"], s["sha256"]) in present]
        if self.options.strict and earlier_failures:
            first = earlier_failures[0]
            raise strict_error(dataset.root / first["path"], first["reason"])
        plan = plan_update(dataset, shards, {(s["path"], s["sha256"]) for s in earlier_failures})
        if self.precision != "int8":  # another int8 cache's rows come from another quantisation
            add_sibling_sources(plan, directory, self.fingerprint)
        writer = ShardWriter(directory, dataset.class_names, self.fingerprint)
        copy_cached(plan, self.layers, self.shard_size, writer)
        self.engine_result = self.engine.run(plan.extract, dataset.root, writer)
        rewrite_changed(plan, dataset, shards, self.layers, self.fingerprint)
        result = self.engine_result
        skipped = earlier_failures + result.failures
        new = len(plan.extract) - len(result.failures) - len(result.held_back)
        images = len(dataset.records) - len(skipped) - len(result.held_back)
        summary = ExtractSummary(
            cache_dir=directory,
            images=images,
            new=new,
            reused=images - new,
            skipped=skipped,
            seconds=time.perf_counter() - started,
            loop_seconds=result.loop_seconds,
            backbone_batches=result.batches,
            backbone_images=result.images,
            input_wait_seconds=result.input_wait_seconds,
            engine=self.options.engine,
            retried_units=result.retried_units,
            restarted_actors=result.restarted_actors,
            nodes=len(result.nodes),
            warmup_seconds=result.warmup_seconds,
            warmup_images=result.warmup_images,
            actor_build_seconds=result.actor_build_seconds,
            notes=dataset_notes(dataset) + self.early_notes,
        )
        self._write_manifest(directory, dataset, summary)
        return summary

    def _write_manifest(self, directory: Path, dataset: ScannedDataset, summary: ExtractSummary) -> None:
        shards = [store.read_shard_index(p, self.fingerprint) for p in store.shard_paths(directory)]
        manifest = store.manifest_core(self.fingerprint, dataset.class_names, shards, self.feature_shapes(shards))
        manifest |= {
            "weights": self.weights.describe(),
            "dataset": {
                "root": str(dataset.root.resolve()),
                "layout": dataset.layout,
                "split": dataset.split_rule(),
            },
            "skipped": summary.skipped,
            "ignored": [{"path": p, "reason": r} for p, r in dataset.ignored],
            "same_bytes_in_several_classes": same_bytes_in_several_classes(dataset),
            "last_run": summary.as_dict() | {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        }
        if self.precision == "int8":
            manifest["int8"] = int8.describe(directory)
        atomic.write_json(directory / store.MANIFEST_NAME, manifest)

    def feature_shapes(self, shards: Sequence[ShardIndex]) -> dict[str, tuple[int, ...]]:
        if shards:
            return store.feature_shapes(shards[0].path, self.layers)
        return self.feature_extractor().output_shapes()


def _hash_cached_paths(dataset: ScannedDataset, shards: Sequence[ShardIndex], hashes: HashIndex) -> None:
    """Files listed without a hash (the Ray engine) whose path the cache holds are hashed here, so
    that a lost hash index or touched files cost a read, not a backbone pass. A first run reads nothing."""
    unknown = [i for i, record in enumerate(dataset.records) if not record.sha256]
    if not unknown:
        return
    cached = {path for shard in shards for path in shard.paths}
    for i in unknown:
        record = dataset.records[i]
        if record.path in cached:
            digest, size, mtime_ns = hashes.lookup(dataset.root / record.path, record.path)
            dataset.records[i] = dataclasses.replace(record, sha256=digest, size=size, mtime_ns=mtime_ns)


SIZE_SAMPLE = 64  # images whose headers are read to tell the typical size
HEADER_BYTES = 1 << 16  # enough for a JPEG's frame header after its EXIF block


def dataset_notes(dataset: ScannedDataset) -> list[str]:
    """What a user should hear about the data at extract time: splits carved out of train/ and
    splits that came out empty (small_image_note is said apart, before the backbone pass)."""
    notes = []
    for split, fraction in dataset.carved.items():
        flag = "--val-fraction" if split == "validation" else "--test-fraction"
        notes.append(f"no {split} folder: {split} is {fraction:.0%} of each class's train/ images, chosen by file "
                     f"name (stable as images are added; {flag} sets the fraction)")
    if dataset.layout in UNLABELLED_LAYOUTS:
        return [f"the {len(dataset.records)} images are unlabelled (no class folders): give train-head their labels "
                "with --labels TABLE (docs/formats.md: The labelling table)"]
    counts = Counter(record.split for record in dataset.records)
    for split in SPLITS:
        if not counts[split]:
            notes.append(f"the {split} split is empty: train-head needs train and validation images "
                         "(see README: Dataset layouts)")
    clashes = same_bytes_in_several_classes(dataset)
    if clashes:
        first = clashes[0]["paths"]
        notes.append(f"{len(clashes)} image(s) are the same bytes under more than one class (e.g. {first[0]} and "
                     f"{first[1]}): a head trains on each copy with its folder's label; listed in manifest.json under "
                     "same_bytes_in_several_classes (remove the wrong copies)")
    return notes


def same_bytes_in_several_classes(dataset: ScannedDataset) -> list[dict[str, object]]:
    """Images whose bytes (content hash) appear under more than one class: {sha256, paths,
    classes} each, by first path. Files not hashed yet (the Ray engine's driver reads no bytes)
    are not compared."""
    by_content: dict[str, list] = {}
    for record in dataset.records:
        if record.sha256:
            by_content.setdefault(record.sha256, []).append(record)
    clashes = []
    for digest, records in by_content.items():
        labels = sorted({record.label for record in records})
        if len(labels) > 1:
            clashes.append({"sha256": digest, "paths": sorted(record.path for record in records),
                            "classes": [dataset.class_names[label] for label in labels]})
    return sorted(clashes, key=lambda clash: clash["paths"][0])


def small_image_note(dataset: ScannedDataset, image_size: int, spec: BackboneSpec) -> str | None:
    """A note when the images are much smaller than the input (more than the backbone's advice
    allows: SmallImageAdvice), from a sample of headers, with the backbone's measured advice."""
    typical = _typical_side(dataset)
    advice = spec.small_images
    if not typical or image_size <= advice.most * typical \
            or advice.image_size(typical, spec.min_image_size) >= image_size:
        return None  # within the advice, or as small as the backbone takes
    return (f"the images are about {typical} px on their shorter side and the input is {image_size} px: each is "
            f"enlarged {image_size / typical:.1f}x, which costs time and gains little; for {spec.name} try "
            f"{advice.options(typical, spec.min_image_size)} ({advice.measured}; docs/commands.md: Small images)")


def _typical_side(dataset: ScannedDataset) -> int | None:
    """The median shorter side of up to SIZE_SAMPLE images spread over the folder, read from their
    headers (a few hundred bytes each); None when no header could be read."""
    step = max(1, len(dataset.records) // SIZE_SAMPLE)
    sides = []
    for record in dataset.records[::step][:SIZE_SAMPLE]:
        try:
            with open(dataset.root / record.path, "rb") as handle:
                dimensions = image_dimensions(handle.read(HEADER_BYTES))
        except OSError:
            continue
        if dimensions:
            sides.append(min(dimensions))
    return int(statistics.median(sides)) if sides else None


def extract_features(options: ExtractOptions) -> ExtractSummary:
    """Bring the cache for (options' fingerprint, data folder) up to date and summarise the run."""
    if options.engine == "ray":
        with RayCluster(options.ray_address, deferred=True) as cluster:  # started when there is work
            return _Extraction(options, cluster).run()
    return _Extraction(options).run()
