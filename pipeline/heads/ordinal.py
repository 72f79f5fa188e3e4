"""Ordered classes (ELPV's defect levels 0, 1/3, 2/3, 1; severity grades; star ratings): a loss
that uses the order, and what a model's probabilities say about it.

The order is that of the class names as the pipeline sorts them (ELPV's `defect-0.00` ...
`defect-1.00`); a run trained with `--loss ordinal` prints and records it.

The model stays a softmax classifier over the K classes (so predict, evaluate, every export and
any downstream tool read it as before); only its training loss changes. The K - 1 cumulative
probabilities P(y >= k) = p_k + ... + p_(K-1), k = 1 .. K-1, are read off the softmax, and the
loss is the mean over those cuts of the binary cross-entropy of the event y >= k: the all-threshold
loss of cumulative-link (ordinal) regression. It is a proper scoring rule (the K - 1 cumulative
probabilities determine the K class ones), and unlike cross-entropy it charges a prediction two
levels off more than one level off.

Each cut is also a binary classifier: `ordinal_metrics` scores "P(y >= k) >= 1/2" against the
truth at every cut (on ELPV the cut at `defect-0.67` is the binary task, functional against
defective), beside the mean absolute error in levels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import PipelineError

LOSSES = ("crossentropy", "ordinal")


def check_loss(loss: str, classes: int | None = None) -> None:
    """A loss the pipeline has, and the ordinal one only on three or more classes (with two, the
    one cut is the binary task and the ordinal loss is cross-entropy; None: not known yet)."""
    if loss not in LOSSES:
        raise PipelineError(f"loss {loss!r}: choose from {', '.join(LOSSES)}")
    if loss == "ordinal" and classes is not None and classes < 3:
        raise PipelineError(f"loss ordinal needs three or more ordered classes; these are {classes} (with two, "
                            "it is cross-entropy)")


def describe_order(class_names: list[str]) -> str:
    """The levels as the loss orders them, for the line a run prints before training."""
    shown = class_names if len(class_names) <= 8 else [*class_names[:4], "...", *class_names[-3:]]
    return f"the classes as ordered levels, lowest first (their sorted names): {' < '.join(shown)}"


def cumulative(probabilities: np.ndarray) -> np.ndarray:
    """(n, K) class probabilities -> (n, K - 1) P(y >= k) for k = 1 .. K-1."""
    tail = np.cumsum(probabilities[:, ::-1], axis=1)[:, ::-1]
    return tail[:, 1:]


def ordinal_loss(classes: int) -> Any:
    """The mean binary cross-entropy over the K - 1 cuts, on integer labels and softmax outputs
    (a Keras loss function of backend ops; used to compile only: models are saved without it)."""
    import keras

    ops = keras.ops
    # upper[j, k - 1] = 1 where class j is at or above cut k: P(y >= k) = (p @ upper)[k - 1]
    upper = np.tril(np.ones((classes, classes), np.float32))[:, 1:]

    def ordinal_crossentropy(labels: Any, probabilities: Any) -> Any:
        labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
        at_or_above = ops.take(ops.convert_to_tensor(upper), labels, axis=0)  # (n, K - 1) targets
        tails = ops.clip(ops.matmul(ops.cast(probabilities, "float32"), upper), 1e-7, 1 - 1e-7)
        per_cut = -(at_or_above * ops.log(tails) + (1 - at_or_above) * ops.log(1 - tails))
        return ops.mean(per_cut, axis=-1)

    return ordinal_crossentropy


def ordinal_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """The order's figures for one split: the mean absolute error in levels of the most probable
    class and of the median level (the smallest k with P(y <= k) >= 1/2), and per cut the accuracy
    of P(y >= k) >= 1/2 as a binary classifier of "at or above class k"."""
    labels = np.asarray(labels, np.int64)
    probabilities = np.asarray(probabilities, np.float64)
    if not len(labels):
        return {"order": list(class_names), "images": 0}
    tails = cumulative(probabilities)
    median = (tails >= 0.5).sum(axis=1)  # the tails fall with k: the number of cuts passed
    cuts = {}
    for k in range(1, len(class_names)):
        truth = labels >= k
        said = tails[:, k - 1] >= 0.5
        cuts[f">= {class_names[k]}"] = {"accuracy": float(np.mean(said == truth)),
                                        "share_at_or_above": float(np.mean(truth))}
    return {
        "order": list(class_names),
        "images": int(len(labels)),
        "mean_absolute_error_levels": float(np.mean(np.abs(probabilities.argmax(axis=1) - labels))),
        "median_level_mean_absolute_error_levels": float(np.mean(np.abs(median - labels))),
        "cuts": cuts,
    }
