"""The generic head: any scikit-learn classifier, named by its dotted path, with JSON parameters
(`train-head --head sklearn --estimator sklearn.ensemble.HistGradientBoostingClassifier --params
'{"max_iter": 200}'`).

Safety comes first, because both the name and the saved file could come from someone else:

- a name outside `sklearn.` is never imported (importing runs the module's code) unless the
  user trusts its top-level module (`--trust-module lightgbm`), and then the run says so;
- the fitted estimator is saved with skops.io (a format made for safe loading: no pickle), and
  loading refuses, in one line and before anything is built, a file holding any type outside
  scikit-learn and NumPy (and the modules named in BOTTLENECK_PIPELINE_TRUST, a comma-separated
  list the person loading sets: a file cannot trust itself). The file's sha256 is checked first.

The estimator is fitted on the training split; validation scores it (no search of its own: wrap
it in GridSearchCV for one). Classifiers without `predict_proba` (RidgeClassifier, LinearSVC) get
probabilities by sigmoid calibration of their decision function, out of fold on the training split
(scikit-learn's CalibratedClassifierCV, ensemble=False: one estimator fitted on all of it).

There is no Keras form: predict and evaluate run the backbone in Keras and this head in NumPy
(pipeline/runs/classifier.py, FeaturesThenHead), and the one export is ONNX, the head converted by
skl2onnx and joined to the backbone's graph (pipeline/serving/formats/onnx.py).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artefacts import checked_file, file_sha256
from pipeline.atomic import one_line
from pipeline.errors import PipelineError, install_hint
from pipeline.heads.base import SIDECAR, Features, Head

TRUSTED = ("sklearn", "numpy")  # the top-level modules whose types a saved head may hold
TRUST_VARIABLE = "BOTTLENECK_PIPELINE_TRUST"  # more modules, trusted by the person loading a head
MODEL_FILE = "head.skops"


def _module_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _top_module(name: str) -> str:
    return name.split(".", 1)[0]


def estimator_class(name: str, trusted: list[str]) -> type:
    """The class a dotted name names, imported only where its top-level module is trusted; one
    line for a name that is not a class or not a classifier."""
    from sklearn.base import is_classifier

    if not isinstance(name, str) or "." not in name or not all(part.isidentifier() for part in name.split(".")):
        raise PipelineError(f"--estimator {name!r}: a dotted class name, e.g. "
                            "sklearn.ensemble.HistGradientBoostingClassifier")
    module_name, class_name = name.rsplit(".", 1)
    top = _top_module(name)
    if top not in (*TRUSTED[:1], *trusted):
        raise PipelineError(f"--estimator {name}: {top} is not scikit-learn, and importing it runs its code; trust "
                            f"it explicitly with --trust-module {top}")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise PipelineError(f"--estimator {name}: no module {module_name} (is the name spelled as scikit-learn's "
                            "documentation gives it?)") from None
    found = getattr(module, class_name, None)
    if not isinstance(found, type):
        raise PipelineError(f"--estimator {name}: {module_name} has no class {class_name}")
    try:
        is_one = is_classifier(found())
    except Exception:  # noqa: BLE001 - a class that cannot be made without arguments is no estimator here
        is_one = False
    if not is_one:
        raise PipelineError(f"--estimator {name} is not a scikit-learn classifier (regressors, transformers and "
                            "clusterers cannot be heads)")
    return found


def estimator_parameters(value: Any) -> dict[str, Any]:
    """--params as a dict: JSON text (the command line) or a mapping (Python)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise PipelineError(f"--params {value!r} is not JSON ({error.msg} at character {error.pos}): e.g. "
                                "'{\"max_iter\": 200}'") from None
    if not isinstance(value, dict):
        raise PipelineError(f"--params {json.dumps(value)}: a JSON object of the estimator's parameters, e.g. "
                            "'{\"max_iter\": 200}'")
    return dict(value)


class EstimatorHead(Head):
    """Any scikit-learn classifier on the cached features (`estimator`, `estimator_params`)."""

    kind = "sklearn"
    HISTORY_AXIS = "fit"
    KERAS_FORM = False

    def __init__(self, *, estimator: str = "sklearn.linear_model.LogisticRegression",
                 estimator_params: Any = None, trust_module: str | None = None, seed: int = 0,
                 validation_fraction: float = 0.2) -> None:
        self.estimator = estimator  # a dotted class name
        self.estimator_params = estimator_params  # a dict, or JSON text of one
        self.trust_module = trust_module  # top-level modules outside scikit-learn to import, comma-separated
        self.seed = seed  # the estimator's random_state where it has one and --params leaves it out
        self.validation_fraction = validation_fraction

    def _check_more(self) -> None:
        self._unfitted()

    def _unfitted(self) -> Any:
        """The estimator made from its name and parameters (each refused in one line)."""
        cls = estimator_class(self.estimator, _module_list(self.trust_module))
        params = estimator_parameters(self.estimator_params)
        accepted = cls().get_params(deep=False)
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise PipelineError(f"--params: {self.estimator} has no parameter {unknown[0]!r} (it takes "
                                f"{', '.join(sorted(accepted)[:12])}{', ...' if len(accepted) > 12 else ''})")
        try:
            made = cls(**params)
        except TypeError as error:
            raise PipelineError(f"--params: {self.estimator} does not accept them ({one_line(error)})") from None
        if "random_state" in accepted and "random_state" not in params:  # the same run twice: the same head
            made.set_params(random_state=self.seed)
        validate = getattr(made, "_validate_params", None)
        if validate is not None:
            try:
                validate()
            except (ValueError, TypeError) as error:
                raise PipelineError(f"--params: {one_line(error)}") from None
        return made

    @staticmethod
    def versions() -> dict[str, str]:
        import sklearn

        return {"scikit-learn": sklearn.__version__, "numpy": np.__version__}

    def _fit(self, train: Features, validation: Features, progress: bool) -> list[dict[str, float]]:
        import sys

        from pipeline.heads.logreg import validation_scores

        if not (train.in_memory and validation.in_memory):
            raise PipelineError("the sklearn head fits the training features in memory, and these are streamed: "
                                "pool them (extract --pooling avg), or raise --memory-budget")
        model = self._unfitted()
        if progress:
            print(f"sklearn head: fitting {type(model).__name__} on {len(train)} images x {train.dimension} features",
                  file=sys.stderr, flush=True)
        try:
            if hasattr(model, "predict_proba"):
                model.fit(train.matrix, train.labels)
                self.calibrated_ = False
            else:  # probabilities from the decision function, sigmoid-calibrated out of fold on training
                model = self._calibrated(model, train)
                self.calibrated_ = True
        except (ValueError, TypeError, MemoryError) as error:
            raise PipelineError(f"{self.estimator} failed to fit: {one_line(error)}") from None
        self.model_ = model
        rows = []
        if len(validation):
            proba = np.clip(self._proba(validation), 1e-7, 1)
            rows.append({"fit": 1, "train_accuracy": float(np.mean(self._proba(train).argmax(1) == train.labels)),
                         **validation_scores(proba / proba.sum(1, keepdims=True), validation.labels,
                                             len(self.class_names))})
        return rows

    def _calibrated(self, model: Any, train: Features) -> Any:
        from sklearn.calibration import CalibratedClassifierCV

        if not hasattr(model, "decision_function"):
            raise PipelineError(f"{self.estimator} gives neither probabilities nor a decision function to calibrate: "
                                "choose another classifier")
        folds = int(min(5, np.bincount(train.labels).min()))
        if folds < 2:
            raise PipelineError(f"{self.estimator} has no predict_proba, and calibrating its decision function needs "
                                "two training images of every class")
        return CalibratedClassifierCV(model, method="sigmoid", cv=folds, ensemble=False).fit(train.matrix,
                                                                                              train.labels)

    def _proba(self, data: Features) -> np.ndarray:
        classes = len(self.class_names)
        out = np.zeros((len(data), classes))
        if not len(data):
            return out
        matrix = data.matrix if data.in_memory else np.concatenate([x for x, _ in data.chunks()])
        columns = np.asarray(self.model_.classes_).astype(int)  # the classes it saw, in its order
        out[:, columns] = self.model_.predict_proba(matrix.reshape(len(matrix), -1))
        return out

    def outcome(self) -> dict[str, Any]:
        return {"estimator": self.estimator, "estimator_class": type(self.model_).__name__,
                "calibrated": bool(self.calibrated_),
                "trusted_modules": _module_list(self.trust_module)}

    def as_keras(self) -> Any:
        raise PipelineError(f"the sklearn head ({self.estimator}) has no Keras form: fine-tune starts from a "
                            "logreg, dense, svm or knn head; export it with --format onnx")

    def as_onnx(self, opset: int) -> Any:
        """The fitted estimator as an ONNX graph (skl2onnx): input `features` (batch, dimension)
        float32, output `probabilities` (batch, classes) float32 in the order of the class names."""
        from pipeline.errors import require_module

        require_module("skl2onnx", "--format onnx with the sklearn head", "onnx")
        from onnx import helper
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType

        try:
            graph = to_onnx(self.model_, initial_types=[("features", FloatTensorType([None, self.n_features_in_]))],
                            options={id(self.model_): {"zipmap": False}},
                            target_opset={"": opset, "ai.onnx.ml": 3})
        except Exception as error:  # noqa: BLE001 - skl2onnx raises many types for what it cannot convert
            raise PipelineError(f"skl2onnx cannot convert {type(self.model_).__name__} ({one_line(error)[:120]}): "
                                "a sklearn head exports to ONNX only, so this one cannot be exported; predict and "
                                "evaluate work") from None
        proba = graph.graph.output[-1].name
        columns = np.asarray(self.model_.classes_).astype(int)
        if list(columns) != list(range(len(self.class_names))):
            raise PipelineError("the sklearn head saw only some of the classes in training: it cannot be exported")
        if proba != "probabilities":
            graph.graph.node.append(helper.make_node("Identity", [proba], ["probabilities"], name="probabilities"))
        del graph.graph.output[:]
        graph.graph.output.append(helper.make_tensor_value_info("probabilities", 1, [None, len(self.class_names)]))
        return graph

    def _save_model(self, directory: Path) -> dict[str, Any]:
        sio = _skops()
        sio.dump(self.model_, directory / MODEL_FILE)
        return {"estimator_class": f"{type(self.model_).__module__}.{type(self.model_).__qualname__}",
                "calibrated": bool(self.calibrated_),
                "files": {MODEL_FILE: file_sha256(directory / MODEL_FILE)}}

    def _load_model(self, directory: Path, sidecar: dict[str, Any]) -> None:
        sio = _skops()
        path = checked_file(directory / MODEL_FILE, sidecar.get("files", {}).get(MODEL_FILE), SIDECAR,
                            "train the head again")
        trusted = (*TRUSTED, *_module_list(os.environ.get(TRUST_VARIABLE)))
        try:
            types = sio.get_untrusted_types(file=path)
        except Exception as error:  # noqa: BLE001 - skops raises several types for a damaged file
            raise PipelineError(f"{path} is not a readable skops file ({one_line(error)[:160]}): train the head "
                                "again") from None
        foreign = sorted(name for name in types if _top_module(name) not in trusted)
        if foreign:
            raise PipelineError(f"{path} holds types outside scikit-learn and NumPy ({', '.join(foreign[:3])}): "
                                f"refused, nothing loaded; if you trust {_top_module(foreign[0])}, set "
                                f"{TRUST_VARIABLE}={_top_module(foreign[0])}")
        try:
            model = sio.load(path, trusted=list(types))
        except Exception as error:  # noqa: BLE001
            raise PipelineError(f"{path} cannot be loaded ({one_line(error)[:160]}): train the head again") from None
        from sklearn.base import is_classifier

        classes = getattr(model, "classes_", None)
        if (not is_classifier(model) or not hasattr(model, "predict_proba") or classes is None
                or len(classes) > len(self.class_names)
                or not np.isin(np.asarray(classes).astype(int), np.arange(len(self.class_names))).all()):
            raise PipelineError(f"{path} does not hold a fitted classifier of this head's "
                                f"{len(self.class_names)} classes: train the head again")
        self.model_ = model
        self.calibrated_ = bool(sidecar.get("calibrated", False))


def _skops() -> Any:
    try:
        import skops.io as sio
    except ImportError:
        raise PipelineError("the sklearn head saves with skops, which is not installed: "
                            + install_hint("sklearn")) from None
    return sio
