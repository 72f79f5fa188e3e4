"""How fine-tuning trains: the optimizer, the learning-rate schedule, the rate of each block, the loss.

- `--optimizer sgd` (momentum, the classic recipe) or `adamw` (decoupled weight decay), recorded
  in the run with every setting below;
- `--schedule plateau` (the rate halves when validation loss stalls) or `cosine` (a linear
  warm-up over `--warmup-epochs`, then a cosine decay to zero at the last epoch, per step);
- `--lr-decay D` (discriminative rates, as ULMFiT and fastai's `slice` do): the top unfrozen block
  learns at `--lr`, the block below it at lr x D, the next at lr x D^2 ...; the head at `--lr`;
- `--label-smoothing S`: the targets are 1 - S on the class and S / classes spread over all.

The rate of each variable is its block's factor times the schedule's rate, applied in the
optimizer's update step (`rated`), so the schedule and the factors compose. Keras is imported where
it is used: the command line's choices read OPTIMIZERS and SCHEDULES from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pipeline.heads.ordinal import ordinal_loss

if TYPE_CHECKING:
    import keras

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("plateau", "cosine")


def block_rate_factors(backbone: keras.Model, blocks: Sequence[str], trained: Sequence[str],
                       decay: float) -> dict[str, float]:
    """variable path -> its learning-rate factor, for the trained layers of the backbone: decay^k
    where k counts the unfreeze points (the registry's blocks) above the layer's own. Variables
    missing here (the head's) learn at the full rate."""
    from pipeline.backbone.blocks import unfreeze_index

    if decay == 1.0:
        return {}
    starts = sorted({unfreeze_index(backbone, block) for block in blocks if _has_block(backbone, block)})
    index = {layer.name: i for i, layer in enumerate(backbone.layers)}
    factors = {}
    for name in trained:
        position = index[name]
        # blocks that begin after this layer: 0 for the top block, 1 for the one below it, ...
        depth = sum(1 for start in starts if start > position)
        for variable in backbone.get_layer(name).weights:
            factors[variable.path] = decay ** depth
    return factors


def _has_block(backbone: keras.Model, block: str) -> bool:
    return any(layer.name == block or layer.name.startswith(block + "_") for layer in backbone.layers)


def optimizer(name: str, lr: float, momentum: float, clipnorm: float, weight_decay: float, schedule: str,
              warmup_epochs: float, epochs: int, steps_per_epoch: int, factors: dict[str, float]) -> Any:
    """A fresh Keras optimizer as the recipe says (`factors`: block_rate_factors)."""
    import keras

    rate: Any = lr
    if schedule == "cosine":
        warmup = int(round(warmup_epochs * steps_per_epoch))
        decay_steps = max(1, epochs * steps_per_epoch - warmup)
        rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=lr / 100 if warmup else lr, decay_steps=decay_steps, alpha=0.0,
            warmup_target=lr if warmup else None, warmup_steps=warmup)
    common = {"clipnorm": clipnorm or None}
    if name == "adamw":
        base, options = keras.optimizers.AdamW, {"weight_decay": weight_decay or 0.0}
    else:
        base, options = keras.optimizers.SGD, {"momentum": momentum, "weight_decay": weight_decay or None}
    return rated(base)(factors, learning_rate=rate, **options, **common)


def rated(base: type) -> type:
    """`base` with a learning-rate factor per variable (path -> factor), applied in its update step."""

    class Rated(base):
        def __init__(self, factors: dict[str, float], **options: Any) -> None:
            super().__init__(**options)
            self.factors = dict(factors)

        def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> Any:
            # the backend may hand over its own variable (TensorFlow's): found by the optimizer's index
            path = self._trainable_variables[self._get_variable_index(variable)].path
            factor = self.factors.get(path, 1.0)
            if factor != 1.0:
                learning_rate = learning_rate * factor
            return super().update_step(gradient, variable, learning_rate)

    Rated.__name__ = f"Rated{base.__name__}"
    return Rated


def loss(classes: int, label_smoothing: float, kind: str = "crossentropy") -> Any:
    """Cross-entropy on integer labels, with label smoothing when asked (Keras' sparse loss has
    none); or the ordinal loss of ordered classes (pipeline/heads/ordinal.py)."""
    if kind == "ordinal":
        return ordinal_loss(classes)
    if not label_smoothing:
        return "sparse_categorical_crossentropy"

    def smoothed_crossentropy(labels: Any, probabilities: Any) -> Any:
        import keras

        onehot = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(labels, (-1,)), "int32"), classes)
        return keras.losses.categorical_crossentropy(onehot, probabilities, label_smoothing=label_smoothing)

    return smoothed_crossentropy


def steps(examples: int, batch_size: int) -> int:
    return max(1, math.ceil(examples / batch_size))
