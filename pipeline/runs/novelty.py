"""Unknowns at predict time: how far an image's feature vector is from the run's training images.

A head trained on five classes calls a sixth thing one of the five, often with confidence. The run
records, from its training images' cached features, the reference it needs to tell: the training
vectors (unit length; at most MAX_REFERENCE, evenly spaced) and a threshold on the mean cosine
distance to the NEIGHBOURS nearest of them (a k-nearest-neighbour distance, as in Sun et al. 2022),
chosen on the validation images so that `rate` of them (5% by default) would be flagged: the
false-rejection rate, stated. `predict` reports every image's `unknown_score` (that
distance) and flags it `unknown` beyond the threshold. Saved as plain arrays (novelty.npz, its
sha256 in config.json), loaded without pickles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artefacts import checked_file, file_sha256, load_arrays

NOVELTY_FILE = "novelty.npz"
MAX_REFERENCE = 20_000  # training vectors kept (evenly spaced) ...
MAX_REFERENCE_BYTES = 64 << 20  # ... and at most this much of them (float16): flattened maps keep fewer
DEFAULT_RATE = 0.05  # validation images flagged unknown at the recorded threshold
BLOCK = 2048
NEIGHBOURS = 10  # measured (bench/loop.py --suite unknowns): the mean of ten beats the nearest one alone


def unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, np.float32).reshape(len(vectors), -1)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


@dataclass
class Novelty:
    reference: np.ndarray  # (n, d) unit training vectors
    threshold: float  # cosine distance beyond which an image is unknown
    rate: float  # the validation images' share beyond it
    neighbours: int = NEIGHBOURS  # the score is the mean distance to this many nearest training images

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        """The mean cosine distance of each vector to its `neighbours` nearest training images (0:
        the same direction as all of them)."""
        queries = unit(vectors)
        reference = self.reference.astype(np.float32)
        k = max(1, min(self.neighbours, len(reference)))
        best = np.full((len(queries), k), -1.0, np.float32)  # the k highest similarities so far
        for start in range(0, len(reference), BLOCK):
            both = np.concatenate([best, queries @ reference[start:start + BLOCK].T], axis=1)
            best = -np.partition(-both, k - 1, axis=1)[:, :k]
        return np.clip(1.0 - best.mean(axis=1), 0.0, 2.0)

    def record(self) -> dict[str, Any]:
        return {"file": NOVELTY_FILE, "threshold": self.threshold, "false_rejection_rate": self.rate,
                "reference_images": int(len(self.reference)),
                "neighbours": self.neighbours,
                "score": "mean cosine distance of the image's feature vector to its nearest training images"}

    def save(self, directory: Path) -> dict[str, Any]:
        np.savez(Path(directory) / NOVELTY_FILE, reference=self.reference.astype(np.float16),
                 threshold=np.array(self.threshold))
        return self.record() | {"sha256": file_sha256(Path(directory) / NOVELTY_FILE)}


def fit(train: Any, validation: Any, rate: float = DEFAULT_RATE) -> Novelty | None:
    """The reference and threshold from a run's training and validation splits (SplitData); None
    where there are no validation images to choose the threshold on."""
    if not len(validation) or not len(train):
        return None
    most = max(1, min(MAX_REFERENCE, MAX_REFERENCE_BYTES // (2 * max(train.dimension, 1))))
    step = max(1, -(-len(train) // most))
    kept, row = [], 0
    for vectors, _ in train.chunks():
        chosen = [i for i in range(len(vectors)) if (row + i) % step == 0]
        kept.append(unit(vectors[chosen]))
        row += len(vectors)
    model = Novelty(np.concatenate(kept).astype(np.float16), 0.0, rate)
    held = np.concatenate([model.scores(vectors) for vectors, _ in validation.chunks()])
    model.threshold = float(np.quantile(held, 1.0 - rate))
    return model


def load(directory: Path, recorded: dict[str, Any]) -> Novelty:
    path = checked_file(Path(directory) / NOVELTY_FILE, recorded.get("sha256"), "config.json", "train the run again")
    arrays = load_arrays(path, ("reference", "threshold"), "train the run again")
    return Novelty(arrays["reference"], float(recorded["threshold"]), float(recorded["false_rejection_rate"]),
                   int(recorded.get("neighbours", 1)))
