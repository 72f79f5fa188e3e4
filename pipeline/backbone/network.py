"""Backbones built from the registry (registry.py): the weights' preprocessing (Keras'
imagenet_utils modes, and the same as Keras layers for saved models), the frozen convolutional
base, and the feature extractor that runs it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import keras
import numpy as np

from pipeline import backend
from pipeline.backbone.pooling import POOLINGS, pool
from pipeline.backbone.precision import dtype_policy
from pipeline.backbone.registry import PREPROCESSING, BackboneSpec
from pipeline.backbone.weights import ResolvedWeights, load_weights
from pipeline.errors import PipelineError

# --- preprocessing: belongs to the weights, never to the caller ----------------------------------

# As the weights were trained: "torch" is RGB / 255 with the ImageNet mean and std (torchvision
# weights), "caffe" BGR minus the ImageNet mean (Keras' weights), both Keras' own preprocess_input
# modes; "lite" is (x - 127) / 128 (EfficientNet-Lite's reference normalisation).
_TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_TORCH_STD = np.array([0.229, 0.224, 0.225], np.float32)
_CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], np.float32)
_LITE_MEAN, _LITE_STD = 127.0, 128.0


def preprocessing_layers(mode: str, prefix: str = "") -> list[keras.layers.Layer]:
    """The same normalisation as Keras' own layers, for models that must load with Keras alone
    (fine-tuned and exported models): torch as a Normalization by 255 * mean and 255 * std;
    caffe as a fixed 1x1 convolution that swaps RGB to BGR and subtracts the mean; lite as a
    Rescaling. float32, frozen; named normalise_<mode> (after `prefix`, where a model holds several)."""
    if mode == "torch":
        mean, std = _TORCH_MEAN * 255.0, _TORCH_STD * 255.0
        return [keras.layers.Normalization(mean=mean, variance=std ** 2, name=f"{prefix}normalise_torch",
                                           dtype="float32")]
    if mode == "caffe":
        swap = keras.layers.Conv2D(3, 1, name=f"{prefix}normalise_caffe", dtype="float32", trainable=False)
        swap.build((None, None, None, 3))
        kernel = np.zeros((1, 1, 3, 3), np.float32)
        for channel in range(3):
            kernel[0, 0, 2 - channel, channel] = 1.0  # output channel c is input channel 2 - c (RGB -> BGR)
        swap.set_weights([kernel, -_CAFFE_BGR_MEAN])
        return [swap]
    if mode == "lite":
        return [keras.layers.Rescaling(1 / _LITE_STD, offset=-_LITE_MEAN / _LITE_STD, name=f"{prefix}normalise_lite",
                                       dtype="float32")]
    raise PipelineError(f"unknown preprocessing {mode!r}: choose from {', '.join(PREPROCESSING)}")


def preprocess(images: Any, mode: str) -> Any:
    """RGB float32 images in 0..255 (a TensorFlow tensor, or a NumPy array of one image or a
    batch) -> the input the weights were trained on (Keras' imagenet_utils.preprocess_input for
    torch and caffe; bit-identical to the formulas above)."""
    if mode not in PREPROCESSING:
        raise PipelineError(f"unknown preprocessing {mode!r}: choose from {', '.join(PREPROCESSING)}")
    if isinstance(images, np.ndarray):
        images = images.astype(np.float32)
        if mode == "lite":
            return (images - np.float32(_LITE_MEAN)) / np.float32(_LITE_STD)
        return keras.applications.imagenet_utils.preprocess_input(images, mode=mode)
    import tensorflow as tf

    images = tf.cast(images, tf.float32)
    if mode == "lite":
        return (images - _LITE_MEAN) / _LITE_STD
    return keras.applications.imagenet_utils.preprocess_input(images, mode=mode)


# --- construction: kernels that the weights replace are not drawn ---------------------------------

_constructing = threading.local()  # this thread's depth of kernels_left_undrawn()
_install_lock = threading.Lock()
_keras_draw: Any = None  # keras.initializers.VarianceScaling.__call__ as Keras defines it


def _draw_unless_constructing(initializer: Any, shape: Any, dtype: Any = None) -> Any:
    if getattr(_constructing, "depth", 0):
        return np.zeros(tuple(shape), np.float32)  # the variable casts it to its own dtype
    return _keras_draw(initializer, shape, dtype)


@contextlib.contextmanager
def kernels_left_undrawn() -> Iterator[None]:
    """While this thread constructs a network whose every kernel is replaced at once (the weights
    loaded, set, or build_backbone's own seeded draw), Keras' Glorot and He draws give zeros
    instead. Those draws are wasted work, and on JAX each kernel shape compiles a random-number
    program: 62 compilations, 10 s of CPU, for EfficientNet-Lite0 and VGG16. Other threads, and
    every initializer that is not a variance-scaling draw (biases, batch norm), are untouched."""
    global _keras_draw
    with _install_lock:
        if _keras_draw is None:
            _keras_draw = keras.initializers.VarianceScaling.__call__
            keras.initializers.VarianceScaling.__call__ = _draw_unless_constructing
    _constructing.depth = getattr(_constructing, "depth", 0) + 1
    try:
        yield
    finally:
        _constructing.depth -= 1


# --- the frozen feature extractor ----------------------------------------------------------------


def build_backbone(spec: BackboneSpec, image_size: int, precision: str, weights: ResolvedWeights | None = None,
                   arrays: Sequence[np.ndarray] | None = None) -> keras.Model:
    """The convolutional base (no top) with its weights (from their source, or `arrays` another
    build of it gave: a Ray worker's), frozen, under the precision's policy."""
    if image_size < spec.min_image_size:
        raise PipelineError(f"{spec.name} needs images of at least {spec.min_image_size} pixels, not {image_size}")
    with dtype_policy(precision), kernels_left_undrawn():  # every kernel is replaced below
        model = spec.constructor(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    if arrays is not None:
        model.set_weights(list(arrays))
    elif weights is not None:
        load_weights(model, weights)
    else:
        raise ValueError("build_backbone needs weights or arrays")
    model.trainable = False
    return model


class FeatureExtractor:
    """A frozen backbone that maps preprocessed image batches to float32 features per layer.

    The backbone is always called with training=False, so BatchNormalization uses its moving
    statistics and never updates them. `batches` and `images` count the forward passes made.
    """

    def __init__(self, backbone: keras.Model, layers: Sequence[str], pooling: str) -> None:
        if pooling not in POOLINGS:
            raise PipelineError(f"unknown pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
        known = [layer.name for layer in backbone.layers]
        missing = [name for name in layers if name not in known]
        if missing:
            outputs = [n for n in known if n.endswith(("_pool", "_out", "_conv3", "_conv2", "_conv1"))]
            raise PipelineError(
                f"{backbone.name} has no layer {', '.join(missing)}; layers with features include "
                f"{', '.join(outputs[-12:])}"
            )
        self.layers = tuple(layers)
        self.pooling = pooling
        self.model = keras.Model(backbone.input, {name: backbone.get_layer(name).output for name in layers})
        self.batches = 0
        self.images = 0
        self.batch_size: int | None = None  # JAX: batches are padded to one shape (one compilation)
        if backend.is_tensorflow():
            import tensorflow as tf

            self._forward = tf.function(self._features, reduce_retracing=True)
        else:
            self._forward = self._jax_forward()

    def _features(self, images: Any) -> dict[str, Any]:
        return self._pooled(self.model(images, training=False))

    def _pooled(self, maps: dict[str, Any]) -> dict[str, Any]:
        return {name: pool(keras.ops.cast(maps[name], "float32"), self.pooling, keras.ops) for name in self.layers}

    def _jax_forward(self) -> Any:
        """The backbone as one jitted function of its variables and the images: Keras 3's
        stateless call, the way JAX wants a model (weights are arguments, not baked-in constants)."""
        import jax

        trainable = [v.value for v in self.model.trainable_variables]
        fixed = [v.value for v in self.model.non_trainable_variables]

        @jax.jit
        def forward(trainable: list, fixed: list, images: Any) -> dict[str, Any]:
            maps, _ = self.model.stateless_call(trainable, fixed, images, training=False)
            return self._pooled(maps)

        return lambda images: forward(trainable, fixed, images)

    def on_device(self, images: Any) -> dict[str, Any]:
        """The features of a batch already where the backend computes (a tf.Tensor, a JAX array),
        left there: no copy to the host (benchmarks of the backbone alone)."""
        return self._forward(images)

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        count = int(images.shape[0])
        self.batches += 1
        self.images += count
        if backend.is_tensorflow():
            return {name: value.numpy() for name, value in self._forward(images).items()}
        images = np.asarray(images, np.float32)
        self.batch_size = max(self.batch_size or 0, count)
        if count < self.batch_size:  # a short last batch: padded, so JAX compiles one shape only
            padding = np.zeros((self.batch_size - count, *images.shape[1:]), np.float32)
            images = np.concatenate([images, padding])
        return {name: np.asarray(value)[:count] for name, value in self._forward(images).items()}

    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for name in self.layers:
            shape = tuple(self.model.output[name].shape[1:])
            shapes[name] = shape if self.pooling == "none" else shape[-1:]
        return shapes


# The feature extractor an extract built last, kept for the next extract of the same backbone in
# this process (a notebook adding images to a folder, a script extracting several folders with one
# backbone): building the backbone, loading its weights and tracing its call are most of a small
# extract's time (VGG16 at 32 px: 0.33 of 0.8 CPU-s). One is kept. An extract takes it out for
# its run and puts it back after, so two extracts at once (threads) never share one.
_KEPT: dict[Hashable, FeatureExtractor] = {}
_KEPT_LOCK = threading.Lock()


def extractor_key(spec: BackboneSpec, image_size: int, precision: str, weights: ResolvedWeights,
                  layers: Sequence[str], pooling: str) -> Hashable:
    """What a feature extractor is built from: equal keys, the same network computing the same features."""
    return (spec, image_size, precision, weights.source, weights.identity, tuple(layers), pooling, backend.current())


def take_kept_extractor(key: Hashable) -> FeatureExtractor | None:
    """The kept extractor of `key`, taken out (None: build one)."""
    with _KEPT_LOCK:
        return _KEPT.pop(key, None)


def keep_extractor(key: Hashable, extractor: FeatureExtractor) -> None:
    """Keep `extractor` for the next extract of `key`, in place of any kept before."""
    with _KEPT_LOCK:
        _KEPT.clear()
        _KEPT[key] = extractor


def forget_kept_extractor() -> None:
    """Let the kept extractor go (its memory, tens of megabytes: VGG16's weights are 59 MB)."""
    with _KEPT_LOCK:
        _KEPT.clear()
