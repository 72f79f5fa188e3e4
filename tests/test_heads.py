"""Stage two: heads on cached features, run directories, runs, evaluate."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from commandline import in_process
from conftest import (
    FAST_LOGREG,
    THREE_CLASSES,
    clustered_features,
    make_image_folder,
    tiny_options,
    write_feature_cache,
)
from pipeline import runs
from pipeline.cache.reader import FeatureView, SplitData, load_splits, open_cache
from pipeline.cache.store import FeatureStore
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.extraction.extract import extract_features
from pipeline.heads import Head, LogRegHead, make_head
from pipeline.heads.logreg import MAX_GRID, log_grid
from pipeline.training.train import TrainOptions, evaluate_run, run_training

CLASSES = ["ant", "bee", "cat"]
FAST_DENSE = {"epochs": 40, "units": 32, "patience": 5}


@pytest.fixture
def separable_cache(tmp_path: Path) -> Path:
    features, labels, splits = clustered_features(450, len(CLASSES), seed=1)
    return write_feature_cache(tmp_path / "features" / "clusters", features, labels, splits, CLASSES)


def _options(cache: Path, models: Path, head: str, **overrides) -> TrainOptions:
    params = FAST_DENSE if head == "dense" else FAST_LOGREG
    values = dict(head=head, features=cache, models=models, head_params=dict(params), progress=False)
    values.update(overrides)
    return TrainOptions(**values)


@pytest.mark.parametrize("head", ["logreg", "dense"])
def test_heads_learn_a_known_separation_and_stay_at_chance_on_shuffled_labels(
        tmp_path: Path, separable_cache: Path, head: str) -> None:
    run = run_training(_options(separable_cache, tmp_path / "models", head))
    assert run.metrics["test"]["accuracy"] >= 0.95
    assert run.metrics["validation"]["accuracy"] >= 0.95

    features, labels, splits = clustered_features(450, len(CLASSES), seed=1)
    shuffled = np.random.default_rng(7).permutation(labels)
    noise = write_feature_cache(tmp_path / "features" / "shuffled", features, shuffled, splits, CLASSES)
    chance = run_training(_options(noise, tmp_path / "models", head))
    assert chance.metrics["test"]["accuracy"] < 0.5  # chance is 1/3 with 90 test images


def test_a_run_directory_holds_every_report(tmp_path: Path, separable_cache: Path) -> None:
    for head in ("dense", "logreg"):
        run = run_training(_options(separable_cache, tmp_path / "models", head))
        names = {p.name for p in run.directory.iterdir()}
        assert {"config.json", "labels.txt", "metrics.json", "classification_report.txt", "confusion_matrix.csv",
                "confusion_matrix.png", "history.csv", "curves.png", "misclassified.csv", "head.json"} <= names
        metrics = json.loads((run.directory / "metrics.json").read_text())
        for split in ("train", "validation", "test"):
            assert {"accuracy", "mean_per_class_accuracy", "macro_f1", "loss"} <= set(metrics[split])
        config = json.loads((run.directory / "config.json").read_text())
        assert config["features"]["fingerprint"]["backbone"] == "vgg16" and config["head"]["kind"] == head
        assert (run.directory / "labels.txt").read_text().split() == CLASSES
        matrix = (run.directory / "confusion_matrix.csv").read_text().splitlines()
        assert len(matrix) == 1 + len(CLASSES) and matrix[0].endswith("class_accuracy")
        history = (run.directory / "history.csv").read_text().splitlines()[0]
        assert ("learning_rate" in history) if head == "dense" else ("validation_accuracy" in history)
        mistakes = (run.directory / "misclassified.csv").read_text().splitlines()
        wrong = round((1 - metrics["test"]["accuracy"]) * metrics["test"]["images"])
        assert len(mistakes) == 1 + wrong
    assert not list((tmp_path / "models").glob(".*")), "no staging directories left behind"


def _fitted(head_kind: str, cache: Path) -> tuple[Head, dict[str, SplitData]]:
    store = FeatureStore(cache)
    splits = load_splits(store, FeatureView.for_cache(store))
    head = make_head(head_kind, CLASSES, FAST_DENSE if head_kind == "dense" else FAST_LOGREG)
    head.fit(splits["train"], splits["validation"], progress=False)
    return head, splits


@pytest.mark.parametrize("head_kind", ["logreg", "dense"])
def test_saved_and_loaded_heads_predict_identically(tmp_path: Path, separable_cache: Path, head_kind: str) -> None:
    head, splits = _fitted(head_kind, separable_cache)
    before = head.predict_proba(splits["test"])
    head.save(tmp_path)
    after = Head.load(tmp_path).predict_proba(splits["test"])
    np.testing.assert_array_equal(before, after)


def test_logreg_loads_from_portable_arrays_under_another_scikit_learn(tmp_path: Path, separable_cache: Path) -> None:
    head, splits = _fitted("logreg", separable_cache)
    head.save(tmp_path)
    sidecar = json.loads((tmp_path / "head.json").read_text())
    sidecar["versions"]["scikit-learn"] = "0.0.1"
    unreadable = b"a pickle this version cannot read"
    (tmp_path / LogRegHead.MODEL_FILE).write_bytes(unreadable)
    sidecar["files"][LogRegHead.MODEL_FILE] = hashlib.sha256(unreadable).hexdigest()
    (tmp_path / "head.json").write_text(json.dumps(sidecar))
    loaded = Head.load(tmp_path)
    np.testing.assert_allclose(loaded.predict_proba(splits["test"]), head.predict_proba(splits["test"]), rtol=1e-10)


def test_a_damaged_head_file_is_refused(tmp_path: Path, separable_cache: Path) -> None:
    head, _ = _fitted("logreg", separable_cache)
    head.save(tmp_path)
    with open(tmp_path / LogRegHead.PORTABLE_FILE, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    with pytest.raises(PipelineError, match="checksum"):
        Head.load(tmp_path)


@pytest.mark.parametrize("classes", [CLASSES, CLASSES[:2]])
def test_streamed_and_in_memory_logistic_regression_agree(tmp_path: Path, classes: list[str]) -> None:
    features, labels, splits = clustered_features(400, len(classes), seed=3, separation=0.4)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, classes, shard_size=48)
    params = {"c_grid": "1e-3:1e1:9", "n_jobs": 1, "tol": 1e-8}
    in_memory = run_training(_options(cache, tmp_path / "models", "logreg", name="memory", head_params=params))
    streamed = run_training(_options(cache, tmp_path / "models", "logreg", name="streamed", head_params=params,
                                     stream=True))
    assert in_memory.in_memory and not streamed.in_memory
    assert streamed.config["head"]["chosen_C"] == in_memory.config["head"]["chosen_C"]
    memory_head, streamed_head = Head.load(in_memory.directory), Head.load(streamed.directory)
    memory_params, streamed_params = memory_head.linear_parameters(), streamed_head.linear_parameters()
    np.testing.assert_allclose(streamed_params["mean"], memory_params["mean"], rtol=1e-5, atol=1e-6)
    # scikit-learn solves in the data's float32, the streamed solver in float64: equal to float32 precision
    np.testing.assert_allclose(streamed_params["coef"], memory_params["coef"], atol=1e-3)
    np.testing.assert_allclose(streamed_params["intercept"], memory_params["intercept"], atol=1e-3)
    test = load_splits(FeatureStore(cache), FeatureView.for_cache(FeatureStore(cache)))["test"]
    memory_proba, streamed_proba = memory_head.predict_proba(test), streamed_head.predict_proba(test)
    np.testing.assert_allclose(streamed_proba, memory_proba, atol=1e-3)
    np.testing.assert_array_equal(streamed_proba.argmax(axis=1), memory_proba.argmax(axis=1))
    for split in ("train", "validation", "test"):
        assert streamed.metrics[split] == pytest.approx(in_memory.metrics[split], rel=1e-3)


def test_streamed_dense_head_learns_and_a_small_memory_budget_streams(tmp_path: Path, separable_cache: Path) -> None:
    run = run_training(_options(separable_cache, tmp_path / "models", "dense", memory_budget=1024))
    assert not run.in_memory and run.config["read"] == "streamed by shard"
    assert run.metrics["test"]["accuracy"] >= 0.95


def test_streamed_blocks_mix_every_shard(tmp_path: Path) -> None:
    """Shards written class by class still give mixed training blocks when streamed."""
    features, labels, splits = clustered_features(200, 2, seed=0)
    order = np.argsort(labels, kind="stable")
    cache = write_feature_cache(tmp_path / "cache", features[order], labels[order], [splits[i] for i in order],
                                ["a", "b"], shard_size=50)
    train = load_splits(FeatureStore(cache), FeatureView.for_cache(FeatureStore(cache)), stream=True)["train"]
    permutation = np.random.default_rng(0).permutation(len(train))
    blocks = list(train.chunks(rows=train.shard_rows, order=permutation))
    assert all(len(np.unique(block_labels)) == 2 for _, block_labels in blocks)
    vectors = np.concatenate([v for v, _ in blocks])
    in_memory = load_splits(FeatureStore(cache), FeatureView.for_cache(FeatureStore(cache)))["train"]
    np.testing.assert_array_equal(vectors, in_memory.matrix[permutation])


def test_pooling_at_read_time(tmp_path: Path, separable_cache: Path) -> None:
    store = FeatureStore(separable_cache)
    maps = store.read("test").features["block5_pool"]
    for pooling, expected in (("avg", maps.mean(axis=(1, 2))), ("max", maps.max(axis=(1, 2))),
                              ("none", maps.reshape(len(maps), -1))):
        view = FeatureView.for_cache(store, pooling=pooling)
        test = load_splits(store, view)["test"]
        np.testing.assert_allclose(test.matrix, expected, rtol=1e-6)
        assert test.dimension == view.dimension(store.manifest["feature_shapes"])
    features, labels, splits = clustered_features(60, 2, shape=(8,))
    pooled = write_feature_cache(tmp_path / "pooled", features, labels, splits, ["a", "b"], pooling="avg")
    with pytest.raises(PipelineError, match="avg-pooled"):
        FeatureView.for_cache(FeatureStore(pooled), pooling="max")


def _refuse_backbones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every way to a backbone fail, patched where the code looks the names up: the
    registry's constructors (all construction goes through them) and the names extract and the
    classifier imported."""
    import dataclasses

    from pipeline.backbone import network as backbones
    from pipeline.backbone import registry
    from pipeline.extraction import extract
    from pipeline.runs import classifier

    def refuse(*args, **kwargs):
        raise AssertionError("a head run must not touch the backbone")

    for name, spec in registry.BACKBONES.items():
        monkeypatch.setitem(registry.BACKBONES, name, dataclasses.replace(spec, constructor=refuse))
    for module in (backbones, extract, classifier):
        monkeypatch.setattr(module, "build_backbone", refuse)
    monkeypatch.setattr(extract, "FeatureExtractor", refuse)
    monkeypatch.setattr(extract, "take_kept_extractor", refuse)  # an earlier extract's, kept by the process


def test_the_backbone_refusal_catches_a_command_that_builds_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    """The guard of the next test fires for commands that do build a backbone (extract, predict),
    so its passing means something."""
    data = make_image_folder(tmp_path / "data", per_class=4)
    cache = extract_features(tiny_options(data, tmp_path / "features", pooling="avg")).cache_dir
    run = run_training(TrainOptions(head="logreg", features=cache, models=tmp_path / "models", progress=False,
                                    head_params={"c_grid": "0.1,1", "n_jobs": 1})).directory
    _refuse_backbones(monkeypatch)
    with pytest.raises(AssertionError, match="must not touch the backbone"):
        extract_features(tiny_options(make_image_folder(tmp_path / "other", per_class=3), tmp_path / "features"))
    with pytest.raises(AssertionError, match="must not touch the backbone"):
        main(["predict", "--model", str(run), str(next(data.rglob("*.png")))])
    from pipeline.backbone.registry import get_backbone

    with pytest.raises(AssertionError, match="must not touch the backbone"):  # any code reaching the registry
        get_backbone("resnet50").constructor(include_top=False, weights=None)


def test_a_head_run_builds_and_calls_no_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:


    data = make_image_folder(tmp_path / "data", per_class=10)
    cache = extract_features(tiny_options(data, tmp_path / "features", pooling="avg")).cache_dir

    _refuse_backbones(monkeypatch)
    models = tmp_path / "models"
    for head in ("logreg", "dense"):
        extra = ["--epochs", "2"] if head == "dense" else ["--c-grid", "0.1,1"]
        code = main(["train-head", "--head", head, "--cache", str(tmp_path / "features"), "--models", str(models),
                     "--no-progress", *extra])
        assert code == 0
    assert code == main(["runs", "--models", str(models)]) == 0
    assert len(runs.list_runs(models)) == 2
    assert str(cache.name) in json.loads(next(models.glob("*/config.json")).read_text())["features"]["directory"]


def test_runs_table_and_evaluate(tmp_path: Path, separable_cache: Path, capsys: pytest.CaptureFixture) -> None:
    models = tmp_path / "models"
    dense = run_training(_options(separable_cache, models, "dense", name="the-dense"))
    logreg = run_training(_options(separable_cache, models, "logreg", name="the-logreg"))
    rows = runs.list_runs(models)
    assert [r["name"] for r in rows] == sorted(
        ["the-dense", "the-logreg"], key=lambda n: -{"the-dense": dense, "the-logreg": logreg}[n]
        .metrics["validation"]["accuracy"])
    capsys.readouterr()
    assert main(["runs", "--models", str(models), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in listed} == {"the-dense", "the-logreg"}
    assert main(["runs", "--models", str(models)]) == 0
    table = capsys.readouterr().out
    assert "the-dense" in table and "val acc" in table and "randomly initialised" in table

    (logreg.directory / "metrics.json").unlink()
    (logreg.directory / "classification_report.txt").unlink()
    again = evaluate_run(logreg.directory)
    assert again.metrics == logreg.metrics
    assert (logreg.directory / "classification_report.txt").is_file()
    evaluate_run(dense.directory, split="validation")
    assert (dense.directory / "validation" / "confusion_matrix.csv").is_file()


def test_evaluate_refuses_a_cache_of_another_fingerprint(tmp_path: Path, separable_cache: Path) -> None:
    run = run_training(_options(separable_cache, tmp_path / "models", "logreg"))
    features, labels, splits = clustered_features(450, len(CLASSES), seed=1, shape=(8,))
    other = write_feature_cache(tmp_path / "other", features, labels, splits, CLASSES, pooling="avg")
    with pytest.raises(PipelineError, match="another fingerprint"):
        evaluate_run(run.directory, features=other)


def test_the_default_features_are_the_latest_cache(tmp_path: Path) -> None:
    features, labels, splits = clustered_features(60, 2)
    write_feature_cache(tmp_path / "older", features, labels, splits, ["a", "b"])
    newer = write_feature_cache(tmp_path / "newer", features, labels, splits, ["a", "b"])
    assert open_cache(None, tmp_path).directory == newer
    assert open_cache(Path("older"), tmp_path).directory == tmp_path / "older"


def test_accuracy_gate(tmp_path: Path, separable_cache: Path, capsys: pytest.CaptureFixture) -> None:
    common = ["train-head", "--head", "logreg", "--features", str(separable_cache), "--models",
              str(tmp_path / "models"), "--c-grid", "0.1,1", "--no-progress"]
    assert main([*common, "--assert-accuracy-at-least", "0.9"]) == 0
    assert main([*common, "--assert-accuracy-at-least", "1.01"]) == 1
    assert "below --assert-accuracy-at-least 1.01" in capsys.readouterr().err


def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str], expected: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_clear_errors(tmp_path: Path, separable_cache: Path, capsys: pytest.CaptureFixture) -> None:
    train = ["train-head", "--models", str(tmp_path / "models"), "--no-progress"]
    _one_line_error(capsys, [*train, "--features", str(tmp_path / "nowhere")], "no cache")
    (tmp_path / "plain").mkdir()
    _one_line_error(capsys, [*train, "--features", str(tmp_path / "plain")], "not a feature cache")
    _one_line_error(capsys, [*train, "--cache", str(tmp_path / "plain")], "no feature cache under")
    _one_line_error(capsys, [*train, "--features", str(separable_cache), "--head", "xgboost"],
                    "unknown head 'xgboost'")
    _one_line_error(capsys, [*train, "--features", str(separable_cache), "--units", "8"],
                    "--units does not apply to --head logreg")
    _one_line_error(capsys, [*train, "--features", str(separable_cache), "--layer", "block4_pool"],
                    "not in this cache")

    features, labels, splits = clustered_features(60, 2)
    one_class = write_feature_cache(tmp_path / "one", features, np.zeros_like(labels), splits, ["a", "b"])
    _one_line_error(capsys, [*train, "--features", str(one_class)], "one class only")
    only = write_feature_cache(tmp_path / "only", features, np.zeros_like(labels), splits, ["a"])
    _one_line_error(capsys, [*train, "--features", str(only)], "has one class")
    no_validation = write_feature_cache(tmp_path / "noval", features, labels,
                                        ["test" if s == "validation" else s for s in splits], ["a", "b"])
    _one_line_error(capsys, [*train, "--features", str(no_validation)], "validation split")
    _one_line_error(capsys, ["evaluate", "--model", str(tmp_path / "models" / "nothing")], "does not exist")
    run = run_training(_options(separable_cache, tmp_path / "models", "logreg", name="broken"))
    (run.directory / "head.json").unlink()
    _one_line_error(capsys, ["evaluate", "--model", str(run.directory)], "head.json is missing")


@pytest.mark.parametrize("head_kind", ["logreg", "dense"])
def test_heads_fit_on_plain_arrays(head_kind: str) -> None:
    """A head needs no reader or cache: arrays are features too."""
    from pipeline.heads import ArrayFeatures

    features, labels, splits = clustered_features(240, 3, seed=9)
    split = np.array(splits)
    train = ArrayFeatures(features[split == "train"], labels[split == "train"])
    validation = ArrayFeatures(features[split == "validation"], labels[split == "validation"])
    head = make_head(head_kind, CLASSES, FAST_DENSE if head_kind == "dense" else FAST_LOGREG)
    assert head.fit(train, validation, progress=False) is head  # scikit-learn's contract: fit returns self
    assert head.history_ and head.n_features_in_ == features[0].size
    assert list(head.classes_) == CLASSES
    test = ArrayFeatures(features[split == "test"], labels[split == "test"])
    assert np.mean(head.predict_proba(test).argmax(axis=1) == test.labels) > 0.9
    if head_kind == "logreg":  # the C search kept on the estimator, column by column
        assert head.cv_results_["C"] == [row["C"] for row in head.history_] and len(head.cv_results_["C"]) > 1


def test_a_head_learns_its_class_names_from_the_features() -> None:
    from pipeline.heads import ArrayFeatures

    features, labels, splits = clustered_features(120, 3, seed=4)
    split = np.array(splits)
    names = ["ants", "bees", "wasps"]
    train = ArrayFeatures(features[split == "train"], labels[split == "train"], names)
    validation = ArrayFeatures(features[split == "validation"], labels[split == "validation"], names)
    head = make_head("logreg", params=FAST_LOGREG).fit(train, validation, progress=False)
    assert list(head.classes_) == names and head.predict_proba(validation).shape == (len(validation), 3)


def test_reports_stay_fast_and_readable_at_hundreds_of_classes(tmp_path: Path, capsys) -> None:

    classes = [f"class{i:03d}" for i in range(200)]
    labels = np.repeat(np.arange(200), 3)
    rng = np.random.default_rng(0)
    features = (rng.normal(size=(600, 16)) + labels[:, None] * 0.05).astype(np.float32)
    splits = np.array(["train", "validation", "test"] * 200)
    cache = write_feature_cache(tmp_path / "cache", features, labels, list(splits), classes, shard_size=256)
    started = time.perf_counter()
    result = in_process(capsys, "train-head", "--head", "logreg", "--features", str(cache), "--models",
                        str(tmp_path / "m"),
                  "--name", "many", "--c-grid", "0.1,1", "--n-jobs", "1", "--no-progress")
    took = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    run = tmp_path / "m" / "many"
    assert not (run / "confusion_matrix.png").exists()
    assert (run / "confusion_matrix.csv").read_text().count("\n") == 201
    assert (run / "most_confused.csv").is_file()
    assert len(result.stdout.splitlines()) < 60, "the terminal gets a summary, not 200 rows"
    printed = float(result.stdout.split("head: ")[1].split(" s in all")[0])
    # the command's own time (printed to a tenth of a second)
    assert printed - 0.05 <= took and printed > 0.5 * took - 3, (printed, took)


@pytest.mark.parametrize("grid", ["inf", "1e-3,inf", "nan,1", "1:0:5", "0:1:3", "1e-6:1e5:0", "-1:1:3",
                                  "1e-6:1e5:100000000", "1:2"])
def test_c_grids_that_cannot_be_searched_are_refused(grid: str) -> None:
    with pytest.raises(PipelineError, match="--c-grid"):
        log_grid(grid)


def test_the_largest_c_grid_is_bounded() -> None:
    assert len(log_grid(f"1e-3:1e3:{MAX_GRID}")) == MAX_GRID
    with pytest.raises(PipelineError, match=f"COUNT must be 1 to {MAX_GRID}"):
        log_grid(f"1e-3:1e3:{MAX_GRID + 1}")


@pytest.mark.parametrize("kind, params, flag", [
    ("logreg", {"n_jobs": 0}, "--n-jobs 0"),
    ("dense", {"dropout": 1.5}, "--dropout 1.5"),
    ("dense", {"dropout": -0.1}, "--dropout -0.1"),
    ("dense", {"lr": -1e-3}, "--lr -0.001"),
    ("dense", {"lr": 0.0}, "--lr 0.0"),
])
def test_head_parameters_out_of_range_are_refused(kind: str, params: dict, flag: str) -> None:
    with pytest.raises(PipelineError, match=flag):
        make_head(kind, THREE_CLASSES, params)


def test_a_bad_c_grid_fails_in_one_line_before_the_features_are_read(tmp_path: Path, capsys, monkeypatch) -> None:
    import pipeline.training.train as train_module

    features, labels, splits = clustered_features(60, 3, seed=2)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, THREE_CLASSES)
    monkeypatch.setattr(train_module, "load_head_inputs", lambda *a, **k: pytest.fail("features read"))
    assert main(["train-head", "--features", str(cache), "--models", str(tmp_path / "m"),
                 "--c-grid", "1e-6:1e5:100000000"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "COUNT must be 1 to" in err


def test_a_streamed_source_that_fails_surfaces_its_own_error_from_fit() -> None:
    import keras
    import numpy as np

    from pipeline.heads.fitting import StreamedExamples, fit

    def chunks(epoch):
        yield np.zeros((4, 2), np.float32), np.zeros(4, np.int32)
        raise PipelineError("shard-00002.h5 changed while it was being read: rerun")

    data = StreamedExamples(chunks, 8, 4)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(PipelineError, match="^shard-00002.h5 changed while it was being read: rerun$"):
        fit(model, data, epochs=1, verbose=0)


def test_the_dense_head_keeps_the_epoch_of_the_best_validation_accuracy() -> None:
    import keras

    from pipeline.heads.fitting import KeepBest

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    keep = KeepBest()
    keep.set_model(model)
    keep.on_train_begin()
    for epoch, (accuracy, loss) in enumerate([(0.6, 0.5), (0.8, 0.9), (0.7, 0.2)]):
        model.layers[0].kernel.assign([[float(epoch)]])
        keep.on_epoch_end(epoch, {"val_accuracy": accuracy, "val_loss": loss})
    keep.on_train_end()
    assert keep.best_epoch == 2, "accuracy decides, not the lowest loss (epoch 3)"
    assert float(model.layers[0].kernel.numpy()[0, 0]) == 1.0

    # a dense head fitted for real ends with its best validation epoch's weights, and says which
    from pipeline.heads import ArrayFeatures, DenseHead

    features, labels, _ = clustered_features(160, 3, seed=8, shape=(6,), separation=0.4)
    train, validation = ArrayFeatures(features[:100], labels[:100]), ArrayFeatures(features[100:], labels[100:])
    head = DenseHead(units=8, epochs=8, patience=8, lr=0.05, seed=1).fit(train, validation)
    rows = head.history_
    best = max(range(len(rows)), key=lambda i: (rows[i]["val_accuracy"], -rows[i]["val_loss"]))
    assert len(rows) == 8 and head.outcome()["best_epoch"] == best + 1
    kept = float(np.mean(head.predict_proba(validation).argmax(1) == validation.labels))
    assert kept == pytest.approx(rows[best]["val_accuracy"])
    if best + 1 < len(rows):  # the last epoch's accuracy differs from the best's: the weights were restored
        assert kept >= rows[-1]["val_accuracy"]


def test_the_c_search_runs_the_largest_c_first_and_keeps_its_rows_in_c_order(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cache.reader import FeatureView, load_splits, open_cache
    from pipeline.heads import LogRegHead, logreg

    features, labels, splits = clustered_features(90, 3, seed=3)
    store = open_cache(write_feature_cache(tmp_path / "cache", features, labels, splits, ["a", "b", "c"]), tmp_path)
    data = load_splits(store, FeatureView.for_cache(store))
    fitted_in_order = []
    score_one_c = logreg._score_one_c

    def recording(*args, **kwargs):
        fitted_in_order.append(args[5])  # (x, y, vx, vy, classes, C, ...)
        return score_one_c(*args, **kwargs)

    monkeypatch.setattr(logreg, "_score_one_c", recording)
    head = LogRegHead(c_grid="1e-2:1e2:5", n_jobs=1).fit(data["train"], data["validation"], progress=False)
    assert len(fitted_in_order) == 5 and fitted_in_order == sorted(fitted_in_order, reverse=True), fitted_in_order
    assert [row["C"] for row in head.history_] == sorted(fitted_in_order)


def test_a_class_found_only_in_test_is_one_line_not_a_scikit_learn_traceback(tmp_path: Path, capsys) -> None:
    from conftest import tiny_options, write_image
    from pipeline.data.dataset import SplitConfig
    from pipeline.extraction.extract import extract_features

    data = tmp_path / "data"
    for split, classes in (("train", ("boot", "shirt")), ("validation", ("boot", "shirt")),
                           ("test", ("boot", "shirt", "sock"))):
        for name in classes:
            for i in range(3):
                write_image(data / split / name / f"{name}{i}.png", seed=hash((split, name, i)) % 1000)
    cache = extract_features(tiny_options(data, tmp_path / "features", splits=SplitConfig())).cache_dir
    for head in ("logreg", "dense"):
        _one_line_error(capsys, ["train-head", "--head", head, "--features", str(cache), "--models",
                                 str(tmp_path / "models"), "--no-progress"], "class 'sock' has no training images")
    assert not list((tmp_path / "models").glob("*/config.json"))
