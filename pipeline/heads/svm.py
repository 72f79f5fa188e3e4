"""The support-vector head: standardised features, a support-vector machine per class (one against
the rest; one machine for two classes), C and the kernel's width chosen on validation, and
probabilities by Platt scaling fitted on validation.

The fitted head is plain arrays (head.npz): the scaler, the support vectors, their dual
coefficients and intercepts, the kernel's gamma and each machine's Platt parameters. Predicting is
those arrays in NumPy (`svm_probabilities`), and the same arithmetic in Keras' own layers
(`as_keras`: no custom layer, no Lambda), so predict, every export and the agreement check compute
one thing. The RBF kernel is exp(-gamma |z - v|^2) with |z - v|^2 = |z|^2 - 2 z.v + |v|^2.

Scale: scikit-learn's SVC trains in time growing about with the square of the training images, so
`kernel="auto"` uses the RBF kernel up to `rbf_limit` training images and a linear machine
(LinearSVC, stored as one "support vector" per machine: its weights) above; asking for `rbf` above
the limit is refused in one line that suggests the linear kernel. The limit, 5,000, is where the
default search (12 RBF settings) stays near ten minutes on two cores: one setting of a 4-class
machine on 1,280 features took 10.5 s at 2,500 images, 51 s at 5,000 and 161 s (3.5 GB) at 10,000,
where the linear machine took 5.8 s and 29 s at 100,000 (bench/heads.py --suite scale,
bench/RESULTS.md).
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artefacts import checked_file, file_sha256, load_arrays
from pipeline.errors import PipelineError
from pipeline.heads.base import SIDECAR, Features, Head
from pipeline.heads.logreg import _best_row, _c_row, log_grid

ARRAYS = ("mean", "scale", "vectors", "dual", "intercept", "gamma", "platt_a", "platt_b")


def svm_decisions(z: np.ndarray, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Each machine's decision value (before Platt scaling) for standardised rows `z`, in float32
    as the Keras layers compute it."""
    z = np.asarray(z, np.float32)
    vectors, gamma = arrays["vectors"].astype(np.float32), float(arrays["gamma"])
    dot = z @ vectors.T
    if gamma > 0:
        squared = (z * z).sum(axis=1, keepdims=True) - 2 * dot + (vectors * vectors).sum(axis=1)
        kernel = np.exp(-gamma * squared)
    else:
        kernel = dot
    return kernel @ arrays["dual"].astype(np.float32).T + arrays["intercept"].astype(np.float32)


def svm_probabilities(z: np.ndarray, arrays: dict[str, np.ndarray], classes: int) -> np.ndarray:
    """Probabilities of standardised rows `z` from the head's arrays."""
    score = arrays["platt_a"].astype(np.float32) * svm_decisions(z, arrays) + arrays["platt_b"].astype(np.float32)
    if classes == 2:
        positive = 1 / (1 + np.exp(-score[:, 0].astype(np.float64)))
        return np.stack([1 - positive, positive], axis=1)
    each = 1 / (1 + np.exp(-score.astype(np.float64)))
    return each / np.maximum(each.sum(axis=1, keepdims=True), 1e-300)


def _platt(decision: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Platt's sigmoid p = 1 / (1 + exp(-(a d + b))) fitted to one machine's validation decisions."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(target)) < 2:  # validation holds one side only: the identity slope, no offset
        return 1.0, 0.0
    model = LogisticRegression(C=1e4, max_iter=1000).fit(decision.reshape(-1, 1), target)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


KERNELS = ("auto", "rbf", "linear")  # --kernel; auto: rbf up to rbf_limit training images, linear above


class SVMHead(Head):
    """Standardised features -> one support-vector machine per class (RBF or linear) -> Platt
    probabilities. C and gamma (multiples of 1 / features, scikit-learn's "scale" on standardised
    data) are chosen on validation, by accuracy, ties by log loss."""

    kind = "svm"
    HISTORY_AXIS = "C"
    RULES = {
        "kernel": (lambda v: v in KERNELS, "auto, rbf or linear"),
        "rbf_limit": (lambda v: v >= 1, "a positive number of training images"),
    }
    MODEL_FILE = "head.npz"

    def __init__(self, *, kernel: str = "auto", c_grid: str = "1e-1:1e2:4", gamma_grid: str = "0.25,1,4",
                 class_weight: str = "none", rbf_limit: int = 5_000, validation_fraction: float = 0.2) -> None:
        self.kernel = kernel  # auto: rbf up to rbf_limit training images, linear above
        self.c_grid = c_grid
        self.gamma_grid = gamma_grid  # multiples of 1 / features
        self.class_weight = class_weight
        self.rbf_limit = rbf_limit
        self.validation_fraction = validation_fraction

    def _check_more(self) -> None:
        log_grid(str(self.c_grid))
        self._gammas()

    def _gammas(self) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in str(self.gamma_grid).split(","))
        except ValueError:
            values = ()
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            raise PipelineError(f"--gamma-grid {self.gamma_grid!r}: positive multiples of 1/features, G1,G2,...")
        return values

    @staticmethod
    def versions() -> dict[str, str]:
        import sklearn

        return {"scikit-learn": sklearn.__version__, "numpy": np.__version__}

    def chosen_kernel(self, images: int) -> str:
        if self.kernel == "rbf" and images > self.rbf_limit:
            raise PipelineError(f"--kernel rbf on {images} training images: an RBF support-vector machine trains in "
                                f"time growing with the square of the images (above --rbf-limit {self.rbf_limit}); "
                                "use --kernel linear (or auto, which switches there)")
        if self.kernel == "auto":
            return "rbf" if images <= self.rbf_limit else "linear"
        return self.kernel

    def _fit(self, train: Features, validation: Features, progress: bool) -> list[dict[str, float]]:
        from sklearn.preprocessing import StandardScaler
        from tqdm import tqdm

        if not (train.in_memory and validation.in_memory):
            raise PipelineError("the svm head holds the training features in memory, and these are streamed: pool "
                                "them (extract --pooling avg), or raise --memory-budget")
        scaler = StandardScaler().fit(train.matrix)
        x = scaler.transform(train.matrix).astype(np.float32)
        vx = scaler.transform(validation.matrix).astype(np.float32)
        kernel = self.chosen_kernel(len(x))
        if progress and self.kernel == "auto" and kernel == "linear":
            print(f"svm: {len(x)} training images, above --rbf-limit {self.rbf_limit}: the linear kernel",
                  file=sys.stderr, flush=True)
        gammas = [g / x.shape[1] for g in self._gammas()] if kernel == "rbf" else [0.0]
        settings = [(C, gamma) for C in sorted(log_grid(str(self.c_grid))) for gamma in gammas]
        rows, solutions = [], {}
        for C, gamma in tqdm(settings, desc=f"svm search ({kernel}, {len(settings)} fits)", unit="fit",
                             disable=not progress, file=sys.stderr):
            arrays = self._machines(x, train.labels, C, gamma, kernel)
            arrays |= {"mean": scaler.mean_, "scale": scaler.scale_}
            decision = svm_decisions(vx, arrays)
            targets = validation.labels == 1 if len(self.class_names) == 2 else None
            a, b = zip(*[_platt(decision[:, j], targets if targets is not None else validation.labels == j)
                         for j in range(decision.shape[1])])
            arrays |= {"platt_a": np.asarray(a), "platt_b": np.asarray(b)}
            proba = svm_probabilities(vx, arrays, len(self.class_names))
            train_accuracy = float(np.mean(svm_probabilities(x, arrays, len(self.class_names)).argmax(1)
                                           == train.labels))
            row = _c_row(C, train_accuracy, proba, validation.labels, len(self.class_names), True)
            row["gamma"] = gamma
            rows.append(row)
            solutions[(C, gamma)] = arrays
        best = _best_row(rows)
        self.C_, self.gamma_, self.kernel_ = best["C"], best["gamma"], kernel
        self.arrays_ = solutions[(best["C"], best["gamma"])]
        return rows

    def _machines(self, x: np.ndarray, labels: np.ndarray, C: float, gamma: float, kernel: str) -> dict[str, Any]:  # noqa: N803
        """One machine (two classes) or one per class against the rest, as vectors, dual and intercept."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.svm import SVC, LinearSVC

        weight = None if self.class_weight in (None, "none") else self.class_weight
        sides = [labels == 1] if len(self.class_names) == 2 else [labels == j for j in range(len(self.class_names))]
        vectors, duals, intercepts = [], [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for side in sides:
                if kernel == "linear":
                    # the dual solver up to 4 images per feature, the primal one above. One machine, C 1,
                    # 1,280 standardised features (bench/heads.py's data, 2-core EPYC): dual 0.7 s and primal
                    # 14 s at 2,500 images; 6.6 and 10.7 s at 5,000; 158 (its iteration limit) and 1.6 s
                    # at 20,000. scikit-learn's "auto" switches at 1 image per feature.
                    dual = len(x) <= 4 * x.shape[1]
                    machine = LinearSVC(C=C, class_weight=weight, dual=dual, max_iter=5000 if dual else 1000)
                    machine.fit(x, side)
                    vectors.append(machine.coef_.astype(np.float32))
                    duals.append(np.ones((1, 1)))
                else:
                    machine = SVC(C=C, kernel="rbf", gamma=gamma, class_weight=weight).fit(x, side)
                    vectors.append(machine.support_vectors_.astype(np.float32))
                    duals.append(machine.dual_coef_)
                intercepts.append(float(np.ravel(machine.intercept_)[0]))
        total = sum(len(v) for v in vectors)
        dual = np.zeros((len(sides), total))
        start = 0
        for j, (v, d) in enumerate(zip(vectors, duals)):
            dual[j, start:start + len(v)] = np.ravel(d)
            start += len(v)
        return {"vectors": np.concatenate(vectors), "dual": dual, "intercept": np.asarray(intercepts),
                "gamma": np.asarray(gamma if kernel == "rbf" else 0.0)}

    def _proba(self, data: Features) -> np.ndarray:
        arrays, classes = self.arrays_, len(self.class_names)
        parts = [svm_probabilities((vectors - arrays["mean"]) / arrays["scale"], arrays, classes)
                 for vectors, _ in data.chunks()]
        return np.concatenate(parts) if parts else np.zeros((0, classes))

    def outcome(self) -> dict[str, Any]:
        return {"chosen_C": self.C_, "chosen_gamma": self.gamma_, "kernel_used": self.kernel_,
                "support_vectors": int(len(self.arrays_["vectors"])), "fits": len(self.history_)}

    def as_keras(self) -> Any:
        """The same arithmetic as svm_probabilities in Keras' own layers."""
        import keras

        arrays, classes = self.arrays_, len(self.class_names)
        vectors = arrays["vectors"].astype(np.float32)
        gamma = float(arrays["gamma"])
        machines = len(arrays["intercept"])
        inputs = keras.Input((vectors.shape[1],), name="features")
        z = keras.layers.Normalization(mean=arrays["mean"].astype(np.float32),
                                       variance=(arrays["scale"] ** 2).astype(np.float32), name="standardise",
                                       dtype="float32")(inputs)
        if gamma > 0:
            cross = keras.layers.Dense(len(vectors), name="kernel_cross", dtype="float32")
            kernel_input = cross(z)  # 2 gamma z.v - gamma |v|^2
            cross.set_weights([(2 * gamma * vectors.T).astype(np.float32),
                               (-gamma * (vectors * vectors).sum(1)).astype(np.float32)])
            squares = keras.layers.Multiply(name="squares", dtype="float32")([z, z])
            norm = keras.layers.Dense(1, use_bias=False, name="kernel_norm", dtype="float32")
            length = norm(squares)  # -gamma |z|^2
            norm.set_weights([np.full((vectors.shape[1], 1), -gamma, np.float32)])
            kernel = keras.layers.Activation("exponential", name="rbf_kernel", dtype="float32")(
                keras.layers.Add(name="minus_gamma_distance", dtype="float32")([kernel_input, length]))
        else:
            linear = keras.layers.Dense(len(vectors), use_bias=False, name="linear_kernel", dtype="float32")
            kernel = linear(z)
            linear.set_weights([vectors.T.astype(np.float32)])
        decide = keras.layers.Dense(machines, name="decision", dtype="float32")
        decision = decide(kernel)
        decide.set_weights([arrays["dual"].T.astype(np.float32), arrays["intercept"].astype(np.float32)])
        a, b = arrays["platt_a"].astype(np.float32), arrays["platt_b"].astype(np.float32)
        if classes == 2:  # softmax(0, s) = (1 - sigmoid(s), sigmoid(s))
            platt = keras.layers.Dense(2, name="platt", dtype="float32")
            scores = platt(decision)
            platt.set_weights([np.array([[0.0, a[0]]], np.float32), np.array([0.0, b[0]], np.float32)])
        else:  # softmax(log sigmoid(s)) = sigmoid(s) / sum: log sigmoid(s) = -softplus(-s)
            negative = keras.layers.Dense(classes, name="platt_negated", dtype="float32")
            softplus = keras.layers.Activation("softplus", name="softplus", dtype="float32")(negative(decision))
            negative.set_weights([-np.diag(a).astype(np.float32), -b])
            flip = keras.layers.Dense(classes, use_bias=False, name="log_sigmoid", dtype="float32")
            scores = flip(softplus)
            flip.set_weights([-np.eye(classes, dtype=np.float32)])
        outputs = keras.layers.Activation("softmax", name="probabilities", dtype="float32")(scores)
        return keras.Model(inputs, outputs, name="svm_head")

    def _save_model(self, directory: Path) -> dict[str, Any]:
        np.savez(directory / self.MODEL_FILE, **{name: self.arrays_[name] for name in ARRAYS})
        return {"C": self.C_, "gamma": self.gamma_, "kernel_used": self.kernel_,
                "files": {self.MODEL_FILE: file_sha256(directory / self.MODEL_FILE)}}

    def _load_model(self, directory: Path, sidecar: dict[str, Any]) -> None:
        path = checked_file(directory / self.MODEL_FILE, sidecar.get("files", {}).get(self.MODEL_FILE), SIDECAR,
                            "train the head again")
        arrays = load_arrays(path, ARRAYS, "train the head again")
        classes, dimension = len(self.class_names), self.n_features_in_
        machines = 1 if classes == 2 else classes
        vectors = arrays["vectors"]
        if (vectors.ndim != 2 or vectors.shape[1] != dimension or arrays["dual"].shape != (machines, len(vectors))
                or arrays["intercept"].shape != (machines,) or arrays["mean"].shape != (dimension,)
                or arrays["scale"].shape != (dimension,) or arrays["platt_a"].shape != (machines,)
                or arrays["platt_b"].shape != (machines,) or arrays["gamma"].shape != ()):
            raise PipelineError(f"{path} holds arrays of the wrong shapes for {classes} classes and {dimension} "
                                "features (damaged?): train the head again")
        if not all(np.isfinite(arrays[name]).all() for name in ARRAYS) or not (arrays["scale"] > 0).all():
            raise PipelineError(f"{path} holds values that are not finite or a scale of zero (damaged?): train the "
                                "head again")
        self.arrays_ = arrays
        self.C_, self.gamma_, self.kernel_ = sidecar.get("C"), sidecar.get("gamma"), sidecar.get("kernel_used")
