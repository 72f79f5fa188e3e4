"""Decision thresholds chosen on validation: each label's of a multi-label head (one sigmoid a
label), and a binary run's on the probability of its second class (train-head --threshold
validation). Recorded with the run; used by scoring, predict and every export's record."""

from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD = 0.5


def choose_thresholds(probabilities: np.ndarray, targets: np.ndarray) -> list[float]:
    """For each label, the threshold on its probability with the highest F1 on validation (ties:
    the one closest to 0.5); 0.5 where validation has no image with that label."""
    chosen = []
    for k in range(targets.shape[1]):
        truth = np.asarray(targets[:, k]) >= 0.5
        p = np.asarray(probabilities[:, k], np.float64)
        if not truth.any() or len(p) == 0:
            chosen.append(DEFAULT_THRESHOLD)
            continue
        candidates = np.unique(np.concatenate([p, [DEFAULT_THRESHOLD]]))
        best, best_key = DEFAULT_THRESHOLD, None
        for t in candidates:
            said = p >= t
            tp = int(np.sum(said & truth))
            f1 = 2 * tp / max(int(said.sum()) + int(truth.sum()), 1)
            key = (-f1, abs(t - DEFAULT_THRESHOLD))
            if best_key is None or key < best_key:
                best, best_key = float(t), key
        chosen.append(best)
    return chosen


def choose_binary_threshold(probability: np.ndarray, truth: np.ndarray) -> float:
    """The threshold on the probability of class 1 with the highest validation accuracy (ties: the
    one closest to 0.5)."""
    p = np.asarray(probability, np.float64)
    truth = np.asarray(truth) == 1
    best, best_key = DEFAULT_THRESHOLD, None
    for t in np.unique(np.concatenate([p, [DEFAULT_THRESHOLD]])):
        key = (-float(np.mean((p >= t) == truth)) if len(p) else 0.0, abs(t - DEFAULT_THRESHOLD))
        if best_key is None or key < best_key:
            best, best_key = float(t), key
    return best


def sigmoid(z: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(z)
