"""The heads as scikit-learn estimators (issue 42): scikit-learn's own checks, clone,
cross_val_score, GridSearchCV and Pipeline; the SVM and nearest-neighbour heads trained, saved,
loaded without running code, predicting and exporting like the others."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_iris
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator

from conftest import SHALLOW, pooled_cluster_cache
from pipeline import api
from pipeline.errors import PipelineError
from pipeline.heads import DenseHead, Head, KNNHead, LogRegHead, SVMHead

HEAD_RUN_LAYERS = SHALLOW  # conftest.head_run: its tests export the run and never fine-tune it

QUICK = {
    "logreg": lambda: LogRegHead(c_grid="1e-2:1e2:3", n_jobs=1),
    "svm": lambda: SVMHead(c_grid="1,10", gamma_grid="1"),
    "knn": lambda: KNNHead(k_grid="1,3"),
}


@pytest.mark.parametrize("kind", sorted(QUICK))
def test_scikit_learns_own_checks_pass(kind: str) -> None:
    results = check_estimator(QUICK[kind](), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert len(results) > 40 and not failed, failed


# The dense head trains a Keras network: scikit-learn's checks take minutes, so they run in
# `make test-all`. Those it cannot pass, and why:
DENSE_EXPECTED_FAILURES = {
    "check_classifiers_train": "a few epochs of a small network on the check's tiny sets stay under its accuracy bar",
    "check_class_weight_classifiers": "class_weight takes 'none' or 'balanced' (the command line's), not a dict",
}


@pytest.mark.slow
def test_scikit_learns_own_checks_on_the_dense_head() -> None:
    results = check_estimator(DenseHead(units=8, epochs=3, patience=2), on_fail=None)
    failed = {r["check_name"] for r in results if r["status"] == "failed"}
    assert failed <= set(DENSE_EXPECTED_FAILURES), failed - set(DENSE_EXPECTED_FAILURES)


def test_every_head_is_cloned_cross_validated_searched_and_piped() -> None:
    x, y = load_iris(return_X_y=True)
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    for kind, make in QUICK.items():
        head = make()
        assert clone(head).get_params() == head.get_params()
        scores = cross_val_score(make(), x, names, cv=3)
        assert scores.mean() > 0.8, (kind, scores)
        fitted = make_pipeline(StandardScaler(), make()).fit(x, names)
        assert set(fitted.predict(x[:5])) <= set(names) and fitted.score(x, names) > 0.85
    search = GridSearchCV(LogRegHead(n_jobs=1), {"c_grid": ["1e-2:1e2:3", "1,10"]}, cv=3).fit(x, y)
    assert search.best_params_["c_grid"] in ("1e-2:1e2:3", "1,10")
    assert cross_val_score(LogRegHead(), x, y, cv=3).mean() > 0.8  # the issue's own words, defaults and all


def test_fit_learns_the_classes_from_y_and_never_from_the_constructor() -> None:
    x, y = load_iris(return_X_y=True)
    head = SVMHead().fit(x, np.array(["a", "b", "c"])[y])
    assert list(head.classes_) == ["a", "b", "c"] and head.predict(x[:1])[0] in ("a", "b", "c")
    with pytest.raises(TypeError):
        LogRegHead(["a", "b"])  # class names are learned, not passed


def test_the_dense_head_clones_and_fits_arrays() -> None:
    x, y = load_iris(return_X_y=True)
    head = clone(DenseHead(units=16, epochs=5, patience=2)).fit(x, y)
    assert head.predict_proba(x[:4]).shape == (4, 3) and list(head.classes_) == [0, 1, 2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pooled_cluster_cache(tmp_path_factory.mktemp("heads"), 300, seed=2, dimension=16, separation=1.0)


@pytest.mark.parametrize("kind,extra", [("svm", {}), ("svm", {"kernel": "linear"}), ("knn", {})])
def test_the_new_heads_train_save_load_and_agree_with_their_keras_form(cache: Path, tmp_path: Path, kind: str,
                                                                       extra: dict) -> None:
    from pipeline.cache.reader import FeatureView, load_splits
    from pipeline.cache.store import FeatureStore

    run = api.train_head(cache, head=kind, models=tmp_path / "models", name="run", progress=False, **extra)
    assert run.metrics["test"]["accuracy"] > 0.9
    head = Head.load(run.directory)
    store = FeatureStore(cache)
    test = load_splits(store, FeatureView.for_cache(store))["test"]
    numpy = head.predict_proba(test)
    keras = np.asarray(head.as_keras().predict_on_batch(test.matrix))
    np.testing.assert_allclose(keras, numpy, atol=1e-5)
    assert run.config["head"]["kind"] == kind and (run.directory / "head.npz").is_file()


def test_a_damaged_or_hostile_svm_head_is_refused_without_running_anything(cache: Path, tmp_path: Path) -> None:
    import pickle

    from pipeline.artefacts import file_sha256

    run = api.train_head(cache, head="svm", models=tmp_path / "models", name="run", progress=False)
    path = run.directory / "head.npz"
    with np.load(path) as arrays:
        kept = dict(arrays)
    np.savez(path, **(kept | {"vectors": np.array([pickle.dumps(print)], dtype=object)}))
    sidecar = json.loads((run.directory / "head.json").read_text())
    sidecar["files"]["head.npz"] = file_sha256(path)
    (run.directory / "head.json").write_text(json.dumps(sidecar))
    with pytest.raises(PipelineError):
        Head.load(run.directory)


def test_the_svm_refuses_the_rbf_kernel_past_its_limit_and_auto_switches(cache: Path, tmp_path: Path,
                                                                            capsys) -> None:
    with pytest.raises(PipelineError, match="use --kernel linear"):
        api.train_head(cache, head="svm", kernel="rbf", rbf_limit=10, models=tmp_path / "m", progress=False)
    run = api.train_head(cache, head="svm", rbf_limit=10, models=tmp_path / "m", name="auto", progress=True)
    assert run.config["head"]["kernel_used"] == "linear" and "the linear kernel" in capsys.readouterr().err


def test_bad_head_settings_are_one_line(cache: Path, tmp_path: Path) -> None:
    for settings, says in (({"head": "knn", "k_grid": "0,x"}, "--k-grid"), ({"head": "svm", "gamma_grid": "-1"},
                                                                              "--gamma-grid"),
                           ({"head": "svm", "kernel": "poly"}, "--kernel"), ({"head": "knn", "kernel": "rbf"},
                                                                            "does not apply to --head knn")):
        with pytest.raises(PipelineError, match=says):
            api.train_head(cache, models=tmp_path / "m", progress=False, **settings)
    with pytest.raises(PipelineError, match="larger than the"):
        api.train_head(cache, head="knn", k_grid="1000", models=tmp_path / "m", progress=False)


def test_the_new_heads_predict_and_export_from_pixels(head_run: dict[str, Path], tmp_path: Path) -> None:
    files = sorted(head_run["data"].rglob("*.png"))[:3]
    for kind in ("svm", "knn"):
        run = api.train_head(head_run["cache"], head=kind, models=tmp_path / "models", name=kind, progress=False)
        predictions = api.predict(run, [str(f) for f in files])
        assert all(p.labels and abs(sum(p.probabilities) - 1) < 1e-4 or len(p.labels) < 3 for p in predictions)
        exported = api.export(run, "tflite", tmp_path / f"{kind}-tflite", progress=False, check_images=4)
        agreement = exported.details["format"]["agreement_with_predict"]
        assert agreement["measured"] and agreement["largest_probability_difference"] < 1e-3
