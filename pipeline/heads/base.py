"""Classifier heads trained on cached feature vectors, behind one small interface.

Heads follow scikit-learn's estimator contract: made with their parameters, `fit(train,
validation)` returns the head itself, having learned its classes (`classes_`, the class names of
the features) and kept its search or training history (`history_`: one row per C tried or per
epoch; the logistic regression's also as `cv_results_`, a mapping of columns); `predict_proba(data)`
gives (n, classes) probabilities; `save(dir)` / `load(dir)` round-trip it with a JSON sidecar that
loading checks (pipeline/artefacts.py). Adding a head is adding a subclass with its own `kind`
(it registers itself in HEADS) and importing it in pipeline/heads/__init__.py.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

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


HEADS: dict[str, type[Head]] = {}  # kind -> class; every concrete head registers itself


class Head(ABC):
    kind: ClassVar[str]
    DEFAULTS: ClassVar[dict[str, Any]]
    RULES: ClassVar[Rules] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            HEADS[cls.kind] = cls

    def __init__(self, class_names: list[str] | None = None, params: Mapping[str, Any] | None = None) -> None:
        unknown = sorted(set(params or {}) - set(self.DEFAULTS))
        if unknown:
            flag = "--" + unknown[0].replace("_", "-")
            raise PipelineError(f"{flag} does not apply to --head {self.kind}")
        self.class_names = list(class_names or [])  # learned again by fit where the features name them
        self.params = dict(self.DEFAULTS) | {k: v for k, v in (params or {}).items() if v is not None}
        check_parameters(self.params, self.RULES)
        self.n_features_in_: int | None = None
        # the caches it reads, in input order ({fingerprint_digest, view} each): set by train-head
        self.input_parts_: list[dict[str, Any]] | None = None
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
        if self.input_parts_:
            sidecar["input_parts"] = self.input_parts_
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
            head.input_parts_ = sidecar.get("input_parts")  # None for heads saved before it was recorded
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
    return sorted({name for head in HEADS.values() for name in head.DEFAULTS} - {"seed", "tol"})


def make_head(kind: str, class_names: list[str] | None = None, params: Mapping[str, Any] | None = None) -> Head:
    if kind not in HEADS:
        raise PipelineError(f"unknown head {kind!r}: choose from {', '.join(sorted(HEADS))}")
    return HEADS[kind](class_names, params)
