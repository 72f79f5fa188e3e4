"""The nearest-neighbour head, the few-shot baseline: no training, the training images' feature
vectors kept (L2-normalised) with their labels; an image's probabilities are its k most similar
training images' votes (cosine similarity), uniform or weighted by 1 / (distance + 1e-6) with
distance = 1 - similarity; k and the weighting chosen on validation.

The fitted head is plain arrays (head.npz: the normalised vectors and their labels). Predicting is
`knn_probabilities` in NumPy, and the same in Keras (`as_keras`: UnitNormalization, a Dense layer
holding the vectors, and `NeighbourVotes`, the one layer of this package: top-k and the votes).
Its .keras export therefore loads where `pipeline` is importable; SavedModel, TFLite and ONNX need
nothing of it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artefacts import checked_file, file_sha256, load_arrays
from pipeline.errors import PipelineError
from pipeline.heads.base import SIDECAR, Features, Head
from pipeline.heads.logreg import _best_row, _c_row

EPSILON = 1e-6  # distance weights 1 / (distance + EPSILON), here and in keras_layers.NeighbourVotes (given it)
WEIGHTINGS = ("uniform", "distance")
WEIGHTING_CHOICES = ("search", *WEIGHTINGS)  # --weighting; search tries both


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_probabilities(x: np.ndarray, vectors: np.ndarray, labels: np.ndarray, classes: int, k: int,
                      weighting: str, chunk: int = 1024) -> np.ndarray:
    """Vote shares of each row's k most similar training vectors (float32, as the Keras layers)."""
    out = np.zeros((len(x), classes))
    onehot = np.eye(classes, dtype=np.float32)[labels]
    for start in range(0, len(x), chunk):
        similarity = _normalised(x[start:start + chunk]) @ vectors.T
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(similarity, nearest, axis=1)
        weight = np.ones_like(top) if weighting == "uniform" else 1 / (1 - top + EPSILON)
        votes = (weight[:, :, None] * onehot[nearest]).sum(axis=1)
        out[start:start + chunk] = votes / votes.sum(axis=1, keepdims=True)
    return out


class KNNHead(Head):
    """Cosine nearest neighbours: k and the weighting chosen on validation (accuracy, ties by log loss)."""

    kind = "knn"
    HISTORY_AXIS = "k"
    RULES = {"weighting": (lambda v: v in WEIGHTING_CHOICES, "search, uniform or distance")}
    MODEL_FILE = "head.npz"

    def __init__(self, *, k_grid: str = "1,3,5,10,20", weighting: str = "search",
                 validation_fraction: float = 0.2) -> None:
        self.k_grid = k_grid  # the numbers of neighbours to try
        self.weighting = weighting  # search (both), uniform or distance
        self.validation_fraction = validation_fraction

    def _ks(self) -> list[int]:
        try:
            values = sorted({int(v) for v in str(self.k_grid).split(",")})
        except ValueError:
            values = []
        if not values or values[0] < 1:
            raise PipelineError(f"--k-grid {self.k_grid!r}: numbers of neighbours, K1,K2,... (1 or more)")
        return values

    def _check_more(self) -> None:
        self._ks()

    @staticmethod
    def versions() -> dict[str, str]:
        return {"numpy": np.__version__}

    def _fit(self, train: Features, validation: Features, progress: bool) -> list[dict[str, float]]:
        from tqdm import tqdm

        if not (train.in_memory and validation.in_memory):
            raise PipelineError("the knn head keeps the training features in memory, and these are streamed: pool "
                                "them (extract --pooling avg), or raise --memory-budget")
        ks = [k for k in self._ks() if k <= len(train.labels)]
        if not ks:
            raise PipelineError(f"--k-grid {self.k_grid}: every k is larger than the {len(train.labels)} training "
                                "images; use smaller k")
        vectors, labels = _normalised(train.matrix), np.asarray(train.labels, np.int64)
        classes = len(self.class_names)
        weightings = WEIGHTINGS if self.weighting == "search" else (self.weighting,)
        rows = []
        for k, weighting in tqdm([(k, w) for k in ks for w in weightings], desc="knn search", unit="setting",
                                 disable=not progress, file=sys.stderr):
            proba = knn_probabilities(validation.matrix, vectors, labels, classes, k, weighting)
            kept = np.clip(proba, 1e-7, 1)  # a unanimous vote is probability 1: log loss needs no zero
            row = _c_row(float(k), float("nan"), kept / kept.sum(axis=1, keepdims=True), validation.labels, classes,
                         True)  # "C" holds k for the shared ranking (_best_row); the history keeps "k"
            rows.append(row | {"k": k, "weighting": weighting})
        best = _best_row(rows)
        self.k_, self.weighting_ = int(best["k"]), best["weighting"]
        self.vectors_, self.labels_ = vectors, labels
        return [{key: value for key, value in row.items() if key not in ("C", "train_accuracy")} for row in rows]

    def _proba(self, data: Features) -> np.ndarray:
        classes = len(self.class_names)
        parts = [knn_probabilities(x, self.vectors_, self.labels_, classes, self.k_, self.weighting_)
                 for x, _ in data.chunks()]
        return np.concatenate(parts) if parts else np.zeros((0, classes))

    def outcome(self) -> dict[str, Any]:
        return {"chosen_k": self.k_, "chosen_weighting": self.weighting_, "training_vectors": len(self.labels_)}

    def as_keras(self) -> Any:
        import keras

        from pipeline.keras_layers import NeighbourVotes

        classes = len(self.class_names)
        inputs = keras.Input((self.vectors_.shape[1],), name="features")
        unit = keras.layers.UnitNormalization(name="unit_length", dtype="float32")(inputs)
        similar = keras.layers.Dense(len(self.vectors_), use_bias=False, name="similarity", dtype="float32")
        similarity = similar(unit)
        similar.set_weights([self.vectors_.T.astype(np.float32)])
        votes = NeighbourVotes(self.k_, self.weighting_, classes, EPSILON, name="probabilities", dtype="float32")
        outputs = votes(similarity)
        votes.set_weights([np.eye(classes, dtype=np.float32)[self.labels_]])
        return keras.Model(inputs, outputs, name="knn_head")

    def _save_model(self, directory: Path) -> dict[str, Any]:
        np.savez(directory / self.MODEL_FILE, vectors=self.vectors_, labels=self.labels_)
        return {"k": self.k_, "weighting_used": self.weighting_,
                "files": {self.MODEL_FILE: file_sha256(directory / self.MODEL_FILE)}}

    def _load_model(self, directory: Path, sidecar: dict[str, Any]) -> None:
        path = checked_file(directory / self.MODEL_FILE, sidecar.get("files", {}).get(self.MODEL_FILE), SIDECAR,
                            "train the head again")
        arrays = load_arrays(path, ("vectors", "labels"), "train the head again")
        vectors, labels = arrays["vectors"], arrays["labels"]
        k, weighting = sidecar.get("k"), sidecar.get("weighting_used")
        if (vectors.ndim != 2 or vectors.shape[1] != self.n_features_in_ or labels.shape != (len(vectors),)
                or labels.dtype.kind not in "iu" or not np.isfinite(vectors).all()
                or (len(labels) and (labels.min() < 0 or labels.max() >= len(self.class_names)))
                or not isinstance(k, int) or not 1 <= k <= len(vectors) or weighting not in WEIGHTINGS):
            raise PipelineError(f"{path} or {SIDECAR} holds neighbours of the wrong shape or settings (damaged?): "
                                "train the head again")
        self.vectors_, self.labels_ = vectors.astype(np.float32), labels.astype(np.int64)
        self.k_, self.weighting_ = k, weighting
