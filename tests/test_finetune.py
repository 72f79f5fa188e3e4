"""Stage three: backbone + head as one model, fine-tuning, predict, inspect."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import make_image_folder, tiny_options
from pipeline.backbone.blocks import unfreeze
from pipeline.cache.reader import load_splits
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.extraction.extract import extract_features
from pipeline.finetuning.examples import Augmentation
from pipeline.finetuning.finetune import FinetuneOptions, run_finetuning
from pipeline.runs import Run, list_runs
from pipeline.runs.classifier import build_classifier, weights_for
from pipeline.serving.predict import predict_files
from pipeline.training.train import TrainOptions, run_training


@pytest.fixture(scope="module")
def head_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stage3")
    data = make_image_folder(root / "data", per_class=10)
    runs = {"data": data, "models": root / "models"}
    for pooling in ("none", "avg"):
        cache = extract_features(tiny_options(data, root / "features", pooling=pooling)).cache_dir
        for kind, params in (("logreg", {"c_grid": "0.01,0.1,1", "n_jobs": 1}), ("dense", {"epochs": 3})):
            run = run_training(TrainOptions(head=kind, features=cache, models=root / "models", head_params=params,
                                            progress=False))
            runs[f"{kind}-{pooling}"] = run.directory
    return runs


def _pixels(data: Path, paths: list[str]) -> np.ndarray:
    return np.stack([tf.io.decode_image(tf.io.read_file(str(data / p)), expand_animations=False).numpy()
                     for p in paths]).astype(np.float32)


@pytest.mark.parametrize("run", ["logreg-none", "logreg-avg", "dense-none", "dense-avg"])
def test_backbone_plus_head_reproduces_the_head_on_raw_images(head_runs: dict[str, Path], run: str) -> None:
    """Before any training, the combined model (a logistic regression converted into a fixed
    standardisation and a Dense softmax) gives the head's predictions from raw pixels."""
    directory = head_runs[run]
    opened = Run.open(directory)
    store, view = opened.features(), opened.view
    head = opened.head()
    model, _ = build_classifier(store.fingerprint, weights_for(store.fingerprint, None), view, head)
    for split in ("train", "test"):
        data = load_splits(store, view)[split]
        expected = head.predict_proba(data)
        got = model.predict(_pixels(head_runs["data"], data.paths), verbose=0)
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_unfreeze_by_block_or_index_keeps_batch_norm_frozen() -> None:
    from pipeline.backbone.network import build_backbone
    from pipeline.backbone.registry import BACKBONES
    from pipeline.backbone.weights import ResolvedWeights

    random = ResolvedWeights("none", "torch", "random-seed-0")
    vgg = build_backbone(BACKBONES["vgg16"], 32, "fp32", random)
    assert unfreeze(vgg, "block5") == ["block5_conv1", "block5_conv2", "block5_conv3"]
    assert unfreeze(vgg, "15") == ["block5_conv1", "block5_conv2", "block5_conv3"]  # the seeds' layers[15:]
    resnet = build_backbone(BACKBONES["resnet50"], 32, "fp32", ResolvedWeights("none", "caffe", "random-seed-0"))
    trained = unfreeze(resnet, "conv5")
    assert trained and all(name.startswith("conv5") for name in trained)
    assert all(not layer.trainable for layer in resnet.layers if isinstance(layer, keras.layers.BatchNormalization))
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="no such block"):
        unfreeze(vgg, "block9")


def test_batch_norm_statistics_do_not_move_while_neighbours_train(tmp_path: Path) -> None:
    """Fine-tuning ResNet50's top block in the classifier the pipeline builds: convolution
    weights change, BatchNormalization's moving statistics do not. What keeps them still is that
    `unfreeze` leaves BatchNormalization non-trainable (Keras 3 then runs it in inference mode):
    measured here, the builder's `training=False` on the nested backbone call alone does not stop a
    trainable BatchNormalization from updating its statistics under `fit`."""
    from pipeline.backbone.weights import ResolvedWeights
    from pipeline.cache.fingerprint import Fingerprint
    from pipeline.cache.reader import FeatureView
    from pipeline.heads import DenseHead

    fingerprint = Fingerprint("resnet50", "none", "random-seed-0", 32, "area-down-bilinear-up", "caffe",
                              ("conv5_block3_out",), "avg", "fp32", "2.21")
    head = DenseHead(units=8)
    head.class_names = ["a", "b"]  # what fit would learn
    head.model_ = head.build(np.zeros(2048), np.ones(2048))
    model, backbone = build_classifier(fingerprint, ResolvedWeights("none", "caffe", "random-seed-0"),
                                       FeatureView(("conv5_block3_out",), "avg"), head)
    unfreeze(backbone, "conv5")
    model.compile(optimizer=keras.optimizers.SGD(1e-2, momentum=0.9), loss="sparse_categorical_crossentropy")
    bn = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)
          and layer.name.startswith("conv5")][0]
    conv = backbone.get_layer("conv5_block3_3_conv")
    stats_before = [np.array(w) for w in bn.non_trainable_weights]
    kernel_before = np.array(conv.kernel)
    rng = np.random.default_rng(0)
    model.fit(rng.uniform(0, 255, (16, 40, 40, 3)).astype(np.float32), rng.integers(0, 2, 16), epochs=2,
              batch_size=8, verbose=0)
    for before, after in zip(stats_before, bn.non_trainable_weights):
        np.testing.assert_array_equal(before, np.array(after))
    assert not np.allclose(kernel_before, np.array(conv.kernel))



def test_keep_best_returns_the_starting_weights_when_no_epoch_beats_them() -> None:
    """A model right on validation, trained towards the opposite labels: every epoch gets worse
    on validation, so the run ends with exactly the weights it started from (epoch 0)."""
    from pipeline.finetuning.finetune import KeepBest

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.layers[0].set_weights([np.array([[-5, 5], [0, 0], [0, 0], [0, 0]], np.float32), np.zeros(2, np.float32)])
    model.compile(keras.optimizers.SGD(1.0), "sparse_categorical_crossentropy", metrics=["accuracy"])
    start = [w.copy() for w in model.get_weights()]
    loss, accuracy = model.evaluate(x, y, verbose=0)
    assert accuracy == 1.0
    keep = KeepBest(accuracy, loss)
    history = model.fit(x, 1 - y, validation_data=(x, y), epochs=3, callbacks=[keep], verbose=0)
    assert max(history.history["val_accuracy"]) < 1.0 and keep.best_epoch == 0
    for before, after in zip(start, model.get_weights()):
        np.testing.assert_array_equal(before, after)

    improving = KeepBest(0.0, 10.0)  # any trained epoch beats a useless start: the best one is kept
    model.fit(x, y, validation_data=(x, y), epochs=3, callbacks=[improving], verbose=0)
    assert improving.best_epoch >= 1


def test_finetune_leaves_a_complete_run_and_predict_matches_its_report(head_runs: dict[str, Path], capsys) -> None:
    models = head_runs["models"]
    summary = run_finetuning(FinetuneOptions(source=str(head_runs["logreg-none"]), models=models, epochs=2,
                                             batch_size=4,
                                            progress=True,
                                            augmentation=Augmentation(rotation=0.1, brightness=0.1, saturation=0.2)))
    said = capsys.readouterr().err
    assert "scoring the test split before fine-tuning" in said and "an epoch on this machine" in said, said
    report = (summary.directory / "classification_report.txt").read_text().splitlines()[0]
    assert "augmentation: horizontal flips, rotation 0.1, brightness 0.1, saturation 0.2" in report
    history = list(csv.DictReader(open(summary.directory / "history.csv")))
    assert history[0]["epoch"] == "0" and history[0]["val_accuracy"], "the curves start at the model before"
    names = {p.name for p in summary.directory.iterdir()}
    assert {"model.keras", "labels.txt", "config.json", "metrics.json", "classification_report.txt",
            "confusion_matrix.csv", "confusion_matrix.png", "history.csv", "curves.png", "misclassified.csv"} <= names
    config = json.loads((summary.directory / "config.json").read_text())
    assert config["kind"] == "finetune" and config["finetune"]["augmentation"]["rotation"] == 0.1
    assert config["finetune"]["clipnorm"] == 1.0
    assert config["finetune"]["trained_layers"] == ["block5_conv1", "block5_conv2", "block5_conv3"]
    head_test = json.loads((head_runs["logreg-none"] / "metrics.json").read_text())["test"]
    assert config["test_before_finetune"]["accuracy"] == head_test["accuracy"]
    assert config["test_before_finetune"]["loss"] == pytest.approx(head_test["loss"], abs=1e-4)
    kept = config["finetune"]["kept_epoch"]
    assert 0 <= kept <= config["finetune"]["epochs_run"]
    assert summary.metrics["validation"]["accuracy"] >= config["finetune"]["validation_before"]["accuracy"] - 1e-9
    assert "learning_rate" in (summary.directory / "history.csv").read_text().splitlines()[0]
    assert any(r["name"] == summary.directory.name and r["kind"] == "finetune" for r in list_runs(models))
    assert config["head_run_accuracy"]["test"] == head_test["accuracy"], "the head run's own figure, kept beside"
    from pipeline.cli.commands.finetune import head_run_figure as _head_run_figure
    from pipeline.report import runs_table

    assert "scored from its cached features" in _head_run_figure(config)
    row = next(line for line in runs_table(list_runs(models)).splitlines() if line.startswith(summary.directory.name))
    assert " finetune " in row and " logreg " in row, "a fine-tuned run shows its kind and the head it started from"

    # the exported model takes raw images: predict through it gives the test report's probabilities
    misclassified = list(csv.DictReader(open(summary.directory / "misclassified.csv")))
    head_run = Run.open(head_runs["logreg-none"])
    store, view = head_run.features(), head_run.view
    test = load_splits(store, view)["test"]
    results = predict_files(summary.directory, [head_runs["data"] / p for p in test.paths], top_k=2)
    wrong = {Path(r.path).relative_to(head_runs["data"]).as_posix(): r for r in results
             if r.labels[0] != Path(r.path).parent.name}
    assert set(wrong) == {row["path"] for row in misclassified}
    for row in misclassified:
        assert wrong[row["path"]].probabilities[0] == pytest.approx(float(row["probability"]), abs=1e-4)
    accuracy = np.mean([r.labels[0] == Path(r.path).parent.name for r in results])
    assert accuracy == pytest.approx(summary.metrics["test"]["accuracy"])


def test_predict_with_a_head_run_matches_the_cached_features(head_runs: dict[str, Path]) -> None:
    run = head_runs["dense-avg"]
    opened = Run.open(run)
    store, view = opened.features(), opened.view
    test = load_splits(store, view)["test"]
    expected = opened.head().predict_proba(test)
    results = predict_files(run, [head_runs["data"] / p for p in test.paths], top_k=2)
    classes = store.class_names
    for result, row in zip(results, expected):
        got = dict(zip(result.labels, result.probabilities))
        np.testing.assert_allclose([got[c] for c in classes], row, atol=1e-4)


def test_predict_reports_unreadable_files_and_carries_on(head_runs: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes((head_runs["data"] / "cats" / "img000.png").read_bytes())
    (folder / "broken.jpg").write_text("not an image")
    (folder / ".hidden.png").write_text("skipped")
    output = tmp_path / "out.csv"
    code = main(["predict", "--model", str(head_runs["logreg-avg"]), str(folder), "--top", "1", "--output",
                 str(output)])
    captured = capsys.readouterr()
    assert code == 1 and "1 of 3 files could not be read" in captured.err
    rows = list(csv.DictReader(open(output)))
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.png", "broken.jpg"]
    assert rows[0]["label_1"] == rows[1]["label_1"] and rows[2]["error"].startswith("not a readable image")
    assert main(["predict", "--model", str(head_runs["logreg-avg"]), str(folder / "a.png"), "--output",
                 str(tmp_path / "one.json")]) == 0
    assert json.loads((tmp_path / "one.json").read_text())[0]["error"] is None


def test_inspect_lists_layers_with_indices(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", "--backbone", "vgg16", "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)
    assert layers[15]["name"] == "block5_conv1" and layers[15]["block"] == "block5"
    assert layers[15]["type"] == "Conv2D"


@pytest.fixture(scope="module")
def vgg16() -> object:
    import keras

    return keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))


def test_the_default_unfreeze_point_is_what_the_head_reads(vgg16) -> None:
    from pipeline.backbone.blocks import choose_unfreeze, unfreeze

    assert choose_unfreeze(vgg16, None, "block5", ["block5_pool"]) == "block5"
    assert choose_unfreeze(vgg16, None, "block5", ["block4_pool"]) == "block4"
    assert choose_unfreeze(vgg16, None, "block5", ["block3_pool", "block4_conv2"]) == "block4"
    assert choose_unfreeze(vgg16, "block3", "block5", ["block4_pool"]) == "block3"
    trained = unfreeze(vgg16, "block4", ["block4_pool"])
    assert trained == ["block4_conv1", "block4_conv2", "block4_conv3"], "block5 never sees a gradient"


def test_an_unfreeze_point_above_every_layer_the_head_reads_is_refused(vgg16) -> None:
    from pipeline.backbone.blocks import choose_unfreeze

    with pytest.raises(PipelineError, match="--unfreeze block5: the head reads block4_pool.*unfreeze block4"):
        choose_unfreeze(vgg16, "block5", "block5", ["block4_pool"])


def test_flips_default_to_horizontal_in_the_api_and_on_the_command_line(monkeypatch) -> None:
    import pipeline.finetuning.finetune as finetune_module
    from pipeline.finetuning.finetune import FinetuneOptions

    assert FinetuneOptions().augmentation.flip == "horizontal"
    assert FinetuneOptions(cached=True).augmentation.flip == "none"
    seen = []

    def capture(options):
        seen.append(options)
        raise PipelineError("captured")

    monkeypatch.setattr(finetune_module, "run_finetuning", capture)
    assert main(["finetune", "--from", "x"]) == 1
    assert main(["finetune", "--from", "x", "--cached"]) == 1
    assert [o.augmentation for o in seen] == [FinetuneOptions().augmentation,
                                              FinetuneOptions(cached=True).augmentation]
    assert Augmentation().describe() == "horizontal flips"


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-0.1"], "--lr -0.1: must be a positive learning rate"),
    (["--clipnorm", "-1"], "--clipnorm -1.0: must be a positive norm"),
    (["--momentum", "5"], "--momentum 5.0: must be from 0 up to"),
    (["--zoom", "-5"], "--zoom -5.0: must be from 0 (off) to 1"),
])
def test_fine_tune_parameters_out_of_range_are_one_line(capsys, flags: list[str], message: str) -> None:
    assert main(["finetune", "--from", "x", *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_heads_and_fine_tuning_stop_on_what_runs_are_chosen_by(head_runs: dict[str, Path], monkeypatch,
                                                              tmp_path: Path) -> None:
    """EarlyStopping watches validation accuracy, the figure the kept epoch and `runs` go by (not
    validation loss, which stopped a head while its accuracy still climbed)."""
    import keras

    from pipeline.training.train import TrainOptions, run_training

    watched = []

    class Watching(keras.callbacks.EarlyStopping):
        def __init__(self, **kwargs) -> None:
            watched.append((kwargs.get("monitor"), kwargs.get("mode")))
            super().__init__(**kwargs)

    monkeypatch.setattr(keras.callbacks, "EarlyStopping", Watching)
    head_run = Run.open(head_runs["logreg-none"])
    run_training(TrainOptions(head="dense", features=head_run.features().directory, models=tmp_path / "models",
                              head_params={"epochs": 2}, progress=False))
    run_finetuning(FinetuneOptions(source=str(head_runs["logreg-none"]), models=tmp_path / "models", epochs=1,
                                   batch_size=4,
                                  augmentation=Augmentation.off(), progress=False))
    assert watched == [("val_accuracy", "max"), ("val_accuracy", "max")]
