"""The Keras dense head: Dense -> [BatchNorm] -> ReLU -> Dropout -> softmax, early stopping on validation accuracy."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artefacts import checked_file, file_sha256, load_keras_model
from pipeline.errors import PipelineError
from pipeline.heads.base import SIDECAR, Features, Head, class_weights
from pipeline.heads.ordinal import check_loss, describe_order, ordinal_loss


def training_statistics(train: Features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of every feature over the training split, read chunk by chunk (in
    memory or streamed alike). Constant features get variance 1, as scikit-learn's scaler does,
    so they pass through unscaled instead of being divided by zero."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    for vectors, _ in train.chunks():
        scaler.partial_fit(vectors)
    return scaler.mean_, scaler.scale_ ** 2


class DenseHead(Head):
    """Dense(units) -> [BatchNorm] -> ReLU -> Dropout -> Dense(classes, softmax), the seeds' head.
    Stopped and kept by what runs are chosen by: training stops when validation accuracy has not
    improved for `patience` epochs, and the weights of the epoch with the best validation accuracy
    are kept (ties: lower loss). Stopping on validation loss stopped a head whose loss rose while
    its accuracy still climbed (0.87 -> 0.96, 86.4% -> 89.4%, stopped at epoch 9 of 50). The
    learning rate halves when validation loss stalls (the smoother signal); every epoch's lands in
    the history (ReduceLROnPlateau logs it)."""

    kind = "dense"
    SOFT_TARGETS = True  # in memory, categorical cross-entropy against the targets
    MULTILABEL = True  # one sigmoid a label, binary cross-entropy
    HISTORY_AXIS = "epochs"
    RULES = {
        "units": (lambda v: v >= 1, "a positive integer"),
        "dropout": (lambda v: 0 <= v < 1, "a rate from 0 up to, not including, 1"),
        "lr": (lambda v: 0 < v < math.inf, "a positive learning rate"),
        "epochs": (lambda v: v >= 1, "a positive integer"),
        "batch_size": (lambda v: v >= 1, "a positive integer"),
        "patience": (lambda v: v >= 1, "a positive integer"),
    }
    OPTIMIZERS = ("rmsprop", "adam", "sgd")
    MODEL_FILE = "head.keras"

    def __init__(self, *, units: int = 256, batch_norm: bool = False, dropout: float = 0.5,
                 optimizer: str = "rmsprop", lr: float = 1e-3, epochs: int = 50, batch_size: int = 32,
                 patience: int = 4, class_weight: str = "none", loss: str = "crossentropy", seed: int = 0,
                 validation_fraction: float = 0.2) -> None:
        self.units = units
        self.batch_norm = batch_norm
        self.dropout = dropout
        self.optimizer = optimizer  # rmsprop, adam or sgd
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        # 4, not 8: on 10,000 x 2,000 synthetic features it stopped at 11 epochs instead of 22, in 17.9 s
        # instead of 38.1 s, validation 80.63% against 80.69% (bench/heads.py --suite search)
        self.patience = patience
        self.class_weight = class_weight
        self.loss = loss  # or ordinal: the classes' sorted order is an order (pipeline/heads/ordinal.py)
        self.seed = seed
        self.validation_fraction = validation_fraction  # fit(X, y): the part held out for early stopping

    def _check_more(self) -> None:
        if self.optimizer not in self.OPTIMIZERS:
            choices = ", ".join(self.OPTIMIZERS)
            raise PipelineError(f"unknown optimizer {self.optimizer!r}: choose from {choices}")
        check_loss(self.loss, len(self.class_names) or None)

    @staticmethod
    def versions() -> dict[str, str]:
        import keras

        versions = {"keras": keras.__version__, "backend": keras.backend.backend()}
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            versions["tensorflow"] = tf.__version__
        return versions

    def build(self, mean: np.ndarray, variance: np.ndarray) -> Any:
        """The head on standardised inputs: a fixed Normalization layer holding the training split's
        mean and variance comes first, so the head learns whatever the features' scale (VGG16 maps
        with random weights have a standard deviation near 0.002; ImageNet ones near 10)."""
        import keras

        keras.utils.set_random_seed(int(self.params["seed"]))
        inputs = keras.Input((len(mean),), name="features")
        x = keras.layers.Normalization(mean=mean.astype(np.float32), variance=variance.astype(np.float32),
                                       name="standardise", dtype="float32")(inputs)
        x = keras.layers.Dense(self.params["units"], name="dense")(x)
        if self.params["batch_norm"]:
            x = keras.layers.BatchNormalization(name="batch_norm")(x)
        x = keras.layers.ReLU(name="relu")(x)
        x = keras.layers.Dropout(self.params["dropout"], name="dropout")(x)
        outputs = keras.layers.Dense(len(self.class_names), activation="sigmoid" if self.multilabel_ else "softmax",
                                     name="probabilities", dtype="float32")(x)
        return keras.Model(inputs, outputs, name="dense_head")

    def make_optimizer(self) -> Any:
        """A fresh Keras optimizer as the head's parameters say (also for models built around it)."""
        import keras

        lr = float(self.params["lr"])
        return {
            "rmsprop": lambda: keras.optimizers.RMSprop(lr),
            "adam": lambda: keras.optimizers.Adam(lr),
            "sgd": lambda: keras.optimizers.SGD(lr, momentum=0.9),
        }[self.params["optimizer"]]()

    def _dataset(self, data: Features, shuffle: bool) -> Any:
        """A streamed split as Keras batches. Training rows come in a fresh global order each epoch,
        read a shard's worth at a time from whichever shards hold them, so memory stays bounded by
        the shard size even when the shards were written class by class."""
        from pipeline.heads.fitting import StreamedExamples

        seed = int(self.params["seed"])

        def chunks(epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            order = np.random.default_rng(seed + epoch).permutation(len(data)) if shuffle else None
            yield from data.chunks(rows=data.shard_rows, order=order)

        return StreamedExamples(chunks, len(data), int(self.params["batch_size"]))

    def _fit(self, train: Features, validation: Features, progress: bool) -> list[dict[str, float]]:

        from pipeline.heads.fitting import KeepBest, fit, fit_verbosity, history_rows, training_callbacks

        check_loss(self.params["loss"], len(self.class_names))
        if progress and self.params["loss"] == "ordinal":
            print(f"ordinal loss: {describe_order(self.class_names)}", file=sys.stderr, flush=True)
        self.model_ = self.build(*training_statistics(train))
        soft = getattr(train, "targets", None) is not None
        if soft and (self.params["loss"] == "ordinal" or not (train.in_memory and validation.in_memory)):
            raise PipelineError("soft and multi-label targets train the dense head in memory with --loss "
                                "crossentropy: drop --loss ordinal, --stream (or raise --memory-budget)")
        loss = ordinal_loss(len(self.class_names)) if self.params["loss"] == "ordinal" else \
            "binary_crossentropy" if self.multilabel_ else \
            "categorical_crossentropy" if soft else "sparse_categorical_crossentropy"
        self.model_.compile(optimizer=self.make_optimizer(), loss=loss, metrics=["accuracy"])
        weights = class_weights(train.labels, len(self.class_names), self.params["class_weight"])
        patience = int(self.params["patience"])
        callbacks = training_callbacks(KeepBest(), patience, plateau=(max(1, patience // 3), 1e-6))
        verbose = fit_verbosity(progress)
        common = dict(epochs=int(self.params["epochs"]), callbacks=callbacks, verbose=verbose,
                      class_weight=None if self.params["class_weight"] == "none" else dict(enumerate(weights)))
        if soft:  # cross-entropy against the soft targets; validation's accuracy against its thresholded ones
            onehot = np.eye(len(self.class_names), dtype=np.float32)
            held = validation.targets if getattr(validation, "targets", None) is not None else \
                onehot[validation.labels]
            history = self.model_.fit(train.matrix, np.asarray(train.targets, np.float32),
                                      validation_data=(validation.matrix, np.asarray(held, np.float32)),
                                      batch_size=int(self.params["batch_size"]), shuffle=True, **common)
        elif train.in_memory and validation.in_memory:
            history = self.model_.fit(train.matrix, train.labels,
                                      validation_data=(validation.matrix, validation.labels),
                                      batch_size=int(self.params["batch_size"]), shuffle=True, **common)
        else:
            history = fit(self.model_, self._dataset(train, shuffle=True), shuffle=False,
                          validation_data=self._dataset(validation, shuffle=False), **common)
        return history_rows(history)

    def outcome(self) -> dict[str, Any]:
        history = self.history_
        best = min(range(len(history)), key=lambda i: (-history[i].get("val_accuracy", -1.0),
                                                       history[i].get("val_loss", float("inf")))) if history else None
        return {"epochs_run": len(history), "best_epoch": None if best is None else best + 1}

    def as_keras(self) -> Any:
        return self.model_

    def _proba(self, data: Features) -> np.ndarray:
        parts = [self.model_.predict_on_batch(vectors) if len(vectors) else np.zeros((0, len(self.class_names)))
                 for vectors, _ in data.chunks(rows=1024)]
        return np.concatenate(parts).astype(np.float64) if parts else np.zeros((0, len(self.class_names)))

    def _save_model(self, directory: Path) -> dict[str, Any]:
        self.model_.save(directory / self.MODEL_FILE)
        return {"files": {self.MODEL_FILE: file_sha256(directory / self.MODEL_FILE)}}

    def _load_model(self, directory: Path, sidecar: dict[str, Any]) -> None:
        path = checked_file(directory / self.MODEL_FILE, sidecar["files"][self.MODEL_FILE], SIDECAR,
                            "train the head again")
        self.model_ = load_keras_model(path, "train the head again")


