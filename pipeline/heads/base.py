"""Classifier heads trained on cached feature vectors, behind one small interface.

Heads follow scikit-learn's estimator contract: made with their parameters, `fit(train,
validation)` returns the head itself, having learned its classes (`classes_`, the class names of
the features) and kept its search or training history (`history_`: one row per C tried or per
epoch; the logistic regression's also as `cv_results_`, a mapping of columns); `predict_proba(data)`
gives (n, classes) probabilities; `save(dir)` / `load(dir)` round-trip it with a JSON sidecar that
loading checks (pipeline/artefacts.py). Adding a head is adding a class to HEADS.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from pipeline.artefacts import checked_file, file_sha256, load_arrays, load_keras_model, read_json_object
from pipeline.atomic import one_line
from pipeline.errors import PipelineError, Rules, check_parameters

SIDECAR = "head.json"


class Features(Protocol):
    """What a head fits on and predicts from: labels in memory, and the feature vectors either as
    one array (`matrix`, when `in_memory`) or as (vectors, labels) chunks. The reader's streamed
    splits are one such source; `ArrayFeatures` wraps plain arrays."""

    labels: np.ndarray
    dimension: int
    matrix: np.ndarray | None
    class_names: list[str] | None  # the classes the labels index, where the source knows them

    @property
    def in_memory(self) -> bool: ...

    @property
    def shard_rows(self) -> int: ...

    def __len__(self) -> int: ...

    def chunks(self, rows: int = ..., order: np.ndarray | None = ...) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


class ArrayFeatures:
    """Features from arrays in memory: `ArrayFeatures(x, y)` for a head fitted outside the pipeline."""

    def __init__(self, matrix: np.ndarray, labels: np.ndarray, class_names: list[str] | None = None) -> None:
        self.matrix = np.asarray(matrix, np.float32).reshape(len(matrix), -1)
        self.labels = np.asarray(labels, np.int32)
        self.dimension = self.matrix.shape[1]
        self.class_names = class_names

    in_memory = True
    shard_rows = 4096

    def __len__(self) -> int:
        return len(self.labels)

    def chunks(self, rows: int = 4096, order: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self), rows):
            block = slice(start, start + rows) if order is None else order[start:start + rows]
            yield self.matrix[block], self.labels[block]


def class_weights(labels: np.ndarray, classes: int, mode: str | None) -> np.ndarray:
    """Weight per class: ones, or scikit-learn's "balanced" n / (classes present * count); a class
    absent from the labels keeps weight 1."""
    from sklearn.utils.class_weight import compute_class_weight

    weights = np.ones(classes)
    if mode in (None, "none"):
        return weights
    present = np.unique(labels)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return weights


class Head(ABC):
    kind: ClassVar[str]
    DEFAULTS: ClassVar[dict[str, Any]]
    RULES: ClassVar[Rules] = {}

    def __init__(self, class_names: list[str] | None = None, params: Mapping[str, Any] | None = None) -> None:
        unknown = sorted(set(params or {}) - set(self.DEFAULTS))
        if unknown:
            flag = "--" + unknown[0].replace("_", "-")
            raise PipelineError(f"{flag} does not apply to --head {self.kind}")
        self.class_names = list(class_names or [])  # learned again by fit where the features name them
        self.params = dict(self.DEFAULTS) | {k: v for k, v in (params or {}).items() if v is not None}
        check_parameters(self.params, self.RULES)
        self.n_features_in_: int | None = None
        self.history_: list[dict[str, float]] = []

    @property
    def classes_(self) -> np.ndarray:
        return np.asarray(self.class_names)

    def fit(self, train: Features, validation: Features, progress: bool = True) -> Head:
        """Learn the classes and the dimension from `train`, fit, keep the history; returns self."""
        names = getattr(train, "class_names", None) or self.class_names
        if not names:
            names = [str(i) for i in range(int(np.max(train.labels)) + 1 if len(train.labels) else 0)]
        self.class_names = list(names)
        self.n_features_in_ = train.dimension
        self.history_ = self._fit(train, validation, progress)
        return self

    @abstractmethod
    def _fit(self, train: Features, validation: Features, progress: bool) -> list[dict[str, float]]:
        """Fit on learned classes; return the history rows."""

    @abstractmethod
    def predict_proba(self, data: Features) -> np.ndarray:
        ...

    HISTORY_AXIS: ClassVar[str]  # what one history row stands for: "epochs" or "C"

    @abstractmethod
    def outcome(self) -> dict[str, Any]:
        """What fitting chose, for the run's config (the C, or the epochs run and the best one)."""

    @abstractmethod
    def as_keras(self) -> Any:
        """The fitted head as a Keras model from the feature vector to probabilities, built from
        Keras' own layers, to sit on a backbone (fine-tuning, predict, export)."""

    @abstractmethod
    def _save_model(self, directory: Path) -> dict[str, Any]:
        """Write the model's files; return what the sidecar should record about them."""

    @abstractmethod
    def _load_model(self, directory: Path, sidecar: dict[str, Any]) -> None:
        ...

    @staticmethod
    @abstractmethod
    def versions() -> dict[str, str]:
        ...

    def save(self, directory: Path) -> None:
        sidecar = {
            "kind": self.kind,
            "class_names": self.class_names,
            "input_dimension": self.n_features_in_,
            "params": self.params,
            "versions": self.versions(),
        }
        sidecar |= self._save_model(Path(directory))
        (Path(directory) / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> Head:
        sidecar_path = Path(directory) / SIDECAR
        sidecar = read_json_object(sidecar_path, "train the head again",
                                   missing=f"{sidecar_path} is missing: {directory} is not a complete head run")
        kind = sidecar.get("kind")
        head_class = HEADS.get(kind) if isinstance(kind, str) else None
        if head_class is None or (cls is not Head and head_class is not cls):
            raise PipelineError(f"{sidecar_path} describes an unknown head kind {kind!r}")
        try:
            names, params, dimension = sidecar["class_names"], sidecar["params"], sidecar["input_dimension"]
            if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and isinstance(params, dict)
                    and isinstance(dimension, int) and not isinstance(dimension, bool) and dimension > 0):
                raise TypeError("class_names, params or input_dimension")
            head = head_class(names, params)
            head.n_features_in_ = dimension
            head._load_model(Path(directory), sidecar)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise PipelineError(f"{sidecar_path} is damaged (missing or wrong {one_line(error)}): train the head "
                                "again") from None
        return head

    def _check_input(self, data: Features) -> None:
        if self.n_features_in_ is not None and data.dimension != self.n_features_in_:
            raise PipelineError(
                f"this head takes {self.n_features_in_} features per image, the data have {data.dimension}: "
                "use the feature cache, layers and pooling it was trained with"
            )


# --- scikit-learn logistic regression -------------------------------------------------------------


MAX_GRID = 1000  # C values a search may try: each is one fit


def log_grid(text: str) -> tuple[float, ...]:
    """'1e-6:1e5:45' -> 45 log-spaced values from 1e-6 to 1e5; or a comma-separated list. Every C
    is positive and finite, LOW <= HIGH, and a grid holds 1 to MAX_GRID values."""
    usage = f"--c-grid {text!r}: write LOW:HIGH:COUNT (e.g. 1e-6:1e5:45) or C1,C2,..."
    try:
        if ":" in text:
            low_text, high_text, count_text = text.split(":")
            low, high, count = float(low_text), float(high_text), int(count_text)
            if not 1 <= count <= MAX_GRID:
                raise PipelineError(f"{usage}; COUNT must be 1 to {MAX_GRID}, not {count}")
            values = (low, high)
        else:
            values = tuple(float(v) for v in text.split(","))
            if len(values) > MAX_GRID:
                raise PipelineError(f"{usage}; at most {MAX_GRID} values, not {len(values)}")
    except ValueError:
        raise PipelineError(usage) from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise PipelineError(f"{usage}; every C must be a positive finite number")
    if ":" not in text:
        return values
    low, high = values
    if low > high:
        raise PipelineError(f"{usage}; LOW ({low:g}) is above HIGH ({high:g})")
    return tuple(float(c) for c in np.logspace(np.log10(low), np.log10(high), count))


def _score_one_c(x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray, classes: int, C: float,
                 class_weight: str | None, max_iter: int, tol: float) -> dict[str, float]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression(C=C, class_weight=class_weight, max_iter=max_iter, tol=tol).fit(x, y)
    return _c_row(C, model.score(x, y), model.predict_proba(vx), vy, classes, int(model.n_iter_[0]) < max_iter)


def _c_row(C: float, train_accuracy: float, proba: np.ndarray, labels: np.ndarray, classes: int,
           converged: bool) -> dict[str, float]:
    from sklearn.metrics import log_loss

    return {
        "C": C,
        "train_accuracy": float(train_accuracy),
        "validation_accuracy": float(np.mean(proba.argmax(axis=1) == labels)),
        "validation_loss": float(log_loss(labels, proba, labels=list(range(classes)))),
        "converged": bool(converged),
    }


def _best_row(rows: list[dict[str, float]]) -> dict[str, float]:
    """Highest validation accuracy; ties go to the lower validation loss, then the smaller C."""
    return min(rows, key=lambda r: (-r["validation_accuracy"], r["validation_loss"], r["C"]))


class LogRegHead(Head):
    """StandardScaler + multinomial LogisticRegression (L-BFGS), C chosen on the validation split
    from a log grid (the linear-probe protocol), fits in parallel, then refit at the chosen C."""

    kind = "logreg"
    HISTORY_AXIS = "C"
    DEFAULTS = {
        "c_grid": "1e-6:1e5:45",
        "class_weight": "none",
        "max_iter": 1000,
        "tol": 1e-4,
        "n_jobs": -1,
    }
    RULES = {
        "max_iter": (lambda v: v >= 1, "a positive integer"),
        "tol": (lambda v: 0 < v < math.inf, "a positive number"),
        "n_jobs": (lambda v: v != 0, "a number of parallel fits, or -1 for all cores (not 0)"),
    }
    MODEL_FILE = "head.joblib"
    PORTABLE_FILE = "head.npz"

    def __init__(self, class_names: list[str], params: Mapping[str, Any] | None = None) -> None:
        super().__init__(class_names, params)
        self.grid = log_grid(str(self.params["c_grid"]))
        self.model_ = None
        self.C_: float | None = None

    @staticmethod
    def versions() -> dict[str, str]:
        import sklearn

        return {"scikit-learn": sklearn.__version__, "numpy": np.__version__}

    def _sklearn_class_weight(self) -> str | None:
        return None if self.params["class_weight"] in (None, "none") else self.params["class_weight"]

    def _fit(self, train: Features, validation: Features, progress: bool) -> list[dict[str, float]]:
        if train.in_memory and validation.in_memory:
            rows = self._search_in_memory(train, validation, progress)
        else:
            rows = self._search_streamed(train, validation, progress)
        self.C_ = _best_row(rows)["C"]
        if train.in_memory:
            self._refit_in_memory(train)
        return rows

    @property
    def cv_results_(self) -> dict[str, list]:
        """The C search as scikit-learn's searches keep it: one list per column, one entry per C."""
        return {key: [row[key] for row in self.history_] for key in (self.history_[0] if self.history_ else {})}

    def _search_in_memory(self, train: Features, validation: Features, progress: bool) -> list[dict[str, float]]:
        from joblib import Parallel, delayed
        from sklearn.preprocessing import StandardScaler
        from tqdm import tqdm

        scaler = StandardScaler().fit(train.matrix)
        x = scaler.transform(train.matrix).astype(np.float32)
        vx = scaler.transform(validation.matrix).astype(np.float32)
        # The largest C first: those fits take the most iterations, so the progress bar's estimate
        # of the time left is an upper bound from the start instead of growing at the end.
        jobs = (delayed(_score_one_c)(x, train.labels, vx, validation.labels, len(self.class_names), C,
                                      self._sklearn_class_weight(),
                                      self.params["max_iter"], self.params["tol"]) for C in sorted(self.grid)[::-1])
        results = Parallel(n_jobs=self.params["n_jobs"], return_as="generator")(jobs)
        rows = list(tqdm(results, total=len(self.grid), desc=f"C search ({len(self.grid)} fits, largest C first)",
                         unit="fit", disable=not progress, file=sys.stderr))
        return sorted(rows, key=lambda row: row["C"])

    def _refit_in_memory(self, train: Features) -> None:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model_ = make_pipeline(
                StandardScaler(),
                LogisticRegression(C=self.C_, class_weight=self._sklearn_class_weight(),
                                   max_iter=self.params["max_iter"], tol=self.params["tol"]),
            ).fit(train.matrix, train.labels)

    def _search_streamed(self, train: Features, validation: Features, progress: bool) -> list[dict[str, float]]:
        """The same objective solved by pipeline.heads.linear over shards, C ascending with warm starts."""
        from sklearn.preprocessing import StandardScaler
        from tqdm import tqdm

        from pipeline.heads.linear import fit_logistic

        scaler = StandardScaler()
        for vectors, _ in train.chunks():
            scaler.partial_fit(vectors)
        classes = len(self.class_names)
        weights = class_weights(train.labels, classes, self.params["class_weight"])
        weight_sum = float(weights[train.labels].sum())
        scaled = lambda data: (lambda: ((scaler.transform(v), y) for v, y in data.chunks()))  # noqa: E731
        rows, solutions, solution = [], {}, None
        for C in tqdm(sorted(self.grid), desc="C search (streamed)", unit="fit", disable=not progress,
                      file=sys.stderr):
            solution = fit_logistic(scaled(train), train.dimension, classes, C, weights, weight_sum,
                                    self.params["tol"], self.params["max_iter"], start=solution)
            self.model_ = self._pipeline_from(scaler, solution, C)
            train_accuracy = np.mean(self.predict_proba(train).argmax(axis=1) == train.labels)
            rows.append(_c_row(C, train_accuracy, self.predict_proba(validation), validation.labels, classes,
                               solution.converged))
            solutions[C] = solution
        best = _best_row(rows)["C"]
        self.model_ = self._pipeline_from(scaler, solutions[best], best)
        return rows

    def _pipeline_from(self, scaler: Any, solution: Any, C: float) -> Any:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        model = LogisticRegression(C=C, class_weight=self._sklearn_class_weight(),
                                   max_iter=self.params["max_iter"], tol=self.params["tol"])
        model.classes_ = np.arange(len(self.class_names))
        model.coef_ = solution.coef
        model.intercept_ = solution.intercept
        model.n_features_in_ = solution.coef.shape[1]
        model.n_iter_ = np.array([solution.iterations], dtype=np.int32)
        return make_pipeline(scaler, model)

    def predict_proba(self, data: Features) -> np.ndarray:
        self._check_input(data)
        classes = len(self.class_names)
        parts = [self.model_.predict_proba(vectors) for vectors, _ in data.chunks()]
        return np.concatenate(parts) if parts else np.zeros((0, classes))

    def outcome(self) -> dict[str, Any]:
        return {"chosen_C": self.C_, "C_tried": len(self.history_)}

    def as_keras(self) -> Any:
        """The scaler and the logistic regression as Keras layers computing the same
        probabilities: a fixed (non-trainable) standardisation (x - mean) / scale, then a Dense
        softmax with the regression's coefficients. Two classes (one binomial row w) become the
        softmax over (0, z), since sigmoid(z) = softmax(0, z)[1]. The scaler stays a separate layer
        rather than being folded into the kernel: folded, the kernel's entries span the inverse of
        the features' scales (6e-6 to 3 on ELPV's flattened VGG16 maps), and one epoch of SGD at
        fine-tuning's learning rate took test accuracy from 84% to 67%."""
        import keras

        parameters = self.linear_parameters()
        coef = np.asarray(parameters["coef"], np.float64)
        intercept = np.asarray(parameters["intercept"], np.float64)
        if coef.shape[0] == 1:
            coef = np.concatenate([np.zeros_like(coef), coef])
            intercept = np.concatenate([[0.0], intercept])
        mean, scale = np.asarray(parameters["mean"], np.float64), np.asarray(parameters["scale"], np.float64)
        standardise = keras.layers.Normalization(mean=mean.astype(np.float32),
                                                 variance=(scale ** 2).astype(np.float32),
                                                 name="standardise", dtype="float32")
        dense = keras.layers.Dense(len(self.class_names), activation="softmax", name="logistic_regression",
                                   dtype="float32")
        layers = keras.Sequential([keras.Input((coef.shape[1],)), standardise, dense],
                                  name="logistic_regression_head")
        dense.set_weights([coef.T.astype(np.float32), intercept.astype(np.float32)])
        return layers

    def linear_parameters(self) -> dict[str, np.ndarray]:
        scaler, model = self.model_[0], self.model_[-1]
        return {"mean": scaler.mean_, "scale": scaler.scale_, "coef": model.coef_, "intercept": model.intercept_,
                "classes": model.classes_, "C": np.array(self.C_)}

    def _save_model(self, directory: Path) -> dict[str, Any]:
        """head.npz (plain arrays: what the pipeline loads) and head.joblib (the fitted scikit-learn
        pipeline, for scikit-learn users who trust the run's author; never loaded here)."""
        import joblib

        np.savez(directory / self.PORTABLE_FILE, **self.linear_parameters())
        joblib.dump(self.model_, directory / self.MODEL_FILE)
        return {"C": self.C_, "files": {name: file_sha256(directory / name)
                                              for name in (self.MODEL_FILE, self.PORTABLE_FILE)}}

    def _load_model(self, directory: Path, sidecar: dict[str, Any]) -> None:
        """From the plain arrays of head.npz, read without pickles: a run directory from someone
        else cannot run code here. head.joblib is never opened (a checksum stored beside a pickle
        protects nothing)."""
        from sklearn.preprocessing import StandardScaler

        from pipeline.heads.linear import LinearSolution

        path = checked_file(directory / self.PORTABLE_FILE, sidecar.get("files", {}).get(self.PORTABLE_FILE), SIDECAR,
                            "train the head again")
        self.C_ = sidecar["C"]
        arrays = load_arrays(path, ("mean", "scale", "coef", "intercept"), "train the head again")
        mean, scale, coef, intercept = (arrays[key] for key in ("mean", "scale", "coef", "intercept"))
        classes = len(self.class_names)
        dimension = self.n_features_in_ if self.n_features_in_ is not None else len(mean)
        rows = 1 if classes == 2 else classes
        if (coef.shape != (rows, dimension) or intercept.shape != (rows,) or mean.shape != (dimension,)
                or scale.shape != (dimension,) or coef.dtype.kind != "f" or not np.isfinite(coef).all()):
            raise PipelineError(f"{path} holds arrays of the wrong shape or type for {classes} classes and "
                                f"{dimension} features (damaged?): train the head again")
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_, scaler.var_ = mean, scale, scale ** 2
        scaler.n_features_in_ = dimension
        self.model_ = self._pipeline_from(scaler, LinearSolution(coef, intercept, 0, True), self.C_)


# --- Keras dense head -----------------------------------------------------------------------------


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
    """Dense(units) -> [BatchNorm] -> ReLU -> Dropout -> Dense(classes, softmax), the seeds' head,
    with early stopping on validation loss, the weights of the epoch with the best validation
    accuracy kept (what the run reports; ties: lower loss), and learning-rate decay; the
    learning rate of every epoch lands in the history (ReduceLROnPlateau logs it)."""

    kind = "dense"
    HISTORY_AXIS = "epochs"
    DEFAULTS = {
        "units": 256,
        "batch_norm": False,
        "dropout": 0.5,
        "optimizer": "rmsprop",
        "lr": 1e-3,
        "epochs": 50,
        "batch_size": 32,
        "patience": 8,
        "class_weight": "none",
        "seed": 0,
    }
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

    def __init__(self, class_names: list[str], params: Mapping[str, Any] | None = None) -> None:
        super().__init__(class_names, params)
        if self.params["optimizer"] not in self.OPTIMIZERS:
            choices = ", ".join(self.OPTIMIZERS)
            raise PipelineError(f"unknown optimizer {self.params['optimizer']!r}: choose from {choices}")
        self.model_ = None

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
        outputs = keras.layers.Dense(len(self.class_names), activation="softmax", name="probabilities",
                                     dtype="float32")(x)
        return keras.Model(inputs, outputs, name="dense_head")

    def optimizer(self) -> Any:
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
        import keras

        from pipeline.heads.fitting import KeepBest, fit, fit_verbosity, history_rows

        self.model_ = self.build(*training_statistics(train))
        self.model_.compile(optimizer=self.optimizer(), loss="sparse_categorical_crossentropy",
                           metrics=["accuracy"])
        weights = class_weights(train.labels, len(self.class_names), self.params["class_weight"])
        patience = int(self.params["patience"])
        callbacks = [
            KeepBest(),  # the epoch of the best validation accuracy, what the run reports
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience),
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=max(1, patience // 3),
                                              min_lr=1e-6),
        ]
        verbose = fit_verbosity(progress)
        common = dict(epochs=int(self.params["epochs"]), callbacks=callbacks, verbose=verbose,
                      class_weight=None if self.params["class_weight"] == "none" else dict(enumerate(weights)))
        if train.in_memory and validation.in_memory:
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

    def predict_proba(self, data: Features) -> np.ndarray:
        self._check_input(data)
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


HEADS: dict[str, type[Head]] = {head.kind: head for head in (DenseHead, LogRegHead)}


def head_parameters() -> list[str]:
    """Every parameter some head accepts from the command line (a flag --name-with-dashes)."""
    return sorted({name for head in HEADS.values() for name in head.DEFAULTS} - {"seed", "tol"})


def make_head(kind: str, class_names: list[str] | None = None, params: Mapping[str, Any] | None = None) -> Head:
    if kind not in HEADS:
        raise PipelineError(f"unknown head {kind!r}: choose from {', '.join(sorted(HEADS))}")
    return HEADS[kind](class_names, params)
