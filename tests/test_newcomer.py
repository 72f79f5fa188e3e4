"""A second dataset, as a new user brings it (issue 23): train/test layouts without a validation
folder, small images, heads that read a lower layer, shuffles that mix classes, defaults that fit
more than solar cells, and runs of several data folders side by side."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import clustered_features, tiny_options, write_feature_cache, write_image
from pipeline import runs
from pipeline.cli import main
from pipeline.data.dataset import SplitConfig, scan_dataset
from pipeline.errors import PipelineError
from pipeline.extraction.extract import extract_features
from pipeline.finetuning.examples import Augmentation
from pipeline.training.train import TrainOptions, train_head

FAST_LOGREG = {"c_grid": "1e-3:1e1:5", "n_jobs": 1}


def _train_test_folder(root: Path, train: int = 20, test: int = 4, size: int = 40) -> Path:
    for c, name in enumerate(("boot", "shirt")):
        for i in range(train):
            write_image(root / "train" / name / f"{name}{i:03d}.png", seed=c * 1000 + i, size=size)
        for i in range(test):
            write_image(root / "test" / name / f"t{name}{i:03d}.png", seed=50_000 + c * 1000 + i, size=size)
    return root


# --- a train/test layout without a validation folder -----------------------------------------------


def test_a_train_test_layout_gets_a_stratified_validation_split_carved_out_of_train(tmp_path: Path) -> None:
    root = _train_test_folder(tmp_path / "data")
    scanned = scan_dataset(root, SplitConfig.from_flags(None, None, 0))
    assert scanned.carved == {"validation": 0.15}
    for label in (0, 1):
        splits = Counter(r.split for r in scanned.records if r.label == label)
        assert splits["test"] == 4, "test/ stays the test split, whole"
        assert splits["validation"] >= 1 and splits["train"] >= 10
    validation = {r.path for r in scanned.records if r.split == "validation"}
    assert all(path.startswith("train/") for path in validation), "validation comes out of train/ only"
    assert validation == {r.path for r in scan_dataset(root, SplitConfig.from_flags(None, None, 0)).records
                          if r.split == "validation"}, "the carve-out is stable"
    bigger = scan_dataset(root, SplitConfig.from_flags(0.4, None, 0))
    assert sum(r.split == "validation" for r in bigger.records) > len(validation), "--val-fraction sets it"


def test_a_fraction_that_a_split_folder_overrides_is_refused_not_ignored(tmp_path: Path) -> None:
    root = _train_test_folder(tmp_path / "data")
    with pytest.raises(PipelineError, match="--test-fraction does not apply.*test folder"):
        scan_dataset(root, SplitConfig.from_flags(None, 0.2, 0))
    for name in ("boot", "shirt"):
        write_image(root / "validation" / name / "v.png", seed=7)
    with pytest.raises(PipelineError, match="--val-fraction does not apply.*validation folder"):
        scan_dataset(root, SplitConfig.from_flags(0.2, None, 0))
    assert not scan_dataset(root, SplitConfig.from_flags(None, None, 0)).carved


def test_extract_says_where_validation_came_from_and_that_the_images_are_small(tmp_path: Path, capsys) -> None:
    root = _train_test_folder(tmp_path / "data", train=12, test=2, size=8)
    assert main(["extract", "--data", str(root), "--cache", str(tmp_path / "c"), "--weights", "none",
                 "--image-size", "32", "--precision", "fp32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "note: no validation folder: validation is 15% of each class's train/ images" in out
    assert "about 8 px on their shorter side, much smaller than the 32 px input" in out
    assert "README: Small images" in out
    manifest = json.loads(next((tmp_path / "c").glob("*/manifest.json")).read_text())
    assert manifest["dataset"]["split"]["carved_from_train"] == {"validation": 0.15}
    assert manifest["counts"]["validation"] >= 2, "train-head has a validation split to choose on"


def test_images_near_the_input_size_get_no_small_image_note(tmp_path: Path) -> None:
    from pipeline.extraction.extract import dataset_notes

    root = _train_test_folder(tmp_path / "data", train=4, test=1, size=40)
    scanned = scan_dataset(root, SplitConfig.from_flags(None, None, 0))
    notes = dataset_notes(scanned, 64)
    assert not any("smaller" in note for note in notes)
    assert any("smaller" in note for note in dataset_notes(scanned, 96))


# --- fine-tuning what the head reads ---------------------------------------------------------------


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


# --- cached fine-tuning mixes classes within a batch -----------------------------------------------


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


# --- defaults that fit more than solar cells -------------------------------------------------------


def test_flips_default_to_horizontal_in_the_api_and_on_the_command_line(monkeypatch) -> None:
    import pipeline.finetuning.finetune as finetune_module
    from pipeline.finetuning.finetune import FinetuneOptions

    assert FinetuneOptions().augmentation.flip == "horizontal"
    assert FinetuneOptions(cached=True).augmentation.flip == "none"
    seen = []

    def capture(options):
        seen.append(options)
        raise PipelineError("captured")

    monkeypatch.setattr(finetune_module, "finetune", capture)
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


# --- runs of several data folders ------------------------------------------------------------------


def _cache_of(tmp_path: Path, name: str, seed: int) -> Path:
    features, labels, splits = clustered_features(150, 3, seed=seed)
    cache = write_feature_cache(tmp_path / "features" / name, features, labels, splits, ["a", "b", "c"])
    manifest_path = cache / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["dataset"]["root"] = str(tmp_path / name)  # each cache of its own image folder
    manifest_path.write_text(json.dumps(manifest))
    return cache


def test_best_chooses_among_one_data_folders_runs_and_runs_shows_the_folder(tmp_path: Path, capsys) -> None:
    models = tmp_path / "models"
    full = train_head(TrainOptions(features=_cache_of(tmp_path, "full", 1), models=models, name="full",
                                   head_params=FAST_LOGREG, progress=False))
    subset = train_head(TrainOptions(features=_cache_of(tmp_path, "subset", 2), models=models, name="subset",
                                     head_params=FAST_LOGREG, progress=False))
    assert full.config["features"]["data"] == str(tmp_path / "full")
    with pytest.raises(PipelineError, match="trained on 2 data folders.*--data DIR"):
        runs.best_run(models)
    assert runs.best_run(models, data=tmp_path / "full") == full.directory
    assert runs.best_run(models, data=tmp_path / "subset") == subset.directory
    assert [r["name"] for r in runs.list_runs(models, tmp_path / "subset")] == ["subset"]

    assert main(["runs", "--models", str(models)]) == 0
    table = capsys.readouterr().out
    assert "data" in table.splitlines()[0] and "subset" in table and "2 folders" in table
    assert main(["runs", "--models", str(models), "--json"]) == 0
    assert {row["data"] for row in json.loads(capsys.readouterr().out)} == {str(tmp_path / "full"),
                                                                            str(tmp_path / "subset")}
    assert main(["predict", "--model", "best", "--models", str(models), str(tmp_path)]) == 1
    assert "--data DIR" in capsys.readouterr().err


# --- smaller -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, expected", [
    (["train-head"], "no run was saved"),
    (["evaluate", "--model", "m"], "metrics and reports are as they were"),
    (["extract", "--data", "d"], "finished shards are kept"),
])
def test_ctrl_c_says_what_each_command_leaves(monkeypatch, capsys, command: list[str], expected: str) -> None:
    import pipeline.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    handlers = {"train-head": "_train_head", "evaluate": "_evaluate", "extract": "_extract"}
    monkeypatch.setattr(cli, handlers[command[0]], interrupted)
    assert main(command) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted: ") and expected in err and len(err.splitlines()) == 1
    if command[0] != "extract":
        assert "shards" not in err and "resume" not in err


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

    from pipeline.heads import DenseHead

    head = DenseHead(["a", "b"])
    head.history_ = [{"epoch": 1, "val_accuracy": 0.6, "val_loss": 0.5},
                     {"epoch": 2, "val_accuracy": 0.8, "val_loss": 0.9},
                     {"epoch": 3, "val_accuracy": 0.7, "val_loss": 0.2}]
    assert head.outcome()["best_epoch"] == 2


def test_a_tiny_extract_with_a_carved_split_trains_a_head(tmp_path: Path) -> None:
    root = _train_test_folder(tmp_path / "data", train=10, test=2, size=16)
    summary = extract_features(tiny_options(root, tmp_path / "c", splits=SplitConfig.from_flags(None, None, 0)))
    run = train_head(TrainOptions(features=summary.cache_dir, models=tmp_path / "m", head_params=FAST_LOGREG,
                                  progress=False))
    assert run.metrics["validation"]["images"] >= 2 and run.metrics["test"]["images"] == 4


def test_an_interrupted_first_extract_donates_its_shards_to_the_next(tmp_path: Path) -> None:
    import shutil

    from conftest import make_image_folder

    first = make_image_folder(tmp_path / "first", per_class=6)
    summary = extract_features(tiny_options(first, tmp_path / "c"))
    (summary.cache_dir / "manifest.json").unlink()  # as if killed before its manifest was written
    second = tmp_path / "second"
    shutil.copytree(first, second)
    again = extract_features(tiny_options(second, tmp_path / "c"))
    assert (again.new, again.reused) == (0, 12), "every image's features were copied, none recomputed"


def test_the_c_search_runs_the_largest_c_first_and_keeps_its_rows_in_c_order(tmp_path: Path) -> None:
    from pipeline.cache.reader import FeatureView, load_splits, open_cache
    from pipeline.heads import LogRegHead

    features, labels, splits = clustered_features(90, 3, seed=3)
    store = open_cache(write_feature_cache(tmp_path / "cache", features, labels, splits, ["a", "b", "c"]), tmp_path)
    data = load_splits(store, FeatureView.for_cache(store))
    head = LogRegHead(["a", "b", "c"], {"c_grid": "1e-2:1e2:5", "n_jobs": 1}).fit(data["train"], data["validation"],
                                                                                  progress=False)
    assert [row["C"] for row in head.history_] == sorted(row["C"] for row in head.history_)
