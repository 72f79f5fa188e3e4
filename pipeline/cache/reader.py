"""Head inputs read from a feature cache (pooled by pipeline/backbone/pooling.py, the one
definition of pooling, which extract and the saved classifiers use as well).

Each chosen layer is pooled (or flattened) at read time and the layers are concatenated into one
vector per image, so one extract serves flattened and pooled heads. A split is held in memory when
the features fit the memory budget and streamed shard by shard when they do not; either way the
labels and paths are in memory and the vectors come in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.backbone.pooling import POOLINGS, pool
from pipeline.cache.memory import default_memory_budget
from pipeline.cache.store import FeatureStore, find_caches
from pipeline.errors import PipelineError, command


def latest_cache(cache_root: Path) -> Path:
    """The cache directory under `cache_root` whose manifest was written last."""
    caches = find_caches(cache_root)
    if not caches:
        raise PipelineError(
            f"no feature cache under {cache_root}/: run `{command()} extract --data DIR` first, "
            "or pass --features DIR"
        )
    return caches[0][0]


def open_cache(features: Path | None, cache_root: Path) -> FeatureStore:
    """--features as given (a directory, a name under the cache root, or a short form that names one
    cache: catalogue.py), else the latest cache."""
    if features is None:
        return FeatureStore(latest_cache(cache_root))
    candidates = [Path(features), Path(cache_root) / features]
    directory = next((c for c in candidates if c.is_dir()), None)
    if directory is None:
        from pipeline.cache.catalogue import find_cache

        directory = find_cache(str(features), cache_root)  # a short form: vgg16:64, lite0, a name's start
    if directory is None:
        raise PipelineError(
            f"no cache {features}: name a directory made by extract, or BACKBONE[:SIZE[:LAYER]] "
            f"(`{command()} caches --cache {cache_root}` lists them)"
        )
    return FeatureStore(directory)


def open_features(features: Path | Sequence[Path] | None, cache_root: Path, layers: Sequence[str] | None,
                  pooling: str | None) -> tuple[list[FeatureStore], list[FeatureView]]:
    """The caches a head trains on (one, or several to fuse) and its view of each."""
    named = [features] if features is None or isinstance(features, str | Path | FeatureStore) else list(features)
    stores = [open_cache(Path(f.directory if isinstance(f, FeatureStore) else f) if f is not None else None, cache_root)
              for f in named]
    if len(stores) > 1 and layers:
        raise PipelineError("--layer applies to one cache: fused caches are read with the layers each was extracted "
                            "with (extract each with the layers you want)")
    return stores, [FeatureView.for_cache(store, layers, pooling) for store in stores]


@dataclass(frozen=True)
class FeatureView:
    """Which cached layers a head sees and how spatial maps become vectors: "none" flattens them
    (row-major, as keras Flatten does), "avg" and "max" pool over height and width."""

    layers: tuple[str, ...]
    pooling: str

    @classmethod
    def for_cache(cls, store: FeatureStore, layers: Sequence[str] | None = None,
                  pooling: str | None = None) -> FeatureView:
        chosen = tuple(layers or store.layers)
        unknown = [name for name in chosen if name not in store.layers]
        if unknown:
            raise PipelineError(
                f"layer {unknown[0]} is not in this cache (it holds {', '.join(store.layers)}): "
                "extract it with --layer, or choose one of those"
            )
        cached = store.fingerprint.pooling
        if pooling is None:
            pooling = cached
        if pooling not in POOLINGS:
            raise PipelineError(f"unknown pooling {pooling!r}: choose from {', '.join(POOLINGS)}")
        if cached != "none" and pooling != cached:
            raise PipelineError(
                f"this cache holds {cached}-pooled vectors, so --pooling {pooling} cannot be applied: "
                "extract with --pooling none to pool at read time"
            )
        return cls(chosen, pooling)

    def vectors(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        parts = []
        for name in self.layers:
            values = np.asarray(features[name], dtype=np.float32)
            if values.ndim == 4:
                values = pool(values, self.pooling)
            parts.append(values.reshape(len(values), -1))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def dimension(self, shapes: Mapping[str, Sequence[int]]) -> int:
        total = 0
        for name in self.layers:
            shape = tuple(shapes[name])
            total += shape[-1] if len(shape) == 3 and self.pooling != "none" else int(np.prod(shape))
        return total

    def as_dict(self) -> dict:
        return {"layers": list(self.layers), "pooling": self.pooling}


class SplitData:
    """One split's head inputs: `labels` and `paths` in memory; the vectors in `matrix` when held
    in memory, otherwise read one shard at a time by `chunks()`."""

    def __init__(self, name: str, labels: np.ndarray, paths: list[str], dimension: int,
                 matrix: np.ndarray | None = None, store: FeatureStore | None = None,
                 view: FeatureView | None = None, locations: np.ndarray | None = None,
                 targets: np.ndarray | None = None) -> None:
        self.name = name
        self.class_names: list[str] | None = list(store.class_names) if store is not None else None
        self.labels = labels
        self.paths = paths
        self.dimension = dimension
        self.matrix = matrix
        self._store = store
        self._view = view
        self._locations = locations
        self.targets = targets  # soft targets (one row of class probabilities an image), where the labelling has them
        # multi-label: `targets` holds 0/1 a label (not probabilities summing to one)
        self.multilabel = bool(getattr(getattr(store, "labelling", None), "multilabel", False))

    @property
    def in_memory(self) -> bool:
        return self.matrix is not None

    def subset(self, rows: np.ndarray) -> SplitData:
        """The split restricted to `rows` (indices into it), in memory or streamed alike."""
        part = SplitData(self.name, self.labels[rows], [self.paths[i] for i in rows], self.dimension,
                         None if self.matrix is None else self.matrix[rows], self._store, self._view,
                         None if self._locations is None else self._locations[rows],
                         None if self.targets is None else self.targets[rows])
        part.class_names = self.class_names
        part.multilabel = self.multilabel
        return part

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shard_rows(self) -> int:
        """Rows of the largest shard: the natural block size for streaming."""
        if self._locations is None or not len(self._locations):
            return 4096
        return max(int(np.bincount(self._locations[:, 0]).max()), 1)

    def chunks(self, rows: int = 4096, order: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(vectors, labels) pieces. Without `order`: in split order, slices in memory or one shard
        at a time when streamed. With `order` (a permutation of the split's rows): in that order,
        `rows` at a time, a streamed block reading just its rows from whichever shards hold them."""
        if self.matrix is not None:
            for start in range(0, len(self), rows):
                if order is None:
                    yield self.matrix[start:start + rows], self.labels[start:start + rows]
                else:
                    block = order[start:start + rows]
                    yield self.matrix[block], self.labels[block]
            return
        if order is None:  # shard by shard; the rows of a split are grouped by shard already
            shards = self._locations[:, 0]
            for number in np.unique(shards):
                block = np.flatnonzero(shards == number)
                features = self._store.read_rows(self._locations[block], self._view.layers)
                yield self._view.vectors(features), self.labels[block]
            return
        for start in range(0, len(self), rows):
            block = order[start:start + rows]
            features = self._store.read_rows(self._locations[block], self._view.layers)
            yield self._view.vectors(features), self.labels[block]


@dataclass(frozen=True)
class SplitImages:
    """One split's images: absolute files, labels, and paths as the cache records them. Scored
    like a split of features (reports need labels, paths and a length)."""

    files: list[str]
    labels: np.ndarray
    paths: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def split_images(store: FeatureStore) -> dict[str, SplitImages]:
    """For every split: the image files of the cache's rows, their labels and cache-relative paths."""
    root = Path(store.data_root or "")
    records = {}
    for split, index in store.split_indexes().items():
        files = [str(root / p) for p in index.paths]
        missing = [f for f in files[:50] if not Path(f).is_file()]
        if missing:
            raise PipelineError(
                f"the images of {store.directory} are no longer under {root} ({missing[0]} is missing): "
                "move them back, or extract from their new place and train a head on that cache"
            )
        records[split] = SplitImages(files, index.labels, index.paths)
    return records


def load_splits(store: FeatureStore, view: FeatureView, memory_budget: int | None = None,
                stream: bool = False) -> dict[str, SplitData]:
    """Train, validation and test inputs: in memory when all of them fit `memory_budget` bytes
    (and `stream` is off), streamed by shard otherwise."""
    if not store.class_names:
        raise PipelineError(f"{store.directory} holds {store.unlabelled} images without labels: pass a labels table "
                            "(--labels TABLE --label-column COL), or extract from DIR/<class>/ folders")
    if len(store.class_names) < 2:
        raise PipelineError(
            f"{store.directory} has one class ({', '.join(store.class_names)}): a classifier needs at least two"
        )
    dimension = view.dimension(store.manifest["feature_shapes"])
    indexes = store.split_indexes()
    for split in ("train", "validation"):
        if len(indexes[split].labels) == 0:
            raise PipelineError(
                f"the {split} split of {store.directory} has no images: add images, or extract with "
                "--val-fraction/--test-fraction above 0 (or a validation folder)"
            )
    present = np.unique(indexes["train"].labels)
    if len(present) < 2:
        raise PipelineError(
            f"the train split of {store.directory} holds one class only ({store.class_names[present[0]]}): "
            "a classifier needs examples of at least two"
        )
    total_bytes = sum(len(index.labels) for index in indexes.values()) * dimension * 4
    budget = default_memory_budget() if memory_budget is None else memory_budget
    in_memory = not stream and total_bytes <= budget
    splits = {}
    for split, index in indexes.items():
        labels = index.labels
        data = SplitData(split, labels, index.paths, dimension, store=store, view=view, locations=index.locations,
                         targets=index.targets)
        if in_memory and len(labels):  # filled shard by shard: no second copy of the split
            matrix = np.empty((len(labels), dimension), np.float32)
            row = 0
            for vectors, _ in data.chunks():
                matrix[row:row + len(vectors)] = vectors
                row += len(vectors)
            data.matrix = matrix
        elif in_memory:
            data.matrix = np.zeros((0, dimension), np.float32)
        splits[split] = data
    return splits


# --- fused features: several caches of the same images, side by side -----------------------------


def check_fusable(stores: Sequence[FeatureStore]) -> None:
    """Caches whose features can be joined into one head input: two or more, of distinct
    backbones (one classifier holds each once), of one image size (the fused classifier resizes
    its input once), with the same classes; else one line."""
    first = stores[0]
    backbones = [store.fingerprint.backbone for store in stores]
    repeated = sorted({name for name in backbones if backbones.count(name) > 1})
    if repeated:
        raise PipelineError(f"--features names two caches of {repeated[0]}: fuse the features of different backbones "
                            "(choose one cache of each)")
    sizes = {store.fingerprint.image_size for store in stores}
    if len(sizes) > 1:
        listed = ", ".join(f"{s.fingerprint.backbone} {s.fingerprint.image_size} px" for s in stores)
        raise PipelineError(f"fused caches must share one image size ({listed}): extract them with one --image-size "
                            f"(e.g. --image-size {max(sizes)})")
    for store in stores[1:]:
        if store.class_names != first.class_names:
            raise PipelineError(f"{store.directory} has classes {store.class_names}, {first.directory} has "
                                f"{first.class_names}: fuse caches extracted from the same folder")


def fused_row_orders(stores: Sequence[FeatureStore]) -> dict[str, list[np.ndarray]]:
    """For every split, each cache's rows in the first cache's order: rows are joined by content
    hash (duplicates by path) within a split, so the caches must hold the same images in the same
    splits with the same labels; else one line that names an image that differs."""
    first = stores[0]
    orders: dict[str, list[np.ndarray]] = {}
    for split, index in first.split_indexes().items():
        orders[split] = [np.arange(len(index.labels))]
        wanted = _content_keys(first, split)
        for store in stores[1:]:
            other = store.split_indexes()[split]
            rows = {key: row for row, key in enumerate(_content_keys(store, split))}
            missing = [key for key in wanted if key not in rows]
            if missing or len(rows) != len(wanted):
                known = set(wanted)
                extra = [other.paths[row] for key, row in rows.items() if key not in known]
                example = (f"{index.paths[wanted.index(missing[0])]} is in {first.directory.name} only" if missing
                           else f"{extra[0]} is in {store.directory.name} only")
                raise PipelineError(
                    f"the {split} splits of the fused caches hold different images ({example}): fuse caches "
                    "extracted from the same folder with the same split settings")
            order = np.array([rows[key] for key in wanted], dtype=np.int64)
            if not np.array_equal(other.labels[order], index.labels):
                raise PipelineError(f"{store.directory} labels the same images otherwise than {first.directory}: "
                                    "fuse caches extracted from the same folder")
            orders[split].append(order)
    return orders


def _content_keys(store: FeatureStore, split: str) -> list[tuple[str, int]]:
    """(content hash, its occurrence within the split in path order) of each row."""
    index = store.split_indexes()[split]
    if len(index.sha256) != len(index.paths) or not all(index.sha256):
        raise PipelineError(f"{store.directory} records no content hashes of its images (made by an earlier version): "
                            "extract it again to fuse it")
    seen: dict[str, int] = {}
    keys: list[tuple[str, int] | None] = [None] * len(index.paths)
    for row in sorted(range(len(index.paths)), key=lambda r: index.paths[r]):
        digest = index.sha256[row]
        keys[row] = (digest, seen.get(digest, 0))
        seen[digest] = seen.get(digest, 0) + 1
    return keys  # type: ignore[return-value]


def load_head_inputs(stores: Sequence[FeatureStore], views: Sequence[FeatureView], memory_budget: int | None = None,
                     stream: bool = False) -> dict[str, SplitData]:
    """A head's inputs of every split from its parts: the caches it reads, always a list (one, or
    several of the same images fused side by side, each through its own view)."""
    if len(stores) != len(views) or not stores:
        raise ValueError("one view for each cache, and at least one cache")
    if len(stores) == 1:
        return load_splits(stores[0], views[0], memory_budget, stream)
    return load_fused_splits(stores, views, memory_budget)


def load_fused_splits(stores: Sequence[FeatureStore], views: Sequence[FeatureView],
                      memory_budget: int | None = None) -> dict[str, SplitData]:
    """Train, validation and test inputs from several caches of the same images: each cache's
    vectors (its own view) side by side, in the first cache's row order. Held in memory (they are
    pooled vectors as a rule): the fused matrices are allocated once and filled shard by shard of
    each cache, so the peak is the fused features and one shard's vectors; fused features of more
    than `memory_budget` bytes are refused in one line."""
    check_fusable(stores)
    orders = fused_row_orders(stores)
    dimensions = [view.dimension(store.manifest["feature_shapes"]) for store, view in zip(stores, views)]
    dimension = sum(dimensions)
    indexes = stores[0].split_indexes()
    rows = sum(len(index.labels) for index in indexes.values())
    budget = default_memory_budget() if memory_budget is None else memory_budget
    if rows * dimension * 4 > budget:
        raise PipelineError(f"fused features take {rows * dimension * 4 / 2**30:.1f} GiB, more than the memory budget "
                            f"({budget / 2**30:.1f} GiB): pool them (--pooling avg) or fuse fewer layers")
    matrices = {split: np.empty((len(index.labels), dimension), np.float32) for split, index in indexes.items()}
    start = 0
    for number, (store, view, width) in enumerate(zip(stores, views, dimensions)):
        for split, data in load_splits(store, view, stream=True).items():  # read below, shard by shard
            # row r of this cache goes to the fused row where the first cache has that image
            destination = np.empty(len(data), np.int64)
            destination[orders[split][number]] = np.arange(len(data))
            row = 0
            for vectors, _ in data.chunks():
                matrices[split][destination[row:row + len(vectors)], start:start + width] = vectors
                row += len(vectors)
        start += width
    return {split: SplitData(split, index.labels, index.paths, dimension, matrix=matrices[split], store=stores[0],
                             view=views[0], locations=None, targets=index.targets) for split, index in indexes.items()}
