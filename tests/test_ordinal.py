"""Ordered classes: the ordinal loss (the mean cross-entropy of every cut "at or above level k",
read off a softmax), the order's figures in metrics.json, and `--loss ordinal` for the dense head
and for fine-tuning (which takes the head run's loss unless told)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image_folder, tiny_options, write_feature_cache
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.heads.ordinal import cumulative, ordinal_loss, ordinal_metrics
from pipeline.runs import Run
from pipeline.training.train import TrainOptions, evaluate_run, run_training

LEVELS = ["level-0", "level-1", "level-2", "level-3"]


def _loss(labels: list[int], probabilities: list[list[float]]) -> np.ndarray:
    return np.asarray(ordinal_loss(4)(np.asarray(labels), np.asarray(probabilities, np.float32)))


def test_the_loss_is_the_mean_cross_entropy_of_the_cuts() -> None:
    p = np.asarray([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]], np.float32)
    labels = [2, 0]
    tails = cumulative(p.astype(np.float64))  # P(y >= 1), P(y >= 2), P(y >= 3)
    np.testing.assert_allclose(tails, [[0.9, 0.7, 0.4], [0.3, 0.2, 0.1]], atol=1e-7)
    at_or_above = np.asarray([[1, 1, 0], [0, 0, 0]], np.float64)
    expected = -(at_or_above * np.log(tails) + (1 - at_or_above) * np.log(1 - tails)).mean(axis=1)
    np.testing.assert_allclose(_loss(labels, p), expected, rtol=1e-5)


def test_the_loss_charges_two_levels_off_more_than_one_where_cross_entropy_does_not() -> None:
    """The same probability on the true class (level 0), the rest one level off or three."""
    near, far = [0.4, 0.6, 0.0, 0.0], [0.4, 0.0, 0.0, 0.6]
    assert _loss([0], [far])[0] > 2 * _loss([0], [near])[0]
    crossentropy = [-np.log(p[0]) for p in (near, far)]
    assert crossentropy[0] == crossentropy[1]
    # and the loss is least where the model is right and sure
    assert _loss([3], [[0.0, 0.0, 0.01, 0.99]])[0] < _loss([3], [[0.0, 0.0, 0.5, 0.5]])[0]


def test_the_orders_figures_read_every_cut_as_a_binary_classifier() -> None:
    labels = np.asarray([0, 1, 2, 3, 3])
    p = np.asarray([[0.9, 0.1, 0, 0],  # level 0, said 0
                    [0.3, 0.3, 0.4, 0],  # level 1: argmax 2; P(>=1) 0.7, P(>=2) 0.4: the median is 1
                    [0, 0, 1, 0],
                    [0, 0.6, 0, 0.4],  # level 3, argmax 1 (2 levels off); P(>=2) 0.4: median 1
                    [0, 0, 0, 1]])
    figures = ordinal_metrics(labels, p, LEVELS)
    assert figures["order"] == LEVELS and figures["images"] == 5
    assert figures["mean_absolute_error_levels"] == pytest.approx((0 + 1 + 0 + 2 + 0) / 5)
    assert figures["median_level_mean_absolute_error_levels"] == pytest.approx((0 + 0 + 0 + 2 + 0) / 5)
    cut = figures["cuts"][">= level-2"]  # truth: F F T T T; said P(>=2) >= 0.5: F F T F T
    assert cut == {"accuracy": pytest.approx(4 / 5), "share_at_or_above": pytest.approx(3 / 5)}
    assert set(figures["cuts"]) == {">= level-1", ">= level-2", ">= level-3"}
    assert ordinal_metrics(np.zeros(0), np.zeros((0, 4)), LEVELS) == {"order": LEVELS, "images": 0}


def _ordered_cache(directory: Path, n: int = 240) -> Path:
    """Features on a line: the level is the position along one direction, plus noise."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 4
    features = (labels[:, None] * np.ones((1, 6)) + rng.normal(0, 0.45, (n, 6))).astype(np.float32)
    splits = np.asarray(["train", "train", "train", "validation", "test"] * (n // 5))
    return write_feature_cache(directory, features.reshape(n, 1, 1, 6), labels, list(splits), LEVELS)


def test_a_dense_head_trains_on_the_ordinal_loss_and_is_scored_with_the_order(tmp_path: Path, capsys) -> None:
    cache = _ordered_cache(tmp_path / "features" / "ordered")
    summary = run_training(TrainOptions(head="dense", features=cache, models=tmp_path / "models",
                                        head_params={"loss": "ordinal", "epochs": 100, "units": 32, "lr": 0.01,
                                                     "patience": 30}))
    assert "the classes as ordered levels, lowest first (their sorted names): level-0 < level-1" in \
        capsys.readouterr().err
    run = Run.open(summary.directory)
    assert run.loss == "ordinal" and run.ordered and run.config["head"]["params"]["loss"] == "ordinal"
    for split in ("train", "validation", "test"):
        figures = run.metrics[split]["ordinal"]
        assert figures["order"] == LEVELS and set(figures["cuts"]) == {f">= {name}" for name in LEVELS[1:]}
    # well separated levels: few errors, and every cut is read well
    assert run.metrics["test"]["ordinal"]["mean_absolute_error_levels"] < 0.2
    assert min(c["accuracy"] for c in run.metrics["test"]["ordinal"]["cuts"].values()) > 0.9
    # the model is still a softmax over the four classes
    head = run.head()
    assert head.as_keras().output_shape == (None, 4)
    # scored again, the order's figures stay
    (run.directory / "metrics.json").unlink()
    again = evaluate_run(run.directory)
    assert again.metrics["test"]["ordinal"] == run.metrics["test"]["ordinal"]


def test_the_ordinal_loss_is_refused_where_it_does_not_apply(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(1)
    labels = np.arange(60) % 2
    cache = write_feature_cache(tmp_path / "features" / "two", rng.normal(size=(60, 1, 1, 4)).astype(np.float32),
                                labels, ["train", "train", "train", "validation", "test"] * 12, ["no", "yes"])
    with pytest.raises(PipelineError, match="loss ordinal needs three or more ordered classes; these are 2"):
        run_training(TrainOptions(head="dense", features=cache, models=tmp_path / "models",
                                  head_params={"loss": "ordinal"}, progress=False))
    assert main(["train-head", "--head", "logreg", "--features", str(cache), "--models", str(tmp_path / "m"),
                 "--loss", "ordinal"]) != 0
    assert "--loss does not apply to --head logreg" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_fine_tuning_takes_the_head_runs_ordinal_loss(tmp_path: Path) -> None:
    from pipeline.extraction.extract import extract_features
    from pipeline.finetuning.examples import Augmentation
    from pipeline.finetuning.finetune import FinetuneOptions, run_finetuning

    data = make_image_folder(tmp_path / "data", per_class=6, classes=tuple(LEVELS[:3]))
    cache = extract_features(tiny_options(data, tmp_path / "features")).cache_dir
    head = run_training(TrainOptions(head="dense", features=cache, models=tmp_path / "models", progress=False,
                                     head_params={"loss": "ordinal", "epochs": 2})).directory
    tuned = run_finetuning(FinetuneOptions(source=str(head), models=tmp_path / "models", epochs=1, batch_size=4,
                                          augmentation=Augmentation.off(), progress=False))
    run = Run.open(tuned.directory)
    assert run.config["finetune"]["loss"] == "ordinal" and run.ordered
    assert set(run.metrics["test"]["ordinal"]["cuts"]) == {">= level-1", ">= level-2"}
    config = json.loads((tuned.directory / "config.json").read_text())
    assert config["finetune"]["label_smoothing"] == 0.0
    with pytest.raises(PipelineError, match="--label-smoothing applies to --loss crossentropy"):
        FinetuneOptions(source=str(head), loss="ordinal", label_smoothing=0.1)
    with pytest.raises(PipelineError, match="loss 'hinge': choose from crossentropy, ordinal"):
        FinetuneOptions(source=str(head), loss="hinge")
