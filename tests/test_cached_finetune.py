"""`finetune --cached`: the layers above the unfreeze point trained on cached activations of the
layer below it, assembled back into an ordinary fine-tuned run."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import make_image_folder, tiny_options, write_feature_cache
from pipeline.backbone.blocks import layer_below, unfreeze
from pipeline.cache.store import FeatureStore
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.extraction.extract import extract_features
from pipeline.finetuning.examples import Augmentation, activation_batches, cached_activations
from pipeline.finetuning.finetune import FinetuneOptions, run_finetuning
from pipeline.images.decode_tf import labelled_batches
from pipeline.runs import Run, list_runs, read_config
from pipeline.runs.classifier import top_model
from pipeline.serving.predict import predict_files
from pipeline.training.train import TrainOptions, run_training


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cached-finetune")
    data = make_image_folder(root / "data", per_class=10)
    head_cache = extract_features(tiny_options(data, root / "features")).cache_dir
    run = run_training(TrainOptions(head="dense", features=head_cache, models=root / "models",
                                    head_params={"epochs": 3}, progress=False)).directory
    logreg = run_training(TrainOptions(head="logreg", features=head_cache, models=root / "models",
                                       head_params={"c_grid": "1", "n_jobs": 1}, progress=False)).directory
    return {"root": root, "data": data, "head_cache": head_cache, "run": run, "logreg": logreg,
            "models": root / "models"}


def _add_block4_cache(setup: dict[str, Path]) -> FeatureStore:
    options = tiny_options(setup["data"], setup["root"] / "features", layers=["block4_pool"])
    return FeatureStore(extract_features(options).cache_dir)


def test_a_missing_layer_is_one_line_with_the_extract_command_that_adds_it(
        setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    store = FeatureStore(setup["head_cache"])
    with pytest.raises(PipelineError, match="no cache holds block4_pool") as caught:
        cached_activations(store, "block4_pool", setup["root"] / "empty-root")
    command = str(caught.value).split("`")[1]
    assert "--layer block4_pool --pooling none" in command
    assert main(["finetune", "--from", str(setup["run"]), "--models", str(setup["models"]), "--cached",
                 "--cache", str(setup["root"] / "empty-root"), "--no-progress"]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # the command it names works and makes the cache that --cached finds where it was told to look
    words = shlex.split(command)
    assert words[:3] == ["python", "run_pipeline.py", "extract"]
    assert words[words.index("--cache") + 1] == str(setup["root"] / "empty-root")
    assert main(words[2:] + ["--no-progress", "--batch-size", "4", "--shard-size", "8"]) == 0
    found = cached_activations(store, "block4_pool", setup["root"] / "empty-root")
    assert found.fingerprint.layers == ("block4_pool",) and found.fingerprint.image_size == 32


def test_cached_finetune_is_an_ordinary_run_whose_model_reproduces_the_cached_path(setup: dict[str, Path]) -> None:
    activations = _add_block4_cache(setup)
    summary = run_finetuning(FinetuneOptions(source=str(setup["run"]), models=setup["models"], epochs=2, batch_size=4,
                                            lr=0.01, progress=False, cached=True))
    config = read_config(summary.directory)
    tuned = config["finetune"]
    assert config["kind"] == "finetune" and tuned["trained_on"]["layer"] == "block4_pool"
    assert tuned["epochs_run"] == 2
    assert tuned["trained_layers"] == ["block5_conv1", "block5_conv2", "block5_conv3"]
    assert "cached block4_pool maps" in tuned["augmentation"]["applied_to"]
    # the Python API's default is the command line's: no flips on cached maps
    assert tuned["augmentation"]["flip"] == "none"
    assert any(r["name"] == summary.directory.name and r["kind"] == "finetune" for r in list_runs(setup["models"]))

    # the assembled model, on raw images, gives the cached path's probabilities on cached activations
    model = keras.saving.load_model(summary.directory / "model.keras", safe_mode=True)
    features = next(layer for layer in model.layers if layer.name.endswith("_features"))
    view = Run.open(setup["run"]).view
    top = top_model(model, features, "block4_pool", view)
    test = activations.split_indexes()["test"]
    maps = np.concatenate([rows.features["block4_pool"] for rows in activations.iter_shards("test", ["block4_pool"])])
    cached = top.predict(maps, verbose=0)
    pixels = np.stack([tf.io.decode_image(tf.io.read_file(str(setup["data"] / p)), expand_animations=False).numpy()
                       for p in test.paths]).astype(np.float32)
    np.testing.assert_allclose(model.predict(pixels, verbose=0), cached, atol=1e-4)
    # and the run's metrics are those probabilities'
    accuracy = np.mean(cached.argmax(axis=1) == test.labels)
    assert summary.metrics["test"]["accuracy"] == pytest.approx(accuracy)
    # predict and export take it like any fine-tuned run
    results = predict_files(summary.directory, [setup["data"] / p for p in test.paths[:3]], top_k=1)
    assert all(r.error is None for r in results)
    from pipeline.serving.export import export_run

    exported = export_run(summary.directory, "keras", summary.directory.parent / "cached-export")
    reloaded = keras.saving.load_model(exported.path, safe_mode=True)
    np.testing.assert_allclose(reloaded.predict(pixels[:3], verbose=0), model.predict(pixels[:3], verbose=0),
                               atol=1e-4)  # the export computes in float32 what the run computes


def test_without_augmentation_the_first_epoch_matches_end_to_end_training(setup: dict[str, Path]) -> None:
    """A logistic-regression head: no dropout, whose masks would differ between the two models."""
    activations = _add_block4_cache(setup)
    head_run = Run.open(setup["logreg"])
    store, view = head_run.features(), head_run.view
    records = store.split_indexes()["train"]
    files = [str(setup["data"] / p) for p in records.paths]
    batch = len(files)  # one batch: the same gradient whatever the order of the rows

    def trained(cached: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
        keras.utils.set_random_seed(0)
        model, backbone = head_run.trainable_classifier("fp32")
        below = layer_below(backbone, "block5")
        target = top_model(model, backbone, below, view) if cached else model
        unfreeze(backbone, "block5")
        initial = [backbone.get_layer(n).get_weights()[0].copy() for n in ("block5_conv1", "block5_conv3")]
        target.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9, clipnorm=1.0),
                       loss="sparse_categorical_crossentropy")
        data = (activation_batches(activations, below, "train", batch, shuffle_seed=0) if cached
                else labelled_batches(files, records.labels, 32, batch, shuffle_seed=0))
        target.fit(data, epochs=1, verbose=0, shuffle=False)
        return initial, [backbone.get_layer(n).get_weights()[0] for n in ("block5_conv1", "block5_conv3")]

    start, end_to_end = trained(cached=False)
    _, cached = trained(cached=True)
    for before, e2e, ours in zip(start, end_to_end, cached):
        moved = np.abs(e2e - before).max()
        assert moved > 1e-4  # the epoch changed the weights
        np.testing.assert_allclose(ours, e2e, atol=moved * 1e-3)  # measured: 1.5e-8 against a move of 5e-4


def test_activation_batches_stream_every_row_once_per_epoch_in_a_new_order(setup: dict[str, Path]) -> None:
    activations = _add_block4_cache(setup)
    assert len(activations.shards) > 1
    dataset = activation_batches(activations, "block4_pool", "train", 3, shuffle_seed=1)
    epochs = [np.concatenate([np.asarray(maps).reshape(len(maps), -1)[:, 0] for maps, _ in dataset])
              for _ in range(2)]
    expected = np.concatenate([rows.features["block4_pool"].reshape(len(rows), -1)[:, 0]
                               for rows in activations.iter_shards("train", ["block4_pool"])])
    for values in epochs:
        assert sorted(values) == sorted(expected)
    assert not np.array_equal(epochs[0], epochs[1])


def test_cached_finetune_refuses_augmentation_that_needs_images(setup: dict[str, Path]) -> None:
    with pytest.raises(PipelineError, match="flipping the cached maps"):
        FinetuneOptions(source=str(setup["run"]), cached=True, augmentation=Augmentation(rotation=0.1))


def test_cached_finetune_records_its_augmentation_and_its_speed(setup: dict[str, Path]) -> None:
    _add_block4_cache(setup)
    summary = run_finetuning(FinetuneOptions(source=str(setup["run"]), models=setup["models"], name="cached-flips",
                                            epochs=1, batch_size=4, progress=False, cached=True,
                                            augmentation=Augmentation(flip="horizontal")))
    tuned = json.loads((summary.directory / "config.json").read_text())
    assert tuned["finetune"]["augmentation"]["flip"] == "horizontal"
    assert tuned["seconds_per_epoch"] > 0


def test_the_cli_flips_nothing_by_default_with_cached(setup: dict[str, Path]) -> None:
    """Flipping cached maps measured harmful with flattened heads: with --cached it is opt-in."""
    _add_block4_cache(setup)
    assert main(["finetune", "--from", str(setup["run"]), "--models", str(setup["models"]), "--cached",
                 "--epochs", "1", "--batch-size", "4", "--name", "cli-cached", "--no-progress"]) == 0
    augmentation = read_config(setup["models"] / "cli-cached")["finetune"]["augmentation"]
    assert augmentation["flip"] == "none"


def test_cached_batches_mix_classes_across_shards(tmp_path: Path) -> None:
    from pipeline.cache.store import FeatureStore
    from pipeline.finetuning.examples import activation_batches

    # shards in path order, so in class order: each shard of 32 holds one class
    classes = [f"c{i}" for i in range(8)]
    labels = np.repeat(np.arange(8), 32).astype(np.int32)
    features = np.random.default_rng(0).normal(size=(len(labels), 2, 2, 4)).astype(np.float32)
    cache = write_feature_cache(tmp_path / "cache", features, labels, ["train"] * len(labels), classes,
                                shard_size=32, layer="block4_pool")
    store = FeatureStore(cache)
    batches = activation_batches(store, "block4_pool", "train", 16, shuffle_seed=0, rows=len(labels))
    mixes = [len(set(batch_labels.tolist())) for _, batch_labels in batches]
    assert np.mean(mixes) >= 5, f"classes per batch of 16 from 8 one-class shards: {mixes}"
    epoch_one = np.concatenate([y for _, y in batches])
    epoch_two = np.concatenate([y for _, y in batches])
    assert sorted(epoch_one.tolist()) == sorted(labels.tolist()), "every row once per epoch"
    assert not np.array_equal(epoch_one, epoch_two), "a new order every epoch"
    for maps, batch_labels in batches:  # each map is its own row's
        rows = [np.flatnonzero((features == m).all(axis=(1, 2, 3)))[0] for m in maps]
        assert np.array_equal(labels[rows], batch_labels)
    in_order = activation_batches(store, "block4_pool", "train", 16, rows=len(labels))
    assert np.array_equal(np.concatenate([y for _, y in in_order]), labels), "unshuffled: the cache's order"
