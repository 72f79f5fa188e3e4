"""Blocks of a backbone: the unfreeze points fine-tuning chooses among (the registry names each
backbone's default), which layers train from one of them, and the layer just below it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from pipeline.backbone.registry import get_backbone
from pipeline.errors import PipelineError


def unfreeze(backbone: keras.Model, point: str, read: Sequence[str] = ()) -> list[str]:
    """Make the backbone trainable from `point` on: a block name (block5, conv5) or a layer index
    (as in the seeds: 15 for VGG16's block5). BatchNormalization layers stay frozen. Returns the
    names of the layers that now train: those with weights up to the highest layer of `read` (the
    layers the head reads; layers above them never see a gradient)."""
    start = unfreeze_index(backbone, point)
    names = [layer.name for layer in backbone.layers]
    end = max((names.index(name) for name in read), default=len(names) - 1)
    backbone.trainable = True
    trained = []
    for index, layer in enumerate(backbone.layers):
        # Frozen BatchNormalization is what keeps its moving statistics still: Keras 3 runs a
        # non-trainable one in inference mode, while training=False on the nested backbone call
        # does not stop a trainable one from updating under fit (tests/test_finetune.py).
        layer.trainable = start <= index <= end and not isinstance(layer, keras.layers.BatchNormalization)
        if layer.trainable and layer.weights:
            trained.append(layer.name)
    return trained


def layer_below(backbone: keras.Model, point: str) -> str:
    """The layer just below the unfreeze point: what stays fixed under fine-tuning, whose cached
    activations `finetune --cached` trains on (VGG16 block5: block4_pool)."""
    return backbone.layers[unfreeze_index(backbone, point) - 1].name


def unfreeze_index(backbone: keras.Model, point: str) -> int:
    """The index of the first layer `unfreeze` trains: a block name or a layer index."""
    layers = backbone.layers
    if point.isdigit():
        start = int(point)
        if not 0 < start < len(layers):
            raise PipelineError(f"--unfreeze {point}: {backbone.name} has layers 0..{len(layers) - 1}")
    else:
        matches = [i for i, layer in enumerate(layers) if layer.name == point or layer.name.startswith(point + "_")]
        if not matches:
            blocks = sorted({block_name(layer.name) for layer in layers})
            raise PipelineError(f"--unfreeze {point}: {backbone.name} has no such block; blocks: {', '.join(blocks)}")
        start = matches[0]
    return start


def choose_unfreeze(backbone: keras.Model, requested: str | None, default: str, read: Sequence[str]) -> str:
    """The unfreeze point for a head that reads the layers `read`: `requested`, or else `default`
    (the backbone's top block). Fine-tuning must train something the head sees: when the head reads
    only layers below the default, the default becomes the block of the highest layer it reads,
    and a requested point above every layer it reads is refused."""
    names = [layer.name for layer in backbone.layers]
    top = max(names.index(name) for name in read)
    if requested is None:
        return default if unfreeze_index(backbone, default) <= top else block_name(names[top])
    if unfreeze_index(backbone, requested) > top:
        raise PipelineError(
            f"--unfreeze {requested}: the head reads {', '.join(read)}, below that point, so fine-tuning would train "
            f"layers the head never sees; unfreeze {block_name(names[top])} or lower (see `inspect`)")
    return requested


def block_name(layer_name: str) -> str:
    return layer_name.split("_")[0]


def describe_layers(backbone_name: str) -> list[dict[str, Any]]:
    """Index, name, type, block and parameter count of every layer of a backbone (random weights)."""
    spec = get_backbone(backbone_name)
    model = spec.constructor(include_top=False, weights=None,
                             input_shape=(spec.default_image_size, spec.default_image_size, 3))
    return [{"index": i, "name": layer.name, "type": type(layer).__name__, "block": block_name(layer.name),
             "parameters": int(sum(np.prod(w.shape) for w in layer.weights)),
             "output_shape": str(tuple(layer.output.shape[1:]))} for i, layer in enumerate(model.layers)]
