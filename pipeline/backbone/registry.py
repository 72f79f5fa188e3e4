"""The registry of backbones, the only place that knows one: constructor, default size and
feature layers, blocks (the unfreeze points), and per-weights entries in the manner of timm's
pretrained tags (`vgg16.tv_in1k`, `vgg16.keras_in1k`, `resnet50.keras_in1k`: the --weights
source, how the file is fetched or converted and checked, and its preprocessing).

Importing it imports no TensorFlow, so the command line takes its choices from here cheaply.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.backbone import efficientnet_lite
from pipeline.backbone.weights import (
    SOURCES,
    KerasWeightsFile,
    ResolvedWeights,
    keras_weights,
    random_weights,
    torchvision_vgg16_weights,
    weights_file,
)
from pipeline.errors import PipelineError, option, spoken_by_command_line

# The input normalisations weights are trained with (network.py implements them): "torch" and
# "caffe" as Keras' imagenet_utils modes, "lite" (x - 127) / 128.
PREPROCESSING = ("torch", "caffe", "lite")


def _application(name: str) -> Callable[..., Any]:
    """keras.applications.<name>, imported when first called."""
    def construct(**kwargs: Any) -> Any:
        import keras

        return getattr(keras.applications, name)(**kwargs)

    construct.__name__ = name
    return construct


@dataclass(frozen=True)
class SmallImageAdvice:
    """How to extract images much smaller than a backbone's input, and what that rests on.

    Extract says it (before the backbone pass) when the input is more than `most` times the
    images' typical shorter side, and advises an input `advised` times that side (a multiple of
    32) with `flags`; after following the advice the note no longer fires."""

    advised: float
    most: float
    flags: tuple[tuple[str, str], ...]  # extract options besides image_size (none: the default layers)
    measured: str  # where the advice comes from: a measurement, or that there is none

    def image_size(self, side: int, smallest: int) -> int:
        return max(smallest, 32 * round(side * self.advised / 32))

    def options(self, side: int, smallest: int) -> str:
        """The advice in the caller's words: flags on the command line, keywords in Python."""
        chosen = (("image_size", self.image_size(side, smallest)), *self.flags)
        return (" " if spoken_by_command_line() else ", ").join(option(name, value) for name, value in chosen)


# Measured by an outside trial on 10 classes of 28 x 28 gray images (8,551 train, 3,000 test), a
# logistic-regression head, test accuracy (issue 34 of this project; docs/commands.md, Small images).
VGG16_SMALL = SmallImageAdvice(2.3, 3, (("layer", "block4_pool"), ("pooling", "avg")),
                               "measured on 28 px images (10 classes): 64 px with block4_pool averaged was 0.5 points "
                               "above the default 150 px, in 92 s instead of 416 s")
LITE_SMALL = SmallImageAdvice(4.6, 5, (),
                              "measured for efficientnet_lite0 on 28 px images (10 classes): its default layers at "
                              "128 px gave 89.63% test, against 86.90% at 64 px and 86.23% with --layer block6d_out at "
                              "64 px")
UNMEASURED_SMALL = SmallImageAdvice(2.5, 3, (), "not measured for this backbone: the rule of thumb is an input 2-3 "
                                                "times the images' side")


@dataclass(frozen=True)
class PretrainedWeights:
    """One set of ImageNet weights for a backbone, named as timm names its pretrained tags
    (`vgg16.tv_in1k`): where it comes from, how it is fetched or converted and checked, and the
    preprocessing it was trained with."""

    tag: str
    source: str  # the --weights name: "torchvision" or "keras"
    preprocessing: str  # a mode of keras.applications.imagenet_utils.preprocess_input
    resolve: Callable[[str | None], ResolvedWeights]  # fetch or convert, verify by checksum

    def describe(self) -> str:
        return f"{self.tag} (--weights {self.source}, {self.preprocessing} preprocessing)"


@dataclass(frozen=True)
class BackboneSpec:
    """Everything the pipeline knows about one backbone; nothing outside this registry does."""

    name: str
    constructor: Callable[..., Any]  # keras.applications.<Name>(include_top=..., weights=..., input_shape=...)
    default_image_size: int
    default_layers: tuple[str, ...]
    weights: tuple[PretrainedWeights, ...]  # the first is what `--weights imagenet` means
    blocks: tuple[str, ...]  # layer-name prefixes, bottom to top: the unfreeze points
    min_image_size: int = 32
    default_pooling: str = "none"  # extract's --pooling when not given
    small_images: SmallImageAdvice = UNMEASURED_SMALL  # extract's advice for images much smaller than the input

    @property
    def default_unfreeze(self) -> str:
        return self.blocks[-1]

    def resolve_weights(self, choice: str, preprocessing: str | None = None) -> ResolvedWeights:
        """--weights: imagenet (this backbone's first entry), a source name, none, or a file."""
        if choice == "none":
            return random_weights(preprocessing)
        if choice == "imagenet":
            choice = self.weights[0].source
        for entry in self.weights:
            if choice in (entry.source, entry.tag):
                return entry.resolve(preprocessing or entry.preprocessing)
        if choice in SOURCES:
            offered = ", ".join(entry.source for entry in self.weights)
            raise PipelineError(f"{choice} weights are not available for {self.name}: it has {offered}")
        return weights_file(choice, preprocessing)


def _keras_entry(backbone: str, folder: str, file_name: str, md5: str) -> PretrainedWeights:
    keras_file = KerasWeightsFile(file_name, f"https://storage.googleapis.com/tensorflow/keras-applications/"
                                             f"{folder}/{file_name}", md5)
    return PretrainedWeights(f"{backbone}.keras_in1k", "keras", "caffe",
                             lambda preprocessing: keras_weights(backbone, keras_file, preprocessing))


BACKBONES: dict[str, BackboneSpec] = {
    "vgg16": BackboneSpec(
        name="vgg16",
        constructor=_application("VGG16"),
        default_image_size=150,  # 150x150 gives the classic 4x4x512 bottleneck
        default_layers=("block5_pool",),
        weights=(
            PretrainedWeights("vgg16.tv_in1k", "torchvision", "torch", torchvision_vgg16_weights),
            _keras_entry("vgg16", "vgg16", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                         "6d6bbae143d832006294945121d1f1fc"),
        ),
        blocks=("block1", "block2", "block3", "block4", "block5"),
        small_images=VGG16_SMALL,
    ),
    "resnet50": BackboneSpec(
        name="resnet50",
        constructor=_application("ResNet50"),
        default_image_size=224,
        default_layers=("conv5_block3_out",),
        weights=(
            _keras_entry("resnet50", "resnet", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                         "4d473c1dd8becc155b73f8504c6f6626"),
        ),
        blocks=("conv1", "conv2", "conv3", "conv4", "conv5"),
    ),
}


def _efficientnet_lite(variant: efficientnet_lite.LiteVariant) -> BackboneSpec:
    stages = variant.stage_outputs()
    return BackboneSpec(
        name=variant.name,
        constructor=functools.update_wrapper(functools.partial(efficientnet_lite.build, variant),
                                             efficientnet_lite.build),
        default_image_size=variant.image_size,
        # the last three stages and the head, average-pooled by default: 1,904 values for Lite0
        # (their full maps at 224 px would be 109,760)
        default_layers=(*stages[-3:], "top_activation"),
        default_pooling="avg",
        small_images=LITE_SMALL if variant.name == "efficientnet_lite0" else dataclasses.replace(
            LITE_SMALL, measured=LITE_SMALL.measured + f" ({variant.name} not measured: the same advice)"),
        weights=(PretrainedWeights(f"{variant.name}.in1k", "pytorch", efficientnet_lite.PREPROCESSING,
                                   efficientnet_lite.pretrained_weights(variant)),),
        blocks=("stem", *(f"block{stage}a" for stage in range(1, 8))),  # top_conv trains with block7a
    )


BACKBONES.update({name: _efficientnet_lite(variant) for name, variant in efficientnet_lite.VARIANTS.items()})


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise PipelineError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}") from None

