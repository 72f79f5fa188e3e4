"""What fine-tuning trains on: its examples and how they are augmented.

Two sources, one interface (`TrainingData`): raw images through the whole classifier
(`ImageExamples`), or, for `finetune --cached`, activations of the layer below the unfreeze point
read from a feature cache (`cached_activations` finds it) through the classifier's part above it
(`CachedActivationExamples`): rows streamed by shard (a cache larger than memory still trains),
shuffled per epoch over the whole split and augmented on the maps themselves. `Augmentation` is
the plain description of the training-time augmentation (the CLI's defaults and the run's record),
which builds Keras layers on demand."""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from pipeline.cache.reader import SplitImages
from pipeline.cache.store import FeatureStore, find_caches
from pipeline.errors import PipelineError, Rules, check_parameters
from pipeline.images.decode_tf import labelled_batches

if TYPE_CHECKING:
    import keras

AUGMENT = ("default", "none")  # --augment: the flags' augmentation, or none at all


@dataclass
class Augmentation:
    """Keras preprocessing layers applied to training batches only; zero switches one off.

    The default is horizontal flips only: a mirror image is still an image of the same thing for
    most datasets (clothes, scenes, animals), an upside-down one is not (upside-down shoes took a
    fine-tune's training accuracy from the head's 88% to 68%). Vertical flips suit data with no up
    (solar cells, micrographs: `--flip horizontal_and_vertical`). Measured on ELPV (4 epochs from a
    dense head, 150 px): with rotation 0.05, zoom 0.1, translation 0.05 and contrast 0.1 as well,
    training accuracy fell from the head's 91% to 77% in the first epoch and validation accuracy
    never beat the starting model; with flips only it rose from 84.5% to 85.9%. Centred, aligned
    images (cells, scans, documents) lose more from geometric jitter than they gain."""

    FLIPS = ("none", "horizontal", "vertical", "horizontal_and_vertical", "dihedral")  # dihedral: views.py
    RANGES: ClassVar[Rules] = {name: (lambda v: 0 <= v <= 1, "from 0 (off) to 1")
                               for name in ("rotation", "zoom", "translation", "contrast", "brightness", "saturation")}

    flip: str = "horizontal"  # none | horizontal | vertical | horizontal_and_vertical | dihedral (and transposes)

    rotation: float = 0.0  # fraction of a full turn
    zoom: float = 0.0
    translation: float = 0.0
    contrast: float = 0.0
    # colour changes for photos, as torchvision's ColorJitter: each image's pixels scaled by a factor
    # drawn from [1 - brightness, 1 + brightness], its saturation by one from [1 - saturation, 1 + saturation]
    brightness: float = 0.0
    saturation: float = 0.0

    def __post_init__(self) -> None:
        if self.flip not in self.FLIPS:
            raise PipelineError(f"--flip {self.flip}: choose from {', '.join(self.FLIPS)}")
        check_parameters(vars(self), self.RANGES)

    @classmethod
    def off(cls) -> Augmentation:
        return cls("none")

    @classmethod
    def default(cls, cached: bool = False) -> Augmentation:
        """The default of `finetune` (Python API and command line alike): horizontal flips on images; none on
        cached maps (a flipped block4_pool map is not the map of a flipped image: measured harmful
        for flattened heads, see README)."""
        return cls("none") if cached else cls()

    def describe(self) -> str:
        """In words, for reports: "horizontal flips, zoom 0.1", or "none"."""
        parts = [] if self.flip == "none" else ["dihedral (flips, transposes: all eight symmetries of the square)"
                                                if self.flip == "dihedral" else
                                                self.flip.replace("_and_", " and ") + " flips"]
        parts += [f"{name} {getattr(self, name):g}" for name in self.RANGES if getattr(self, name)]
        return ", ".join(parts) or "none"

    def layers(self, seed: int) -> list[Any]:
        import keras

        layers: list[Any] = []
        if self.flip == "dihedral":
            from pipeline.images.views import random_transpose_layer

            layers.append(random_transpose_layer(seed))
        # Two layers for both axes: Keras' RandomFlip("horizontal_and_vertical") draws one coin per
        # image for both, so it gives the image or its half turn, never a mirror (measured)
        if self.flip in ("horizontal", "horizontal_and_vertical", "dihedral"):
            layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
        if self.flip in ("vertical", "horizontal_and_vertical", "dihedral"):
            layers.append(keras.layers.RandomFlip("vertical", seed=seed + 1))
        if self.rotation:
            layers.append(keras.layers.RandomRotation(self.rotation, fill_mode="reflect", seed=seed))
        if self.zoom:
            layers.append(keras.layers.RandomZoom(self.zoom, fill_mode="reflect", seed=seed))
        if self.translation:
            layers.append(keras.layers.RandomTranslation(self.translation, self.translation, fill_mode="reflect",
                                                         seed=seed))
        if self.contrast:
            layers.append(keras.layers.RandomContrast(self.contrast, value_range=(0, 255), seed=seed))
        if self.brightness or self.saturation:
            layers.append(random_colour_layer(self.brightness, self.saturation, seed))
        return layers


def random_colour_layer(brightness: float, saturation: float, seed: int) -> Any:
    """A Keras layer that changes each image's colours, on pixels from 0 to 255 (before the
    backbone's preprocessing), as torchvision's ColorJitter does: the saturation first (the image
    blended with its gray version by a factor from [1 - saturation, 1 + saturation]: 0 is gray, 1
    the image, above 1 more saturated), then the brightness (blended with black by a factor from
    [1 - brightness, 1 + brightness]), clipped to 0-255. Gray images stay gray. Written here rather
    than Keras' RandomBrightness (an offset, not a factor) and RandomSaturation (which clips the HSV
    saturation to the pixel range): used in the training data pipeline only, never saved in a model."""
    import keras
    import tensorflow as tf

    class RandomColour(keras.layers.Layer):
        def __init__(self) -> None:
            super().__init__(name="random_colour")

        def call(self, images: Any, training: bool = True) -> Any:
            if not training:
                return images
            n = tf.shape(images)[0]
            images = tf.cast(images, tf.float32)
            if saturation:
                factor = tf.random.uniform((n, 1, 1, 1), 1 - saturation, 1 + saturation, seed=seed + 2)
                if images.shape[-1] == 3:
                    gray = tf.reduce_sum(images * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)
                    images = gray + factor * (images - gray)
            if brightness:
                images = images * tf.random.uniform((n, 1, 1, 1), 1 - brightness, 1 + brightness, seed=seed + 3)
            return tf.clip_by_value(images, 0.0, 255.0)

        def compute_output_shape(self, shape: Any) -> Any:
            return shape

    return RandomColour()


# What must match for another cache's activations to be this head's: everything in the
# fingerprint but the layers and the pooling.
_SAME_FEATURES = ("backbone", "weights_source", "weights_identity", "image_size", "resize_method", "preprocessing",
                  "precision", "tensorflow", "backend", "decoder")


def cached_activations(store: FeatureStore, layer: str, cache_root: Path | None = None) -> FeatureStore:
    """The cache (beside `store`, or under `cache_root`) holding `layer` as full maps for the same
    images, backbone, weights, size and precision, with the same classes and splits; else one line
    with the extract command that adds it."""
    root = Path(cache_root) if cache_root is not None else store.directory.parent
    data_root = store.data_root
    wanted = store.fingerprint.as_dict()
    found = []
    for directory, _ in find_caches(root):
        try:
            candidate = FeatureStore(directory)
        except PipelineError:
            continue
        fingerprint = candidate.fingerprint.as_dict()
        if (all(fingerprint.get(k) == wanted.get(k) for k in _SAME_FEATURES) and fingerprint["pooling"] == "none"
                and layer in fingerprint["layers"] and candidate.data_root == data_root):
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
    from pipeline.heads.fitting import StreamedExamples

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


class TrainingData(Protocol):
    """Where fine-tuning's examples come from: raw images through the whole classifier, or cached
    activations of the fixed part through the classifier above it. `model` is the model trained."""

    model: keras.Model
    records: dict[str, SplitImages]

    def training_batches(self) -> Any: ...

    def batches(self, split: str) -> Any: ...

    def predict(self, split: str, tta: str = "none") -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...

    def augmentation_note(self) -> dict[str, Any]: ...


class ImageExamples:
    """End to end: every epoch decodes, augments and runs every training image through the whole
    backbone (resized as extract resizes)."""

    def __init__(self, records: dict[str, SplitImages], model: keras.Model, image_size: int, batch_size: int,
                 augmentation: Augmentation, seed: int) -> None:
        self.records, self.model, self.image_size = records, model, image_size
        self.batch_size, self.augmentation, self.seed = batch_size, augmentation, seed

    def training_batches(self) -> Any:
        train = self.records["train"]
        return labelled_batches(train.files, train.labels, self.image_size, self.batch_size,
                                self.augmentation.layers(self.seed), shuffle_seed=self.seed)

    def batches(self, split: str) -> Any:
        data = self.records[split]
        return labelled_batches(data.files, data.labels, self.image_size, self.batch_size)

    def predict(self, split: str, tta: str = "none") -> np.ndarray:
        """The split's probabilities, averaged over the test-time views of `tta` (views.py)."""
        files = self.records[split].files
        if not files:
            return np.zeros((0, self.model.output_shape[-1]))
        images = self.batches(split).map(lambda x, y: x)
        if tta == "none":
            return np.asarray(self.model.predict(images, verbose=0), np.float64)
        from pipeline.images.views import averaged

        return np.concatenate([averaged(self.model.predict_on_batch, np.asarray(batch), tta) for batch in images])

    def describe(self) -> dict[str, Any]:
        return {"source": "images", "image_size": self.image_size}

    def augmentation_note(self) -> dict[str, Any]:
        return {"applied_to": "images"}


class CachedActivationExamples:
    """`--cached`: the fixed part's output for every image is read from a feature cache, by shard,
    and only the layers above it (and the head) run; flips are applied to the cached maps."""

    def __init__(self, store: FeatureStore, layer: str, model: keras.Model, batch_size: int,
                 augmentation: Augmentation, seed: int) -> None:
        self.store, self.layer, self.model = store, layer, model
        self.batch_size, self.augmentation, self.seed = batch_size, augmentation, seed
        self.records = {split: SplitImages([], index.labels, index.paths)
                        for split, index in store.split_indexes().items()}

    def training_batches(self) -> Any:
        flips = self.augmentation.layers(self.seed)  # flips only (FinetuneOptions checks)
        return activation_batches(self.store, self.layer, "train", self.batch_size, flips,
                                  shuffle_seed=self.seed, rows=len(self.records["train"]))

    def batches(self, split: str) -> Any:
        return activation_batches(self.store, self.layer, split, self.batch_size, rows=len(self.records[split]))

    def predict(self, split: str, tta: str = "none") -> np.ndarray:  # no views of cached maps (FinetuneOptions)
        if not len(self.records[split]):
            return np.zeros((0, self.model.output_shape[-1]))
        return np.asarray(self.model.predict(self.batches(split), verbose=0), np.float64)  # labels unused

    def describe(self) -> dict[str, Any]:
        return {"source": "cached activations", "layer": self.layer, "cache": str(self.store.directory.resolve()),
                "fingerprint_digest": self.store.fingerprint.digest()}

    def augmentation_note(self) -> dict[str, Any]:
        return {"applied_to": f"cached {self.layer} maps (flipped along their spatial axes)"}
