"""Cached activations for `finetune --cached`: the feature cache that holds the layer below the
unfreeze point for a head's images, and its rows as training batches streamed by shard (a cache
larger than memory still trains), shuffled per epoch and augmented on the maps themselves."""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.store import FeatureStore, find_caches

# What must match for another cache's activations to be this head's: everything in the
# fingerprint but the layers and the pooling.
_SAME_FEATURES = ("backbone", "weights_source", "weights_identity", "image_size", "resize_method", "preprocessing",
                  "precision", "tensorflow", "backend", "decoder")


def cached_activations(store: FeatureStore, layer: str, cache_root: Path | None = None) -> FeatureStore:
    """The cache (beside `store`, or under `cache_root`) holding `layer` as full maps for the same
    images, backbone, weights, size and precision, with the same classes and splits; else one line
    with the extract command that adds it."""
    root = Path(cache_root) if cache_root is not None else store.directory.parent
    data_root = store.manifest.get("dataset", {}).get("root")
    wanted = store.fingerprint.as_dict()
    found = []
    for directory, _ in find_caches(root):
        try:
            candidate = FeatureStore(directory)
        except PipelineError:
            continue
        fingerprint = candidate.fingerprint.as_dict()
        if (all(fingerprint.get(k) == wanted.get(k) for k in _SAME_FEATURES) and fingerprint["pooling"] == "none"
                and layer in fingerprint["layers"] and candidate.manifest.get("dataset", {}).get("root") == data_root):
            found.append(candidate)
    if not found:
        raise PipelineError(f"no cache holds {layer} activations for these images: add them with "
                            f"`{_extract_command(store, layer, root)}` (one pass of every image through the layers "
                            "below it), then rerun")
    chosen = found[0]  # the newest
    _check_same_rows(store, chosen)
    return chosen


def _extract_command(store: FeatureStore, layer: str, cache_root: Path) -> str:
    """The extract command that adds `layer` for the head's images into `cache_root` (where
    finetune looks for it)."""
    f = store.fingerprint
    weights = store.manifest.get("weights", {})
    choice = weights.get("path") if f.weights_source == "file" else f.weights_source
    data = store.manifest.get("dataset", {})
    words = ["python", "run_pipeline.py", "extract", "--data", data.get("root", "DIR"), "--backbone", f.backbone,
             "--image-size", str(f.image_size), "--weights", str(choice), "--precision", f.precision.split("-")[0],
             "--layer", layer, "--pooling", "none", "--cache", str(cache_root)]
    split = data.get("split")
    if isinstance(split, dict):  # the fractions the head's cache was split with (see ScannedDataset.split_rule)
        fractions = split.get("carved_from_train", split)
        flags = {"validation": "--val-fraction", "test": "--test-fraction"}
        for name, flag in flags.items():
            value = fractions.get(name, fractions.get(f"{name}_fraction"))
            if value is not None:
                words += [flag, str(value)]
        if "seed" in split:
            words += ["--split-seed", str(split["seed"])]
    return shlex.join(words)


def _check_same_rows(store: FeatureStore, activations: FeatureStore) -> None:
    if activations.class_names != store.class_names:
        raise PipelineError(f"{activations.directory} has classes {activations.class_names}, the head's cache "
                            f"{store.class_names}: extract both from the same folder")
    ours, theirs = store.split_indexes(), activations.split_indexes()
    for split in ours:
        if sorted(ours[split].paths) != sorted(theirs[split].paths):
            raise PipelineError(f"{activations.directory} puts other images in the {split} split than the head's "
                                f"cache {store.directory}: extract it from the same folder with the same split options")


SHUFFLE_CHUNK = 4096  # most rows read at once in a shuffled pass


def activation_batches(store: FeatureStore, layer: str, split: str, batch_size: int,
                       augmentation: Sequence[Any] | None = None, shuffle_seed: int | None = None,
                       rows: int | None = None) -> Any:
    """(maps, labels) batches of one split: in the cache's order, read one shard at a time, or
    with `shuffle_seed` in a new order every epoch drawn over the whole split (an index shuffle:
    shards follow path order, so class order, and a batch must mix classes from every shard),
    read a bounded chunk of rows at a time. `augmentation` (Keras layers, e.g. RandomFlip) is
    applied to training batches of maps. `rows`: the split's size where the caller knows it (else
    counted from the shard indexes)."""
    from pipeline.fitting import StreamedExamples

    index = store.split_indexes()[split] if shuffle_seed is not None or rows is None else None

    def in_order(epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for chunk in store.iter_shards(split, [layer]):
            yield chunk.features[layer], chunk.labels

    def shuffled(epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = np.random.default_rng((shuffle_seed, epoch)).permutation(len(index.labels))
        size = shuffle_chunk(len(order), batch_size)
        for start in range(0, len(order), size):
            part = order[start:start + size]
            yield store.read_rows(index.locations[part], [layer])[layer], index.labels[part]

    transform = None
    if augmentation:
        import keras

        pipeline = keras.Sequential(list(augmentation))
        transform = lambda maps: pipeline(maps, training=True)  # noqa: E731
    if rows is None:
        rows = len(index.labels)
    return StreamedExamples(in_order if shuffle_seed is None else shuffled, rows, batch_size, transform)


def shuffle_chunk(rows: int, batch_size: int) -> int:
    """Rows read at once in a shuffled pass: a whole number of batches, small enough (a sixteenth
    of the split, at most SHUFFLE_CHUNK) that each shard gives a chunk few rows, which are read
    alone rather than with the whole shard."""
    batches = max(1, min(SHUFFLE_CHUNK, rows // 16) // batch_size)
    return batches * batch_size
