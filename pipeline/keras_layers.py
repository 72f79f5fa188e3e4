"""The one Keras layer of this package: the votes of the k most similar training vectors (the kNN
head's top-k, which Keras has no layer for). Registered on import, by its registered name
(bottleneck_pipeline>NeighbourVotes, whatever module holds it); pipeline/artefacts.py imports it
before loading a .keras file, so an exported kNN model loads wherever `pipeline` is importable. It
sits at the package's top, needing Keras alone, so that loading a model does not import the heads."""

from __future__ import annotations

from typing import Any

import keras


@keras.saving.register_keras_serializable(package="bottleneck_pipeline")
class NeighbourVotes(keras.layers.Layer):
    """Similarities to the training vectors -> the vote shares of the k most similar."""

    def __init__(self, k: int, weighting: str, classes: int, epsilon: float = 1e-6, **kwargs: Any) -> None:
        """`epsilon`: distance weights are 1 / (distance + epsilon), the kNN head's EPSILON (its
        default is that value, for exports made before the layer recorded it)."""
        super().__init__(**kwargs)
        self.k, self.weighting, self.classes, self.epsilon = int(k), str(weighting), int(classes), float(epsilon)

    def build(self, input_shape: Any) -> None:
        self.votes = self.add_weight(shape=(int(input_shape[-1]), self.classes), initializer="zeros",
                                     trainable=False, name="onehot_labels")

    def call(self, similarity: Any) -> Any:
        top, index = keras.ops.top_k(similarity, self.k)
        weight = keras.ops.ones_like(top) if self.weighting == "uniform" else 1 / (1 - top + self.epsilon)
        votes = keras.ops.sum(keras.ops.expand_dims(weight, -1) * keras.ops.take(self.votes, index, axis=0), axis=1)
        return votes / keras.ops.sum(votes, axis=-1, keepdims=True)

    def get_config(self) -> dict[str, Any]:
        return super().get_config() | {"k": self.k, "weighting": self.weighting, "classes": self.classes,
                                       "epsilon": self.epsilon}
