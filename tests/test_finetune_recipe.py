"""Stage three's recipe: AdamW or SGD, a cosine schedule with warm-up, discriminative rates per
block, label smoothing, the head trained alone first, dihedral augmentation, and test-time views
averaged by finetune, predict and evaluate; EfficientNet-Lite0 end to end on small images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from commandline import WITHOUT_THE_PROJECT
from conftest import make_image_folder, tiny_options
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.extraction.extract import extract_features
from pipeline.finetuning.examples import Augmentation
from pipeline.finetuning.finetune import FinetuneOptions, run_finetuning
from pipeline.images.views import averaged, view_transforms
from pipeline.runs import Run
from pipeline.serving.predict import predict_files
from pipeline.training.train import TrainOptions, run_training


@pytest.fixture(scope="module")
def lite_head(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A logistic regression on EfficientNet-Lite0 features (random weights, 32 px, pooled)."""
    root = tmp_path_factory.mktemp("recipe")
    data = make_image_folder(root / "data", per_class=8)
    cache = extract_features(tiny_options(data, root / "features", backbone="efficientnet_lite0",
                                          pooling="avg")).cache_dir
    run = run_training(TrainOptions(head="logreg", features=cache, models=root / "models", progress=False,
                                    head_params={"c_grid": "0.1,1", "n_jobs": 1})).directory
    return {"root": root, "data": data, "run": run, "models": root / "models"}


def test_the_dihedral_views_are_the_eight_symmetries_of_the_square() -> None:
    image = np.arange(2 * 3 * 3 * 1, dtype=np.float32).reshape(2, 3, 3, 1)
    views = [view(image) for view in view_transforms("dihedral")]
    assert len(views) == 8 and np.array_equal(views[0], image)
    assert len({v[0].tobytes() for v in views}) == 8, "eight distinct images"
    rotations = {np.rot90(image[0], k).tobytes() for k in range(4)} | \
        {np.rot90(image[0][:, ::-1], k).tobytes() for k in range(4)}
    assert {v[0].tobytes() for v in views} == rotations, "the quarter turns and their mirrors"
    assert [len(view_transforms(name)) for name in ("none", "flip")] == [1, 2]
    with pytest.raises(PipelineError, match="--tta 'spin': choose from none, flip, dihedral"):
        view_transforms("spin")


def test_averaged_views_are_the_mean_of_the_model_over_them() -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (3, 4, 4, 1)).astype(np.float32)

    def model(x: np.ndarray) -> np.ndarray:  # not symmetric: a weighted sum of the pixels
        weights = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
        score = (x * weights).sum(axis=(1, 2, 3))
        return np.stack([score, -score], axis=1)

    expected = np.mean([model(view(images)) for view in view_transforms("dihedral")], axis=0)
    np.testing.assert_allclose(averaged(model, images, "dihedral"), expected, rtol=1e-6)


def test_dihedral_augmentation_draws_every_symmetry() -> None:
    image = tf.constant(np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1))
    pipeline = keras.Sequential(Augmentation("dihedral").layers(seed=3))
    seen = {pipeline(tf.repeat(image, 64, axis=0), training=True).numpy()[i].tobytes() for i in range(64)}
    expected = {view(image.numpy())[0].tobytes() for view in view_transforms("dihedral")}
    assert seen == expected
    assert "dihedral" in Augmentation("dihedral").describe()
    both = keras.Sequential(Augmentation("horizontal_and_vertical").layers(seed=3))
    seen = {both(tf.repeat(image, 64, axis=0), training=True).numpy()[i].tobytes() for i in range(64)}
    assert len(seen) == 4, "flips on both axes drawn apart: the image, its two mirrors and its half turn"


def test_colour_changes_scale_brightness_and_saturation_within_their_ranges_and_keep_gray_gray() -> None:
    rng = np.random.default_rng(0)
    colour = rng.uniform(100, 150, size=(256, 4, 4, 3)).astype(np.float32)
    gray = np.repeat(colour[..., :1], 3, axis=-1)
    bright = keras.Sequential(Augmentation("none", brightness=0.3).layers(seed=1))(colour, training=True).numpy()
    factors = bright / colour  # one factor an image, from [0.7, 1.3] (nothing clips: 1.3 x 150 = 195)
    assert np.allclose(factors, factors[:, :1, :1, :1], rtol=1e-5)
    assert 0.7 <= factors.min() < 0.8 and 1.2 < factors.max() <= 1.3
    saturated = keras.Sequential(Augmentation("none", saturation=0.5).layers(seed=1))
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    out = saturated(colour, training=True).numpy()
    np.testing.assert_allclose((out * weights).sum(-1), np.clip((colour * weights).sum(-1), 0, 255), rtol=1e-4,
                               err_msg="the luminance is kept (nothing clips: 50 x 1.5 from a gray of 100-150)")
    spread = (out.max(-1) - out.min(-1)) / (colour.max(-1) - colour.min(-1))
    assert 0.5 <= spread.min() < 0.6 and 1.4 < spread.max() <= 1.5 + 1e-4
    np.testing.assert_allclose(saturated(gray, training=True).numpy(), gray, rtol=1e-6)
    assert np.all((out >= 0) & (out <= 255))
    assert Augmentation("none", brightness=0.2, saturation=0.1).describe() == "brightness 0.2, saturation 0.1"
    with pytest.raises(PipelineError, match="brightness"):
        Augmentation(brightness=1.5)


def test_colour_changes_are_flags_of_finetune_and_refused_with_cached(monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr("pipeline.finetuning.finetune.run_finetuning",
                        lambda options: seen.setdefault("options", options) and (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit):
        main(["finetune", "--from", "somewhere", "--brightness", "0.2", "--saturation", "0.3"])
    augmentation = seen["options"].augmentation
    assert (augmentation.brightness, augmentation.saturation) == (0.2, 0.3)
    with pytest.raises(PipelineError, match="brightness, saturation and dihedral transposes need images"):
        FinetuneOptions(cached=True, augmentation=Augmentation("none", saturation=0.1))


def test_block_rates_fall_by_the_decay_below_the_top_block(lite_head: dict[str, Path]) -> None:
    from pipeline.backbone.blocks import unfreeze
    from pipeline.backbone.registry import get_backbone
    from pipeline.finetuning.recipe import block_rate_factors

    _, backbone = Run.open(lite_head["run"]).trainable_classifier("fp32")
    spec = get_backbone("efficientnet_lite0")
    trained = unfreeze(backbone, "block5a")
    factors = block_rate_factors(backbone, spec.blocks, trained, 0.5)
    by_layer = {name: {factors[v.path] for v in backbone.get_layer(name).weights} for name in trained}
    assert by_layer["top_conv"] == {1.0} and by_layer["block7a_project_conv"] == {1.0}
    assert by_layer["block6a_expand_conv"] == {0.5} and by_layer["block6d_project_conv"] == {0.5}
    assert by_layer["block5a_expand_conv"] == {0.25} and by_layer["block5c_project_conv"] == {0.25}
    assert block_rate_factors(backbone, spec.blocks, trained, 1.0) == {}


def test_a_variable_at_half_the_rate_moves_half_as_far() -> None:
    from pipeline.finetuning.recipe import optimizer

    fast, slow = keras.Variable(np.ones(3, np.float32), name="fast"), keras.Variable(np.ones(3, np.float32),
                                                                                      name="slow")
    sgd = optimizer("sgd", 0.1, 0.0, 0.0, 0.0, "plateau", 0.0, 1, 1, {slow.path: 0.5})
    sgd.apply([tf.ones(3), tf.ones(3)], [fast, slow])
    np.testing.assert_allclose(1 - np.array(fast), 0.1, rtol=1e-6)
    np.testing.assert_allclose(1 - np.array(slow), 0.05, rtol=1e-6)


def test_the_cosine_schedule_warms_up_then_decays_to_zero() -> None:
    from pipeline.finetuning.recipe import optimizer

    adamw = optimizer("adamw", 1e-3, 0.9, 1.0, 0.01, "cosine", 1.0, 4, 10, {})
    schedule = adamw._learning_rate  # the schedule itself (learning_rate gives its current value)
    rates = [float(schedule(step)) for step in (0, 5, 10, 25, 40)]
    assert rates[0] == pytest.approx(1e-5) and rates[1] == pytest.approx((1e-5 + 1e-3) / 2, rel=0.05)
    assert rates[2] == pytest.approx(1e-3) and rates[3] == pytest.approx(5e-4, rel=0.01)
    assert rates[4] == pytest.approx(0.0, abs=1e-9)
    assert isinstance(adamw, keras.optimizers.AdamW)


def test_lite_fine_tunes_end_to_end_with_the_whole_recipe(lite_head: dict[str, Path], tmp_path: Path) -> None:
    """AdamW, cosine with a warm-up, rates halving per block, label smoothing, one epoch of the
    head alone, dihedral flips, scored with the eight views: every setting lands in the run; the
    curves count the head's epoch first; BatchNormalization's statistics do not move; the saved
    model loads in a Keras that never saw this package, without an optimizer."""
    before = Run.open(lite_head["run"]).trainable_classifier("fp32")[1]
    bn_before = {layer.name: [np.array(w) for w in layer.non_trainable_weights] for layer in before.layers
                 if isinstance(layer, keras.layers.BatchNormalization) and layer.name.startswith("block7")}
    summary = run_finetuning(FinetuneOptions(
        source=str(lite_head["run"]), models=tmp_path / "models", unfreeze="block6a", epochs=3, batch_size=4,
        lr=1e-3, optimizer="adamw", weight_decay=0.01, schedule="cosine", warmup_epochs=1.0, label_smoothing=0.1,
        lr_decay=0.5, head_epochs=1, tta="dihedral", augmentation=Augmentation("dihedral"), precision="fp32",
        progress=False))
    tuned = summary.config["finetune"]
    assert {k: tuned[k] for k in ("optimizer", "schedule", "warmup_epochs", "label_smoothing", "lr_decay",
                                  "head_epochs", "tta", "weight_decay")} == {
        "optimizer": "adamw", "schedule": "cosine", "warmup_epochs": 1.0, "label_smoothing": 0.1, "lr_decay": 0.5,
        "head_epochs": 1, "tta": "dihedral", "weight_decay": 0.01}
    assert tuned["augmentation"]["flip"] == "dihedral" and "also in unfrozen blocks" in tuned["batch_norm"]
    history = (summary.directory / "history.csv").read_text().splitlines()
    header = history[0].split(",")
    epochs = [row.split(",")[header.index("epoch")] for row in history[1:]]
    assert epochs[0] == "0" and epochs[1:] == [str(e) for e in range(1, tuned["epochs_run"] + 1)]
    assert "learning_rate" in header
    import zipfile

    with zipfile.ZipFile(summary.directory / "model.keras") as archive:
        assert not json.loads(archive.read("config.json")).get("compile_config"), "saved without an optimizer"
    saved = keras.models.load_model(summary.directory / "model.keras", compile=False)
    nested = {layer.name: layer for model in saved.layers if hasattr(model, "layers") for layer in model.layers}
    assert bn_before and set(bn_before) <= set(nested)
    for name, stats in bn_before.items():  # in the unfrozen block7a: frozen, so its statistics did not move
        assert not nested[name].trainable
        for old, new in zip(stats, nested[name].non_trainable_weights):
            np.testing.assert_array_equal(old, np.array(new))
    loader = WITHOUT_THE_PROJECT + "import keras, sys; keras.models.load_model(sys.argv[1]); print('loaded')"
    result = subprocess.run([sys.executable, "-I", "-c", loader, str(summary.directory / "model.keras")],
                            capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin",
                                                                                 "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0 and "loaded" in result.stdout, result.stderr[-2000:]
    # scored with the eight views: predict --tta dihedral gives the run's test probabilities
    report = (summary.directory / "classification_report.txt").read_text().splitlines()[0]
    assert "test-time views: dihedral" in report


def test_predict_and_evaluate_average_the_views(lite_head: dict[str, Path], tmp_path: Path, capsys) -> None:
    files = sorted(lite_head["data"].rglob("*.png"))[:5]
    plain = predict_files(lite_head["run"], files, top_k=2)
    viewed = predict_files(lite_head["run"], files, top_k=2, tta="dihedral")
    model = Run.open(lite_head["run"]).classifier()
    from pipeline.images.reading import EncodedImages

    images = np.concatenate([np.asarray(batch) for _, batch in EncodedImages(files).batches(32, 8)])
    expected = averaged(model.predict_on_batch, images, "dihedral")
    classes = Run.open(lite_head["run"]).class_names
    for row, probabilities in zip(viewed, expected):
        assert row.probabilities[0] == pytest.approx(probabilities[classes.index(row.labels[0])], abs=1e-5)
    assert any(abs(a.probabilities[0] - b.probabilities[0]) > 1e-6 for a, b in zip(plain, viewed)), \
        "random weights are not symmetric: the views change the answer"
    metrics_before = (lite_head["run"] / "metrics.json").read_text()
    assert main(["evaluate", "--model", str(lite_head["run"]), "--tta", "flip"]) == 0
    assert "tta-flip" in capsys.readouterr().out
    written = json.loads((lite_head["run"] / "tta-flip" / "metrics.json").read_text())
    assert set(written) == {"train", "validation", "test"} and written["test"]["images"] > 0
    assert (lite_head["run"] / "metrics.json").read_text() == metrics_before, "the run's own metrics stay"


@pytest.mark.parametrize("options, message", [
    (dict(head_epochs=3, epochs=3), "--head-epochs 3: fewer than --epochs"),
    (dict(warmup_epochs=1.0), "--warmup-epochs applies to --schedule cosine"),
    (dict(schedule="cosine", warmup_epochs=3.0, epochs=3), "--warmup-epochs 3: fewer than"),
    (dict(optimizer="lamb"), "--optimizer 'lamb': choose from sgd, adamw"),
    (dict(cached=True, tta="flip"), "--tta averages views of images"),
    (dict(cached=True, augmentation=Augmentation("dihedral")), "dihedral transposes need images"),
    (dict(lr_decay=0.0), "--lr-decay"),
    (dict(label_smoothing=1.0), "--label-smoothing"),
])
def test_recipe_settings_out_of_range_are_one_line(options: dict, message: str) -> None:
    with pytest.raises(PipelineError, match=message.replace("(", r"\(")):
        FinetuneOptions(**options)
