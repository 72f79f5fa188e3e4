"""Classifier heads trained on cached feature vectors, behind one small interface.

Every head is a scikit-learn estimator: its parameters are keyword arguments with defaults in
`__init__` (and nothing else: `get_params`, `set_params`, `clone`, `Pipeline`, `GridSearchCV` and
`cross_val_score` work), `fit(X, y)` takes arrays and learns the classes (`classes_`, whatever
labels `y` holds), `predict`, `predict_proba` and `score` answer for arrays. A head's own search
(the logistic regression's C, the dense head's early stopping) needs a validation split: `fit(X,
y)` holds out `validation_fraction` of X (stratified) for it, or takes `validation=(X_val, y_val)`.

The pipeline's fitting is a thin layer over the same code: `fit(train, validation)` on Features
(the cache's splits, in memory or streamed by shard), the class names taken from the cache. Either
way the head keeps its search or training history (`history_`: one row per C tried or per epoch;
the logistic regression's also as `cv_results_`); `save(dir)` / `load(dir)` round-trip it with a
JSON sidecar that loading checks (pipeline/artefacts.py), without executing anything from the
files. Adding a head is adding a subclass with its own `kind` (it registers itself in HEADS) and
importing it in pipeline/heads/__init__.py.
"""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from pipeline.artefacts import read_json_object
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

    def __init__(self, matrix: np.ndarray, labels: np.ndarray, class_names: list[str] | None = None,
                 targets: np.ndarray | None = None, multilabel: bool = False) -> None:
        """`targets`: soft targets (class probabilities an image), or with `multilabel` 0/1 a label."""
        self.matrix = np.asarray(matrix, np.float32).reshape(len(matrix), -1)
        self.labels = np.asarray(labels, np.int32)
        self.dimension = self.matrix.shape[1]
        self.class_names = class_names
        self.targets = None if targets is None else np.asarray(targets, np.float64)
        self.multilabel = multilabel

    in_memory = True
    shard_rows = 4096

    def __len__(self) -> int:
        return len(self.labels)

    def chunks(self, rows: int = 4096, order: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self), rows):
            block = slice(start, start + rows) if order is None else order[start:start + rows]
            yield self.matrix[block], self.labels[block]


CLASS_WEIGHTS = ("none", "balanced")  # --class-weight: scikit-learn's "balanced", or every class weighing 1


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


COMMON_RULES: Rules = {
    "validation_fraction": (lambda v: 0 <= v < 1, "a fraction from 0 up to, not including, 1 (0: choose on the "
                                                  "training data itself)"),
}
HEADS: dict[str, type[Head]] = {}  # kind -> class; every concrete head registers itself


def is_features(data: Any) -> bool:
    """A Features source (the cache's splits, ArrayFeatures), as opposed to a plain array."""
    return all(hasattr(data, name) for name in ("chunks", "labels", "dimension"))


class Head(ClassifierMixin, BaseEstimator, ABC):
    kind: ClassVar[str]
    DEFAULTS: ClassVar[dict[str, Any]] = {}  # from __init__'s signature: every parameter and its default
    RULES: ClassVar[Rules] = {}
    ARRAY_ONLY: ClassVar[frozenset[str]] = frozenset({"validation_fraction"})  # no train-head flag: the cache splits
    KERAS_FORM: ClassVar[bool] = True  # as_keras() builds it from Keras' layers (False: predicted in NumPy, ONNX only)
    SOFT_TARGETS: ClassVar[bool] = False  # trains on soft targets (Features.targets: class probabilities an image)
    MULTILABEL: ClassVar[bool] = False  # trains one sigmoid a label on multi-label targets (Features.multilabel)
    multilabel_: bool = False  # fitted on several labels an image: predict_proba gives one probability a label
    thresholds_: list[float] | None = None  # multi-label: each label's decision threshold

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(cls.__init__).parameters
                            .items() if name != "self"}
        if "kind" in cls.__dict__:
            HEADS[cls.kind] = cls

    @property
    def params(self) -> dict[str, Any]:
        """Every parameter's value, as the run records it."""
        return {name: getattr(self, name) for name in self.DEFAULTS}

    @property
    def class_names(self) -> list[str]:
        """The classes' names, in output order: the cache's, or the labels of `fit(X, y)` as text."""
        return list(getattr(self, "class_names_", []))

    @class_names.setter
    def class_names(self, names: list[str]) -> None:
        self.class_names_ = list(names)

    def check_params(self) -> None:
        """Refuse the first parameter outside its rule in one line (PipelineError), as the command line says it."""
        check_parameters(self.params, self.RULES | COMMON_RULES)
        self._check_more()

    def _check_more(self) -> None:
        """A head's checks beyond its RULES (choices, combinations)."""

    def fit(self, X: Any, y: Any = None, validation: Any = None, progress: bool = False) -> Head:  # noqa: N803
        """Learn the classes and the dimension, fit, keep the history; returns self. `X` and `y`:
        arrays (scikit-learn's way; `validation=(X_val, y_val)` or a held-out part of X chooses
        the head's settings), or `fit(train, validation)` on Features (the pipeline's way)."""
        if not is_features(X):
            return self._fit_arrays(X, y, validation, progress)
        validation = y if is_features(y) else validation
        if not is_features(validation):
            raise PipelineError("fit(train, validation): both Features (the cache's splits, or ArrayFeatures)")
        self.check_params()
        self.multilabel_ = bool(getattr(X, "multilabel", False))
        if self.multilabel_ and not self.MULTILABEL:
            heads = " or ".join(sorted(kind for kind, head in HEADS.items() if head.MULTILABEL))
            raise PipelineError(f"the {self.kind} head gives one class an image, not several labels: choose "
                                f"--head {heads} for a multi-label table")
        if getattr(X, "targets", None) is not None and not self.multilabel_ and not self.SOFT_TARGETS:
            soft = ", ".join(sorted(kind for kind, head in HEADS.items() if head.SOFT_TARGETS))
            raise PipelineError(f"the {self.kind} head trains on classes, not on soft targets (--target-column): "
                                f"choose --head {soft.replace(', ', ' or ')}, or give classes (--label-column)")
        names = getattr(X, "class_names", None) or self.class_names
        if not names:
            names = [str(i) for i in range(int(np.max(X.labels)) + 1 if len(X.labels) else 0)]
        self.class_names = list(names)
        self.classes_ = np.asarray(self.class_names)
        self.n_features_in_ = X.dimension
        self.history_ = self._fit(X, validation, progress)
        if self.multilabel_:  # each label's threshold, chosen on validation
            from pipeline.heads.thresholds import choose_thresholds

            self.thresholds_ = choose_thresholds(self._proba(validation), validation.targets)
        return self

    def _fit_arrays(self, X: Any, y: Any, validation: Any, progress: bool) -> Head:  # noqa: N803
        from sklearn.model_selection import train_test_split
        from sklearn.utils.multiclass import check_classification_targets
        from sklearn.utils.validation import validate_data

        self.check_params()
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_, encoded = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes in the data, but the data "
                             f"contain only one class: {self.classes_[0]!r}")
        self.class_names = [str(c) for c in self.classes_]
        if validation is not None:
            vx, vy = validation
            vx = validate_data(self, vx, reset=False, dtype=[np.float64, np.float32])
            vy = np.asarray(vy)
            if not np.isin(vy, self.classes_).all():
                raise ValueError("validation labels outside the classes of y")
            train_rows, train_labels = X, encoded
            held_rows, held_labels = vx, np.searchsorted(self.classes_, vy)
        else:
            fraction = float(self.validation_fraction)
            held = round(len(encoded) * fraction)
            counts = np.bincount(encoded)
            if 0 < fraction < 1 and counts.min() >= 2 and held >= len(counts) and len(encoded) - held >= len(counts):
                kept, out = train_test_split(np.arange(len(encoded)), test_size=held, stratify=encoded,
                                             random_state=0)
            else:  # too few to hold any out: the settings are chosen on the training data itself
                kept = out = np.arange(len(encoded))
            train_rows, train_labels, held_rows, held_labels = X[kept], encoded[kept], X[out], encoded[out]
        train = ArrayFeatures(train_rows, train_labels, self.class_names)
        held_out = ArrayFeatures(held_rows, held_labels, self.class_names)
        self.history_ = self._fit(train, held_out, progress)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:  # noqa: N803
        """(n, classes) probabilities, columns in the order of `classes_`: of Features, or of an array."""
        if is_features(X):
            self._check_input(X)
            return self._proba(X)
        from sklearn.utils.validation import check_is_fitted, validate_data

        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return self._proba(ArrayFeatures(X, np.zeros(len(X), np.int32), self.class_names))

    def predict(self, X: Any) -> np.ndarray:  # noqa: N803
        """The most likely class of each row, as `classes_` names it."""
        proba = self.predict_proba(X)  # first: unfitted, it says so (NotFittedError)
        return np.asarray(self.classes_)[np.argmax(proba, axis=1)]

    @abstractmethod
    def _fit(self, train: Features, validation: Features, progress: bool) -> list[dict[str, float]]:
        """Fit on learned classes; return the history rows."""

    @abstractmethod
    def _proba(self, data: Features) -> np.ndarray:
        """(n, classes) probabilities of Features the head was fitted for."""

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
        if getattr(self, "input_parts_", None):
            sidecar["input_parts"] = self.input_parts_
        if self.multilabel_:
            sidecar |= {"multilabel": True, "thresholds": self.thresholds_}
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
            head = head_class(**{key: value for key, value in params.items() if key in head_class.DEFAULTS})
            head.class_names = names
            head.classes_ = np.asarray(names)
            head.n_features_in_ = dimension
            head.input_parts_ = sidecar.get("input_parts")  # None for heads saved before it was recorded
            head.multilabel_ = sidecar.get("multilabel", False) is True
            if head.multilabel_:
                head.thresholds_ = [float(t) for t in sidecar["thresholds"]]
                if len(head.thresholds_) != len(names) or not all(0 <= t <= 1 for t in head.thresholds_):
                    raise ValueError("thresholds")
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


def head_parameters() -> list[str]:
    """Every parameter some head accepts from the command line (a flag --name-with-dashes)."""
    return sorted({name for head in HEADS.values() for name in head.DEFAULTS if name not in head.ARRAY_ONLY}
                  - {"seed", "tol"})


def make_head(kind: str, class_names: list[str] | None = None, params: Mapping[str, Any] | None = None) -> Head:
    """The pipeline's way to make a head: by kind, its parameters checked at once (a flag that does
    not apply, or a value outside its rule, is one line before any work)."""
    if kind not in HEADS:
        raise PipelineError(f"unknown head {kind!r}: choose from {', '.join(sorted(HEADS))}")
    head_class = HEADS[kind]
    unknown = sorted(set(params or {}) - set(head_class.DEFAULTS))
    if unknown:
        flag = "--" + unknown[0].replace("_", "-")
        raise PipelineError(f"{flag} does not apply to --head {kind}")
    head = head_class(**{key: value for key, value in (params or {}).items() if value is not None})
    head.class_names = list(class_names or [])
    head.check_params()
    return head
