"""One Keras model from raw pixels to class probabilities: the run's preprocessing, its backbone
rebuilt exactly as its feature cache was made, the cached layers pooled or flattened as the head
read them, and the head (a logistic regression becomes a fixed standardisation and an equivalent
Dense softmax layer).

Used through pipeline/run.py (Run.classifier, Run.trainable_classifier): finetune trains it end to
end, predict and export run it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipeline import backend
from pipeline.backbone.network import build_backbone, preprocessing_layers
from pipeline.backbone.pooling import keras_layer
from pipeline.backbone.registry import get_backbone
from pipeline.backbone.weights import ResolvedWeights
from pipeline.cache.fingerprint import Fingerprint
from pipeline.cache.reader import FeatureView
from pipeline.errors import PipelineError
from pipeline.heads import Head
from pipeline.images.keras_resize import resize_like_extract_layers

TRAINING_POLICY = {"fp32": "fp32", "bf16": "mixed-bf16", "mixed-bf16": "mixed-bf16", "mixed-fp16": "mixed-fp16",
                   "int8": "fp32"}  # int8 caches: fine-tuning trains the float backbone the graph was quantised from


def weights_for(fingerprint: Fingerprint, recorded_path: str | None) -> ResolvedWeights:
    """The weights a cache was made with, found again and checked against its checksum."""
    spec = get_backbone(fingerprint.backbone)
    choice = fingerprint.weights_source if fingerprint.weights_source != "file" else recorded_path or ""
    weights = spec.resolve_weights(choice, fingerprint.preprocessing)
    if weights.identity != fingerprint.weights_identity:
        raise PipelineError(
            f"the {fingerprint.backbone} weights found now ({weights.describe()['path']}) differ from those the "
            "features were extracted with (checksum mismatch): restore them, or extract and train again"
        )
    return weights


def feature_vector(outputs: list[Any], view: FeatureView, prefix: str = "") -> Any:
    """The Keras twin of FeatureView.vectors: each map pooled or flattened, then concatenated."""
    parts = []
    for name, tensor in zip(view.layers, outputs):
        tensor = keras.layers.Activation("linear", dtype="float32", name=f"{prefix}{name}_float32")(tensor)
        if len(tensor.shape) == 4:
            tensor = keras_layer(view.pooling, f"{prefix}{name}_{view.pooling}")(tensor)
        parts.append(tensor)
    # "features" in a classifier of one backbone (as before fusion existed); a fused part's
    # concatenation must not take the name of its backbone's feature model ("<backbone>_features")
    name = f"{prefix}layers_concatenated" if prefix else "features"
    return parts[0] if len(parts) == 1 else keras.layers.Concatenate(name=name)(parts)


def image_input(pixels: Any, image_size: int, normalisation: Sequence[Any], resize: bool = True) -> Any:
    """Pixels 0..255 (RGB, uint8 or float) -> the backbone's input, from Keras' own layers only, so
    a saved model loads with Keras alone: squashed to image_size x image_size by extract's rule
    (`resize_like_extract_layers`), then the weights' normalisation (`preprocessing_layers` of
    the weights' mode)."""
    images = resize_like_extract_layers(pixels, image_size) if resize else pixels
    for layer in normalisation:
        images = layer(images)
    return images


@dataclass(frozen=True)
class ClassifierPart:
    """One backbone of a classifier: what its features were extracted with, its weights, and the
    head's view of them. A fused run's classifier has several, sharing one input and one size."""

    fingerprint: Fingerprint
    weights: ResolvedWeights
    view: FeatureView


def build_classifier(fingerprint: Fingerprint, weights: ResolvedWeights, view: FeatureView, head: Head,
                     precision: str | None = None, resize: bool = True) -> tuple[keras.Model, keras.Model]:
    """(classifier, backbone). The classifier takes (batch, height, width, 3) pixels in 0..255 and
    returns probabilities; it is built from Keras' own layers only (it loads without this package).
    The backbone inside is frozen and called with training=False; BatchNormalization keeps its
    moving statistics because `unfreeze` never makes it trainable (in Keras 3 the nested
    training=False alone does not hold a trainable one). `resize=False` takes images already
    at the backbone's size (a fixed input shape, as TFLite wants)."""
    model, backbones = build_fused_classifier([ClassifierPart(fingerprint, weights, view)], head, precision, resize)
    return model, backbones[0]


def build_fused_classifier(parts: Sequence[ClassifierPart], head: Head, precision: str | None = None,
                           resize: bool = True, with_features: bool = False) -> tuple[keras.Model, list[keras.Model]]:
    """(classifier, its backbones): every part's backbone on one input, resized once (the parts
    share an image size), each normalised as its weights want; their feature vectors
    concatenated in the parts' order (the order the head was trained on) into the head. Layers of
    a part after the first carry its backbone's name as a prefix. `with_features`: the output is the
    probabilities followed by the head's input vector, in one row (predict's unknown scores)."""
    if resize and not backend.is_tensorflow():
        raise PipelineError("a classifier that resizes its input (area interpolation) needs the tensorflow backend: "
                            "feed images already squashed by the pipeline's image path instead")
    size = parts[0].fingerprint.image_size
    pixels = keras.Input((None, None, 3) if resize else (size, size, 3), name="pixels", dtype="float32")
    resized = resize_like_extract_layers(pixels, size) if resize else pixels
    vectors, backbones = [], []
    for index, part in enumerate(parts):
        fingerprint, view = part.fingerprint, part.view
        prefix = "" if index == 0 else f"{fingerprint.backbone}_"
        spec = get_backbone(fingerprint.backbone)
        backbone = build_backbone(spec, size, precision or fingerprint.precision, part.weights)
        normalisation = preprocessing_layers(fingerprint.preprocessing, prefix)
        extractor = keras.Model(backbone.input, [backbone.get_layer(name).output for name in view.layers],
                                name=f"{spec.name}_features")
        images = image_input(resized, size, normalisation, resize=False)
        outputs = extractor(images, training=False)
        outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
        vectors.append(feature_vector(list(outputs), view, prefix))  # a pooled cache has view.pooling == its pooling
        backbones.append(backbone)
    vector = vectors[0] if len(vectors) == 1 else keras.layers.Concatenate(name="fused_features")(vectors)
    if not head.KERAS_FORM:
        return FeaturesThenHead(keras.Model(pixels, vector, name="features"), head, with_features), backbones
    probabilities = head.as_keras()(vector)
    if with_features:
        flat = keras.layers.Flatten(name="features_out")(vector)
        both = keras.layers.Concatenate(name="probabilities_and_features")([probabilities, flat])
        return keras.Model(pixels, both, name="classifier_with_features"), backbones
    return keras.Model(pixels, probabilities, name="classifier"), backbones


class FeaturesThenHead:
    """A classifier whose head has no Keras form (the sklearn head): the Keras model from pixels
    to the head's feature vector, then the head's `predict_proba` in NumPy. It answers as the
    Keras classifier does where predict, evaluate and the export's checks call it
    (`predict_on_batch`, calling it, `output_shape`); it cannot be saved, fine-tuned or converted
    as one model (export --format onnx joins the two graphs instead)."""

    def __init__(self, features: keras.Model, head: Head, with_features: bool = False) -> None:
        self.features, self.head, self.with_features = features, head, with_features
        self.output_shape = (None, len(head.class_names))

    def predict_on_batch(self, pixels: Any) -> np.ndarray:
        vectors = np.asarray(self.features.predict_on_batch(pixels), np.float32)
        vectors = vectors.reshape(len(vectors), -1)
        probabilities = self.head.predict_proba(vectors).astype(np.float32)
        return np.concatenate([probabilities, vectors], axis=1) if self.with_features else probabilities

    def __call__(self, pixels: Any, training: bool = False) -> np.ndarray:
        return self.predict_on_batch(np.asarray(pixels, np.float32))


_MIXED_POLICIES = ("mixed_float16", "mixed_bfloat16", "bfloat16", "float16")


def load_finetuned(path: Path, float32: bool = False) -> keras.Model:
    """A fine-tuned run's saved classifier (safe mode), as trained or computing in float32
    (every mixed or low-precision dtype policy replaced: its weights are float32 already)."""
    from pipeline.artefacts import load_keras_model

    _refuse_early_models(path)
    trained = load_keras_model(path, "fine-tune again")
    if not float32:
        return trained
    model = keras.Model.from_config(_float32_config(trained.get_config()))
    model.set_weights(trained.get_weights())
    return model


def _refuse_early_models(path: Path) -> None:
    """Models fine-tuned by early versions held a layer of this package (ImagePreprocessing)
    instead of Keras' own: one policy for older formats, refused in one line."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            config = archive.read("config.json")
    except (OSError, KeyError, zipfile.BadZipFile):
        return  # the loader names what is wrong with the file
    if b"ImagePreprocessing" in config:
        raise PipelineError(f"{path.parent} was fine-tuned by an early version (its model holds a layer of this "
                            "package): fine-tune it again")


def _float32_config(value: Any) -> Any:
    """A model config with every mixed or low-precision dtype policy replaced by float32."""
    if isinstance(value, dict):
        return {key: "float32" if isinstance(item, str) and item in _MIXED_POLICIES else _float32_config(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [_float32_config(item) for item in value]
    return value


def top_model(classifier: keras.Model, backbone: keras.Model, below: str, view: FeatureView) -> keras.Model:
    """The classifier above the layer `below`: from its activations to probabilities, through the
    backbone's own layers from there on (the same layer objects: training this model trains the
    classifier's), the head's view of them (pooled or flattened, as build_classifier does) and the
    head. Called like the backbone in the classifier, with training=False (BatchNormalization stays
    in inference mode)."""
    maps = keras.Input(tuple(backbone.get_layer(below).output.shape[1:]), name=below, dtype="float32")
    above = [name for name in view.layers if name != below]
    outputs: dict[str, Any] = {below: maps}
    if above:
        try:
            upper = keras.Model(backbone.get_layer(below).output, [backbone.get_layer(n).output for n in above],
                                name=f"{backbone.name}_above_{below}")
        except ValueError:
            raise PipelineError(f"the head reads {', '.join(view.layers)}: with the fixed part ending at {below}, "
                                "every layer it reads must lie above it (unfreeze fewer blocks)") from None
        results = upper(maps, training=False)
        results = results if isinstance(results, list | tuple) else [results]
        outputs |= dict(zip(above, results))
    vector = feature_vector([outputs[name] for name in view.layers], view)
    head = classifier.layers[-1]  # the head, a Keras model, is the classifier's last layer
    return keras.Model(maps, head(vector), name=f"classifier_above_{below}")


def without_resize(model: keras.Model) -> keras.Model:
    """The classifier from images already at its size: the part after its resize."""
    normalise = next(layer for layer in model.layers if layer.name.startswith("normalise_"))
    return keras.Model(normalise.input, model.output, name="classifier_resized_input")


def from_squashed(model: keras.Model, tta: str, size: int) -> keras.Model:
    """The classifier from N x N pixels already squashed (the form TFLite and ONNX take), with
    `tta`'s views averaged inside."""
    from pipeline.images.views import with_averaged_views

    return with_averaged_views(without_resize(model), tta, size, resize=False)
