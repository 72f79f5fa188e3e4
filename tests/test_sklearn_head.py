"""The generic scikit-learn head (issue 42): any classifier by name with JSON parameters, saved
with skops and loaded only where every type in the file is scikit-learn's or NumPy's; predicted
after the backbone in NumPy and exported to ONNX as one graph (skl2onnx joined to tf2onnx's)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.utils.estimator_checks import check_estimator

from commandline import in_process
from conftest import SHALLOW, pooled_cluster_cache, tiny_options
from pipeline import api
from pipeline.errors import PipelineError
from pipeline.heads import EstimatorHead, Head

HEAD_RUN_LAYERS = SHALLOW  # conftest.head_run: its tests export the run and never fine-tune it


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pooled_cluster_cache(tmp_path_factory.mktemp("sklearn-head"), 240, seed=4, dimension=12, separation=1.0)


@pytest.mark.parametrize("estimator", ["sklearn.linear_model.LogisticRegression",
                                       "sklearn.linear_model.RidgeClassifier",  # calibrated: no predict_proba
                                       "sklearn.ensemble.RandomForestClassifier"])
def test_scikit_learns_own_checks_pass(estimator: str) -> None:
    results = check_estimator(EstimatorHead(estimator=estimator), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert len(results) > 40 and not failed, failed


def test_a_named_classifier_trains_saves_and_loads_with_its_parameters(cache: Path, tmp_path: Path) -> None:
    run = api.train_head(cache, head="sklearn", estimator="sklearn.ensemble.RandomForestClassifier",
                         estimator_params={"n_estimators": 30, "max_depth": 4}, models=tmp_path, progress=False)
    assert run.metrics["test"]["accuracy"] > 0.8
    head = Head.load(run.directory)
    assert type(head.model_).__name__ == "RandomForestClassifier"
    assert head.model_.n_estimators == 30 and head.model_.max_depth == 4 and head.model_.random_state == 0
    assert (run.directory / "head.skops").is_file() and not list(run.directory.glob("*.pkl"))
    assert run.config["head"]["estimator_class"] == "RandomForestClassifier"
    # the same command, the same run: the seed stands in for random_state
    again = api.train_head(cache, head="sklearn", estimator="sklearn.ensemble.RandomForestClassifier",
                           estimator_params={"n_estimators": 30, "max_depth": 4}, models=tmp_path, name="again",
                           progress=False)
    assert again.metrics["test"]["accuracy"] == run.metrics["test"]["accuracy"]


def test_a_classifier_without_probabilities_is_calibrated(cache: Path, tmp_path: Path) -> None:
    run = api.train_head(cache, head="sklearn", estimator="sklearn.svm.LinearSVC", models=tmp_path, progress=False)
    head = Head.load(run.directory)
    assert run.config["head"]["calibrated"] is True and type(head.model_).__name__ == "CalibratedClassifierCV"
    assert run.metrics["test"]["accuracy"] > 0.9


def test_the_command_line_takes_the_estimator_and_json_parameters(cache: Path, tmp_path: Path, capsys) -> None:
    result = in_process(capsys, "train-head", "--features", str(cache), "--models", str(tmp_path), "--head", "sklearn",
                     "--estimator", "sklearn.neighbors.KNeighborsClassifier", "--params", '{"n_neighbors": 7}',
                     "--name", "knn7", "--json")
    assert result.returncode == 0, result.stderr
    sidecar = json.loads((tmp_path / "knn7" / "head.json").read_text())
    assert sidecar["params"]["estimator_params"] == '{"n_neighbors": 7}'
    assert Head.load(tmp_path / "knn7").model_.n_neighbors == 7


@pytest.mark.parametrize("settings,says", [
    ({"estimator": "sklearn.ensemble.NoSuchForest"}, "has no class NoSuchForest"),
    ({"estimator": "sklearn.no_such_module.Thing"}, "no module sklearn.no_such_module"),
    ({"estimator": "sklearn.linear_model.Ridge"}, "is not a scikit-learn classifier"),
    ({"estimator": "sklearn.preprocessing.StandardScaler"}, "is not a scikit-learn classifier"),
    ({"estimator": "LogisticRegression"}, "a dotted class name"),
    ({"estimator_params": "{max_iter: 3}"}, "is not JSON"),
    ({"estimator_params": "[1, 2]"}, "a JSON object"),
    ({"estimator_params": {"no_such_parameter": 1}}, "has no parameter 'no_such_parameter'"),
    ({"estimator_params": {"C": -1}}, "--params: The 'C' parameter"),
    ({"estimator": "collections.OrderedDict"}, "collections is not scikit-learn"),
])
def test_bad_estimators_and_parameters_are_one_line_before_any_work(cache: Path, tmp_path: Path, settings: dict,
                                                                    says: str) -> None:
    with pytest.raises(PipelineError, match=says) as caught:
        api.train_head(cache, head="sklearn", models=tmp_path, progress=False, **settings)
    assert "\n" not in str(caught.value) and not any(tmp_path.iterdir())


def test_a_module_outside_scikit_learn_is_never_imported_unless_trusted(cache: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported"
    package = tmp_path / "site"
    package.mkdir()
    (package / "outside_estimators.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from sklearn.linear_model import LogisticRegression as Outside\n")
    monkeypatch.syspath_prepend(str(package))
    name = "outside_estimators.Outside"
    with pytest.raises(PipelineError, match="--trust-module outside_estimators"):
        api.train_head(cache, head="sklearn", estimator=name, models=tmp_path / "m", progress=False)
    assert not marker.exists() and "outside_estimators" not in sys.modules
    run = api.train_head(cache, head="sklearn", estimator=name, trust_module="outside_estimators",
                         models=tmp_path / "m", progress=False)
    assert marker.exists() and run.config["head"]["trusted_modules"] == ["outside_estimators"]


def test_a_hostile_saved_head_runs_nothing(cache: Path, tmp_path: Path) -> None:
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    from pipeline.artefacts import file_sha256

    run = api.train_head(cache, head="sklearn", models=tmp_path, name="run", progress=False)
    x, y = np.random.default_rng(0).normal(size=(30, 12)), np.arange(30) % 3
    hostile = make_pipeline(FunctionTransformer(os.system), LogisticRegression())  # predict would run a shell
    hostile.steps[-1][1].fit(x, y)
    path = run.directory / "head.skops"
    sio.dump(hostile, path)
    sidecar = json.loads((run.directory / "head.json").read_text())
    sidecar["files"]["head.skops"] = file_sha256(path)  # whoever wrote the file wrote the sidecar too
    (run.directory / "head.json").write_text(json.dumps(sidecar))
    with pytest.raises(PipelineError, match="holds types outside scikit-learn and NumPy.*refused, nothing loaded"):
        Head.load(run.directory)
    (run.directory / "head.skops").write_bytes(b"not a zip")  # damaged and re-hashed: one line too
    sidecar["files"]["head.skops"] = file_sha256(path)
    (run.directory / "head.json").write_text(json.dumps(sidecar))
    with pytest.raises(PipelineError, match="not a readable skops file"):
        Head.load(run.directory)


def test_predict_and_an_onnx_export_that_agrees_and_the_other_formats_refused(head_run: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    from pipeline.extraction.extract import extract_features

    # VGG16 read at block3_pool (conftest.SHALLOW): the joined graph's conversion in seconds, not tens
    shallow = extract_features(tiny_options(head_run["data"], tmp_path / "features", layers=SHALLOW)).cache_dir
    run = api.train_head(shallow, head="sklearn", estimator="sklearn.ensemble.RandomForestClassifier",
                         estimator_params={"n_estimators": 10}, models=tmp_path / "models", name="forest",
                         progress=False)
    files = sorted(head_run["data"].rglob("*.png"))[:4]
    predictions = api.predict(run, [str(f) for f in files], top=3)
    assert all(p.error is None and abs(sum(p.probabilities) - 1) < 1e-5 for p in predictions)
    # the probabilities are the head's on the cached features of the same images
    head = Head.load(run.directory)
    classifier = run.classifier()
    from PIL import Image

    from pipeline.serving.formats.onnx import squash

    pixels = np.concatenate([squash(np.asarray(Image.open(f).convert("RGB")), run.fingerprint.image_size)
                             for f in files])
    direct = head.predict_proba(np.asarray(classifier.features.predict_on_batch(pixels)))
    by_label = [dict(zip(p.labels, p.probabilities)) for p in predictions]
    for row, found in zip(direct, by_label):
        np.testing.assert_allclose([found[name] for name in head.class_names], row, atol=1e-6)
    exported = api.export(run, "onnx", tmp_path / "onnx", progress=False, check_images=6)
    format_details = exported.details["format"]
    agreement = format_details["agreement_with_predict"]
    assert agreement["measured"] and agreement["largest_probability_difference"] < 1e-5
    assert format_details["largest_difference_to_predict"] < 1e-4
    for fmt in ("keras", "savedmodel", "tflite"):
        with pytest.raises(PipelineError, match="exports to --format onnx only"):
            api.export(run, fmt, tmp_path / fmt, progress=False)
        assert not (tmp_path / fmt).exists()
    with pytest.raises(PipelineError, match="no --quantize, no --tta"):
        api.export(run, "onnx", tmp_path / "q", quantize=True, progress=False)
    with pytest.raises(PipelineError, match="fine-tune starts from a logreg, dense, svm or knn head"):
        api.finetune(run, models=tmp_path / "models", epochs=1, progress=False)
