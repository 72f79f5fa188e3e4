"""The logistic-regression head: StandardScaler + multinomial L-BFGS, C chosen on validation from a log grid."""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artefacts import checked_file, file_sha256, load_arrays
from pipeline.errors import PipelineError
from pipeline.heads.base import SIDECAR, Features, Head, class_weights
from pipeline.parallel import parallel

MAX_GRID = 1000  # C values a search may try: each is one fit
QUICK_GRID = "1e-4:1e2:7"  # one C a decade over the range where standardised features' best C falls


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
                 class_weight: str | None, max_iter: int, tol: float,
                 start: Any = None, sample_weight: np.ndarray | None = None) -> tuple[dict[str, float], Any]:
    """One C fitted (warm-started from `start`, a LinearSolution, where given): its history row and
    its solution. `sample_weight`: soft targets, as rows of (x, class k) weighted by p_k."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from pipeline.heads.linear import LinearSolution

    model = LogisticRegression(C=C, class_weight=class_weight, max_iter=max_iter, tol=tol, warm_start=start is not None)
    if start is not None:
        model.coef_, model.intercept_ = start.coef.copy(), start.intercept.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y, sample_weight=sample_weight)
    converged = int(model.n_iter_[0]) < max_iter
    row = _c_row(C, model.score(x, y, sample_weight=sample_weight), model.predict_proba(vx), vy, classes, converged)
    return row, LinearSolution(model.coef_.copy(), model.intercept_.copy(), int(model.n_iter_[0]), converged)


def soft_rows(x: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft targets as weighted hard rows: each image once per class of non-zero probability,
    weighted by it. The weighted log loss is then the cross-entropy against the soft targets."""
    rows, classes = np.nonzero(np.asarray(targets) > 0)
    return x[rows], classes.astype(np.int64), np.asarray(targets, np.float64)[rows, classes]


PATH_PATIENCE = 3  # coarse steps (about a decade each) without a better validation score: the path stops
COARSE_STEPS = 12  # grids longer than this are walked coarse first (about one C a decade), then refined


def _row_key(row: dict[str, float]) -> tuple[float, float, float]:
    return (-row["validation_accuracy"], row["validation_loss"], row["C"])


def path_search(grid: Sequence[float], fit_at: Callable[[int, int | None], dict[str, float]]) -> list[int]:
    """The C values of `grid` (ascending) that the path search fits, in the order it fits them:
    every `stride`-th C from the smallest (about one a decade on the default grid) until
    PATH_PATIENCE of them in a row have not beaten the best validation score (accuracy, ties
    broken by the lower loss), then every C of the grid between the best one's coarse neighbours.
    `fit_at(i, warm)` fits grid[i], warm-started from the solution of grid[warm] (None: cold), and
    returns its row. Small C fits are cheap and large ones slow, so stopping the climb where
    validation has stopped improving skips the slowest fits of the grid."""
    stride = max(1, math.ceil(len(grid) / COARSE_STEPS))
    rows: dict[int, dict[str, float]] = {}
    best, since, previous = None, 0, None
    for i in range(0, len(grid), stride):
        rows[i] = fit_at(i, previous)
        previous = i
        if best is None or _row_key(rows[i]) < _row_key(rows[best]):
            best, since = i, 0
        else:
            since += 1
            if since >= PATH_PATIENCE:
                break
    for i in range(max(0, best - stride + 1), min(len(grid), best + stride)):
        if i not in rows:
            below = [j for j in rows if j < i]
            rows[i] = fit_at(i, max(below) if below else None)
    return sorted(rows)


def validation_scores(proba: np.ndarray, labels: np.ndarray, classes: int) -> dict[str, float]:
    """A search row's figures on validation: accuracy and log loss."""
    from sklearn.metrics import log_loss

    return {"validation_accuracy": float(np.mean(proba.argmax(axis=1) == labels)),
            "validation_loss": float(log_loss(labels, proba, labels=list(range(classes))))}


def _c_row(C: float, train_accuracy: float, proba: np.ndarray, labels: np.ndarray, classes: int,
           converged: bool) -> dict[str, float]:
    return {"C": C, "train_accuracy": float(train_accuracy), **validation_scores(proba, labels, classes),
            "converged": bool(converged)}


def _best_row(rows: list[dict[str, float]]) -> dict[str, float]:
    """Highest validation accuracy; ties go to the lower validation loss, then the smaller C."""
    return min(rows, key=lambda r: (-r["validation_accuracy"], r["validation_loss"], r["C"]))


C_SEARCHES = ("path", "grid")  # --c-search: the warm-started path, or every C of the grid


class LogRegHead(Head):
    """StandardScaler + multinomial LogisticRegression (L-BFGS), C chosen on the validation split
    from a log grid (the linear-probe protocol), fits in parallel, then refit at the chosen C."""

    kind = "logreg"
    HISTORY_AXIS = "C"
    SOFT_TARGETS = True  # in memory: each image once per class, weighted by its probability (soft_rows)
    MULTILABEL = True  # one binary regression a label, one C for all (chosen on mean validation accuracy)
    RULES = {
        "max_iter": (lambda v: v >= 1, "a positive integer"),
        "tol": (lambda v: 0 < v < math.inf, "a positive number"),
        "n_jobs": (lambda v: v != 0, "a number of parallel fits, or -1 for all cores (not 0)"),
        "c_search": (lambda v: v in C_SEARCHES, "path (warm-started, stops where validation stops "
                                                      "improving) or grid (every C)"),
    }
    MODEL_FILE = "head.joblib"
    PORTABLE_FILE = "head.npz"

    def __init__(self, *, c_grid: str = "1e-6:1e5:45", c_search: str = "path", class_weight: str = "none",
                 max_iter: int = 1000, tol: float = 1e-4, n_jobs: int = -1, validation_fraction: float = 0.2) -> None:
        self.c_grid = c_grid  # log-spaced C values LOW:HIGH:COUNT, or C1,C2,...
        self.c_search = c_search  # path (warm-started, stops where validation does) or grid (every C)
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol
        self.n_jobs = n_jobs
        self.validation_fraction = validation_fraction  # fit(X, y): the part held out to choose C on

    @property
    def grid(self) -> tuple[float, ...]:
        return log_grid(str(self.c_grid))

    def _check_more(self) -> None:
        log_grid(str(self.c_grid))  # a grid that cannot be searched is refused at once

    @staticmethod
    def versions() -> dict[str, str]:
        import sklearn

        return {"scikit-learn": sklearn.__version__, "numpy": np.__version__}

    def _sklearn_class_weight(self) -> str | None:
        return None if self.params["class_weight"] in (None, "none") else self.params["class_weight"]

    def _walks_the_path(self) -> bool:
        return self.params["c_search"] == "path" and len(self.grid) > COARSE_STEPS

    def _fit(self, train: Features, validation: Features, progress: bool) -> list[dict[str, float]]:
        if progress and str(self.params["c_grid"]) == self.DEFAULTS["c_grid"] and not self._walks_the_path():
            print(f"C search: {len(self.grid)} fits (--c-grid {self.DEFAULTS['c_grid']}, the linear-probe protocol); "
                  f"for a quicker first look, --c-grid {QUICK_GRID} ({len(log_grid(QUICK_GRID))} fits, one a decade) "
                  "or --c-search path", file=sys.stderr, flush=True)
        if self.multilabel_:
            rows = self._search_multilabel(train, validation, progress)
        elif train.in_memory and validation.in_memory:
            rows = self._search_in_memory(train, validation, progress)
        else:
            rows = self._search_streamed(train, validation, progress)
        self.C_ = _best_row(rows)["C"]
        self.n_iter_ = int(np.max(self.model_[-1].n_iter_))  # L-BFGS iterations of the chosen C's fit
        return rows

    @property
    def cv_results_(self) -> dict[str, list]:
        """The C search as scikit-learn's searches keep it: one list per column, one entry per C."""
        return {key: [row[key] for row in self.history_] for key in (self.history_[0] if self.history_ else {})}

    def _search_in_memory(self, train: Features, validation: Features, progress: bool) -> list[dict[str, float]]:
        """The C search on standardised features: the path (warm-started, C ascending, stopped
        where validation stops improving, then refined) or every C of the grid in parallel. The
        chosen C's solution is the model: nothing is fitted again."""
        from joblib import delayed
        from sklearn.preprocessing import StandardScaler
        from tqdm import tqdm

        scaler = StandardScaler().fit(train.matrix)
        x = scaler.transform(train.matrix).astype(np.float32)
        vx = scaler.transform(validation.matrix).astype(np.float32)
        score = (x, train.labels, vx, validation.labels, len(self.class_names))
        weight = None
        if getattr(train, "targets", None) is not None:  # cross-entropy against soft targets: each image once
            x, y, weight = soft_rows(x, train.targets)  # per class, weighted by its probability
            score = (x, y, vx, validation.labels, len(self.class_names))
        settings = (self._sklearn_class_weight(), self.params["max_iter"], self.params["tol"])
        grid = sorted(self.grid)
        if self._walks_the_path():
            solutions: dict[float, Any] = {}
            rows: list[dict[str, float]] = []
            bar = tqdm(desc="C path (warm-started, stops where validation does)", unit="fit", disable=not progress,
                       file=sys.stderr)

            def fit_at(i: int, warm: int | None) -> dict[str, float]:
                row, solutions[grid[i]] = _score_one_c(*score, grid[i], *settings,
                                                       start=None if warm is None else solutions[grid[warm]],
                                                       sample_weight=weight)
                rows.append(row)
                bar.update()
                return row

            path_search(grid, fit_at)
            bar.close()
        else:
            # The largest C first: those fits take the most iterations, so the progress bar's estimate
            # of the time left is an upper bound from the start instead of growing at the end.
            jobs = (delayed(_score_one_c)(*score, C, *settings, sample_weight=weight) for C in grid[::-1])
            results = parallel(self.params["n_jobs"], return_as="generator")(jobs)
            fitted = list(tqdm(results, total=len(grid), desc=f"C search ({len(grid)} fits, largest C first)",
                               unit="fit", disable=not progress, file=sys.stderr))
            rows = [row for row, _ in fitted]
            solutions = {row["C"]: solution for row, solution in fitted}
        best = _best_row(rows)["C"]
        self.model_ = self._pipeline_from(scaler, solutions[best], best)
        return sorted(rows, key=lambda row: row["C"])

    def _search_multilabel(self, train: Features, validation: Features, progress: bool) -> list[dict[str, float]]:
        """One binary logistic regression a label (one-vs-rest) on standardised features, one C for
        all of them: about one C a decade of the grid, ascending, each label's fit warm-started
        from the previous C's; the C of the best mean validation accuracy over the labels (ties:
        the lower mean loss) is the model."""
        from sklearn.preprocessing import StandardScaler
        from tqdm import tqdm

        from pipeline.heads.linear import LinearSolution

        if not (train.in_memory and validation.in_memory):
            raise PipelineError("multi-label heads are fitted in memory: raise --memory-budget (or drop --stream)")
        scaler = StandardScaler().fit(train.matrix)
        x = scaler.transform(train.matrix).astype(np.float32)
        vx = scaler.transform(validation.matrix).astype(np.float32)
        y, vy = np.asarray(train.targets) >= 0.5, np.asarray(validation.targets) >= 0.5
        grid = sorted(self.grid)
        coarse = grid[::max(1, math.ceil(len(grid) / COARSE_STEPS))]
        settings = (self._sklearn_class_weight(), self.params["max_iter"], self.params["tol"])
        rows, solutions, previous = [], {}, None
        bar = tqdm(desc=f"C search ({len(coarse)} values x {y.shape[1]} labels)", total=len(coarse) * y.shape[1],
                   unit="fit", disable=not progress, file=sys.stderr)
        for C in coarse:
            fitted = []
            for k in range(y.shape[1]):
                fitted.append(_score_one_c(x, y[:, k].astype(int), vx, vy[:, k].astype(int), 2, C, *settings,
                                           start=None if previous is None else previous[k]))
                bar.update()
            previous = [solution for _, solution in fitted]
            solutions[C] = previous
            rows.append({"C": C, **{key: float(np.mean([row[key] for row, _ in fitted]))
                                    for key in ("train_accuracy", "validation_accuracy", "validation_loss")},
                         "converged": all(row["converged"] for row, _ in fitted)})
        bar.close()
        self.C_ = _best_row(rows)["C"]
        chosen = solutions[self.C_]
        self.model_ = self._pipeline_from(scaler, LinearSolution(np.concatenate([s.coef for s in chosen]),
                                                                 np.concatenate([s.intercept for s in chosen]),
                                                                 max(s.iterations for s in chosen),
                                                                 all(s.converged for s in chosen)), self.C_)
        return rows

    def _search_streamed(self, train: Features, validation: Features, progress: bool) -> list[dict[str, float]]:
        """The same objective solved by pipeline.heads.linear over shards, C ascending with warm
        starts: the path, or every C of the grid."""
        from sklearn.preprocessing import StandardScaler
        from tqdm import tqdm

        from pipeline.heads.linear import fit_logistic

        if getattr(train, "targets", None) is not None:
            raise PipelineError("soft targets are fitted in memory: raise --memory-budget (or drop --stream)")
        scaler = StandardScaler()
        for vectors, _ in train.chunks():
            scaler.partial_fit(vectors)
        classes = len(self.class_names)
        weights = class_weights(train.labels, classes, self.params["class_weight"])
        weight_sum = float(weights[train.labels].sum())
        scaled = lambda data: (lambda: ((scaler.transform(v), y) for v, y in data.chunks()))  # noqa: E731
        grid = sorted(self.grid)
        rows: list[dict[str, float]] = []
        solutions: dict[float, Any] = {}
        bar = tqdm(desc="C search (streamed)", unit="fit", disable=not progress, file=sys.stderr,
                   total=None if self._walks_the_path() else len(grid))

        def fit_at(i: int, warm: int | None) -> dict[str, float]:
            C = grid[i]
            solutions[C] = fit_logistic(scaled(train), train.dimension, classes, C, weights, weight_sum,
                                        self.params["tol"], self.params["max_iter"],
                                        start=None if warm is None else solutions[grid[warm]])
            self.model_ = self._pipeline_from(scaler, solutions[C], C)
            train_accuracy = np.mean(self._proba(train).argmax(axis=1) == train.labels)
            rows.append(_c_row(C, train_accuracy, self._proba(validation), validation.labels, classes,
                               solutions[C].converged))
            bar.update()
            return rows[-1]

        if self._walks_the_path():
            path_search(grid, fit_at)
        else:
            for i in range(len(grid)):
                fit_at(i, i - 1 if i else None)
        bar.close()
        best = _best_row(rows)["C"]
        self.model_ = self._pipeline_from(scaler, solutions[best], best)
        return sorted(rows, key=lambda row: row["C"])

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

    def _proba(self, data: Features) -> np.ndarray:
        classes = len(self.class_names)
        if self.multilabel_:  # one sigmoid a label
            from pipeline.heads.thresholds import sigmoid

            scaler, model = self.model_[0], self.model_[-1]
            parts = [sigmoid(scaler.transform(vectors) @ model.coef_.T + model.intercept_)
                     for vectors, _ in data.chunks()]
            return np.concatenate(parts) if parts else np.zeros((0, classes))
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
        if coef.shape[0] == 1 and not self.multilabel_:
            coef = np.concatenate([np.zeros_like(coef), coef])
            intercept = np.concatenate([[0.0], intercept])
        mean, scale = np.asarray(parameters["mean"], np.float64), np.asarray(parameters["scale"], np.float64)
        standardise = keras.layers.Normalization(mean=mean.astype(np.float32),
                                                 variance=(scale ** 2).astype(np.float32),
                                                 name="standardise", dtype="float32")
        dense = keras.layers.Dense(len(self.class_names), activation="sigmoid" if self.multilabel_ else "softmax",
                                   name="logistic_regression", dtype="float32")
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
        rows = 1 if classes == 2 and not self.multilabel_ else classes
        if (coef.shape != (rows, dimension) or intercept.shape != (rows,) or mean.shape != (dimension,)
                or scale.shape != (dimension,) or coef.dtype.kind != "f" or not np.isfinite(coef).all()):
            raise PipelineError(f"{path} holds arrays of the wrong shape or type for {classes} classes and "
                                f"{dimension} features (damaged?): train the head again")
        if not (np.isfinite(mean).all() and np.isfinite(intercept).all() and np.isfinite(scale).all()
                and (scale > 0).all()):
            raise PipelineError(f"{path} holds a scale of zero or values that are not finite (damaged?): every "
                                "prediction would be the same; train the head again")
        if not np.any(coef):
            raise PipelineError(f"{path} holds coefficients that are all zero (damaged?): every prediction would be "
                                "the same; train the head again")
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_, scaler.var_ = mean, scale, scale ** 2
        scaler.n_features_in_ = dimension
        self.model_ = self._pipeline_from(scaler, LinearSolution(coef, intercept, 0, True), self.C_)


