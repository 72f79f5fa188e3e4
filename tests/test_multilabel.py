"""Multi-label tables: two independent attributes of synthetic images (colour and shape), one
sigmoid a label, each label's threshold chosen on validation; predict lists every label at or above
its threshold; every export agrees with predict, the thresholds carried in export.json and labels.txt."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import pipeline
from pipeline.errors import PipelineError

FAST = {"c_grid": "1e-3:1e1:5", "n_jobs": 1}


def _shapes(folder: Path, count: int) -> list[tuple[str, str]]:
    """Red or blue, round or square, independently; on a noisy gray ground."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True)
    rows = []
    for i in range(count):
        red, round_ = bool(rng.integers(2)), bool(rng.integers(2))
        ground = rng.integers(90, 140, (48, 48, 3)).astype(np.uint8)
        image = Image.fromarray(ground)
        draw = ImageDraw.Draw(image)
        colour = (220, 30, 30) if red else (30, 30, 220)
        x, y = rng.integers(4, 14, 2)
        box = (int(x), int(y), int(x) + 30, int(y) + 30)
        (draw.ellipse if round_ else draw.rectangle)(box, fill=colour)
        image.save(folder / f"shape{i:03d}.png")
        rows.append((f"shape{i:03d}.png", ";".join(t for t, on in (("red", red), ("blue", not red),
                                                                   ("round", round_), ("square", not round_)) if on)))
    return rows


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("multilabel")
    rows = _shapes(root / "shapes", 160)
    with open(root / "shapes" / "tags.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["path", "tags"], *rows])
    cache = pipeline.extract(root / "shapes", weights="none", image_size=48, precision="fp32", pooling="none",
                             layer="block4_pool", cache=root / "features", progress=False)
    run = pipeline.train_head(cache, labels=root / "shapes" / "tags.csv", label="tags", label_separator=";",
                              models=root / "models", progress=False, **FAST)
    return {"root": root, "cache": cache, "run": run, "rows": rows}


def test_a_multilabel_table_trains_one_sigmoid_a_label_with_thresholds(shapes: dict) -> None:
    run = shapes["run"]
    assert run.class_names == ["blue", "red", "round", "square"]
    assert run.task == "multilabel" and len(run.thresholds) == 4
    test = run.metrics["test"]
    assert test["macro_f1"] > 0.95, test
    for key in ("micro_f1", "mean_average_precision", "hamming_accuracy", "accuracy_ci95_low", "per_label"):
        assert key in test
    assert set(test["per_label"]) == set(run.class_names)
    assert (run.directory / "classification_report.txt").read_text().count("threshold") >= 1
    assert pipeline.evaluate(run).metrics["test"]["macro_f1"] == test["macro_f1"]


def test_predict_lists_every_label_at_or_above_its_threshold(shapes: dict) -> None:
    run, root = shapes["run"], shapes["root"]
    paths = [root / "shapes" / name for name, _ in shapes["rows"][:12]]
    answers = pipeline.predict(run, paths)
    right = 0
    for answer, (_, tags) in zip(answers, shapes["rows"][:12]):
        for label, p in zip(answer.labels, answer.probabilities):
            assert p >= run.thresholds[run.class_names.index(label)]
        right += sorted(answer.labels) == sorted(tags.split(";"))
    assert right >= 10


def test_the_dense_head_learns_the_labels_too_and_single_label_heads_refuse(shapes: dict) -> None:
    root = shapes["root"]
    dense = pipeline.train_head(shapes["cache"], head="dense", labels=root / "shapes" / "tags.csv", label="tags",
                                label_separator=";", models=root / "models", progress=False, epochs=30)
    assert dense.metrics["test"]["macro_f1"] > 0.9
    with pytest.raises(PipelineError, match="not several labels"):
        pipeline.train_head(shapes["cache"], head="knn", labels=root / "shapes" / "tags.csv", label="tags",
                            label_separator=";", models=root / "models", progress=False)


@pytest.mark.parametrize(("fmt", "tolerance"), [("keras", 1e-5), ("tflite", 1e-3), ("onnx", 1e-5),
                                                ("savedmodel", 1e-5)])
def test_every_export_agrees_with_predict_and_carries_the_thresholds(shapes: dict, fmt: str,
                                                                     tolerance: float) -> None:
    if fmt == "onnx":
        pytest.importorskip("tf2onnx")
    run = shapes["run"]
    summary = pipeline.export(run, fmt, shapes["root"] / f"export-{fmt}", check_images=16, progress=False)
    details = json.loads((summary.path.parent / "export.json").read_text())
    assert details["task"] == "multilabel"
    assert details["thresholds"] == dict(zip(run.class_names, run.thresholds))
    measured = details["formats"][summary.path.name]["agreement_with_predict"]
    assert measured["largest_probability_difference"] <= tolerance
    assert measured["label_sets_differ"] == 0
    lines = (summary.path.parent / "labels.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == run.class_names
    assert [float(line.split("\t")[1]) for line in lines] == pytest.approx(run.thresholds, abs=1e-5)


def test_label_columns_and_a_separator_that_never_occurs(shapes: dict) -> None:
    root, cache = shapes["root"], shapes["cache"]
    with open(root / "flags.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "red", "round"])
        for name, tags in shapes["rows"]:
            writer.writerow([f"shapes/{name}", int("red" in tags), int("round" in tags)])
    run = pipeline.train_head(cache, labels=root / "flags.csv", label_columns="red,round", models=root / "models",
                              progress=False, **FAST)
    assert run.class_names == ["red", "round"] and run.metrics["test"]["macro_f1"] > 0.9
    with pytest.raises(PipelineError, match="never occurs in column 'tags'"):
        pipeline.train_head(cache, labels=root / "shapes" / "tags.csv", label="tags", label_separator="|",
                            models=root / "models", progress=False)
