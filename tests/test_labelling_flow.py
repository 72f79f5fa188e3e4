"""A flat folder of images plus a labels table, end to end from the command line: extract
unlabelled, train on the table, evaluate, predict, export; relabel and re-split with a second
table at no backbone pass."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.cli import main


def _bright_and_dark(folder: Path, count: int) -> list[tuple[str, str]]:
    """Images whose class is their brightness (learnable from random-weight features)."""
    rng = np.random.default_rng(0)
    rows = []
    folder.mkdir(parents=True)
    for i in range(count):
        bright = i % 2 == 1
        pixels = rng.integers(0, 90, (36, 36, 3)) + (160 if bright else 0)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"cell{i:03d}.png")
        rows.append((f"cell{i:03d}.png", "bright" if bright else "dark"))
    return rows


def _write(path: Path, header: list[str], rows: list) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_a_flat_folder_and_a_labels_table_train_evaluate_predict_export_and_relabel(tmp_path: Path, capsys) -> None:
    images = tmp_path / "cells"
    rows = _bright_and_dark(images, 60)
    cache, models = tmp_path / "features", tmp_path / "models"
    extract = ["extract", "--data", str(images), "--cache", str(cache), "--weights", "none", "--image-size", "32",
               "--precision", "fp32", "--pooling", "avg", "--no-progress", "--json"]
    assert main(extract) == 0
    first = _json(capsys)
    assert first["new"] == 60 and any("unlabelled" in note for note in first["notes"])

    labels = _write(images / "labels.csv", ["path", "label"], rows)  # beside the images: paths relative to it
    train = ["train-head", "--cache", str(cache), "--models", str(models), "--c-grid", "1e-2:1e2:5",
             "--no-progress", "--json"]
    assert main([*train, "--labels", str(labels), "--name", "first"]) == 0
    run = _json(capsys)
    assert run["metrics"]["validation"]["accuracy"] > 0.8
    assert main(["evaluate", "--model", str(models / "first"), "--json"]) == 0
    assert _json(capsys)["metrics"]["test"]["accuracy"] == run["metrics"]["test"]["accuracy"]
    answers = tmp_path / "answers.json"
    assert main(["predict", "--model", str(models / "first"), str(images / "cell001.png"), "--output",
                 str(answers)]) == 0
    assert json.loads(answers.read_text())[0]["labels"][0] == "bright"
    assert main(["export", "--model", str(models / "first"), "--format", "keras", "--check-images", "8",
                 "--no-progress"]) == 0
    exported = json.loads((models / "first" / "export" / "export.json").read_text())
    assert exported["formats"]["model.keras"]["agreement_with_predict"]["images"] > 0
    capsys.readouterr()

    # a second table: 10% relabelled, some images moved to test; the cache is not touched
    relabelled = [(path, {"bright": "dark", "dark": "bright"}[label] if i % 10 == 3 else label,
                   "test" if i % 10 == 7 else "") for i, (path, label) in enumerate(rows)]
    second = _write(tmp_path / "second.csv", ["path", "label", "split"],
                    [(str(images / path), label, split) for path, label, split in relabelled])  # absolute paths
    assert main(extract) == 0
    again = _json(capsys)
    assert (again["new"], again["backbone_batches"], again["reused"]) == (0, 0, 60)
    assert main([*train, "--labels", str(second), "--split-column", "split", "--name", "second"]) == 0
    run2 = _json(capsys)
    assert run2["seconds"] < 60
    with open(models / "second" / "labelling.csv", encoding="utf-8") as handle:
        kept = {row["path"]: row for row in csv.DictReader(handle)}
    for path, label, split in relabelled:
        assert kept[path]["label"] == label
        if split:
            assert kept[path]["split"] == "test"
    tested = [(path, label) for path, label, _ in relabelled if kept[path]["split"] == "test"]
    assert run2["metrics"]["test"]["images"] == len(tested)
    # the new run's test accuracy is measured against the new labels
    assert main(["predict", "--model", str(models / "second"), *[str(images / p) for p, _ in tested], "--output",
                 str(answers)]) == 0
    said = [answer["labels"][0] for answer in json.loads(answers.read_text())]
    accuracy = float(np.mean([s == label for s, (_, label) in zip(said, tested)]))
    assert abs(run2["metrics"]["test"]["accuracy"] - accuracy) < 1e-9


def test_extract_from_a_table_of_paths(tmp_path: Path, capsys) -> None:
    images = tmp_path / "photos"
    rows = _bright_and_dark(images, 12)
    table = _write(tmp_path / "images.csv", ["file"], [[f"photos/{path}"] for path, _ in rows[:10]] +
                   [["photos/missing.png"]])
    args = ["extract", "--images", str(table), "--path-column", "file", "--cache", str(tmp_path / "features"),
            "--weights", "none", "--image-size", "32", "--precision", "fp32", "--no-progress", "--json"]
    assert main(args) == 1
    assert "1 path(s) in column 'file'" in capsys.readouterr().err
    assert main([*args, "--missing", "skip"]) == 0
    assert _json(capsys)["images"] == 10


def test_extract_from_a_dataframe_of_absolute_paths_finds_their_folder(tmp_path: Path) -> None:
    import pandas

    import pipeline

    images = tmp_path / "deep" / "photos"
    rows = _bright_and_dark(images, 6)
    frame = pandas.DataFrame({"path": [str(images / path) for path, _ in rows]})
    cache = pipeline.extract(frame, weights="none", image_size=32, precision="fp32", cache=tmp_path / "features",
                             progress=False)
    assert cache.summary.images == 6 and cache.data_root == str(images)
    assert sorted(cache.rows_index().paths) == [path for path, _ in rows]


def test_predict_flags_images_unlike_the_training_images_as_unknown(tmp_path: Path) -> None:
    """Trained on bright and dark cells; striped images, a held-out kind, are farther from every
    training image than the run's recorded threshold (which flags 5% of its validation images)."""
    import pipeline

    images = tmp_path / "cells"
    rows = _bright_and_dark(images, 60)
    _write(images / "labels.csv", ["path", "label"], rows)
    cache = pipeline.extract(images, weights="none", image_size=32, precision="fp32", pooling="avg",
                             cache=tmp_path / "features", progress=False)
    run = pipeline.train_head(cache, labels=images / "labels.csv", models=tmp_path / "models", progress=False,
                              c_grid="1e-2:1e2:5")
    recorded = run.config["unknown"]
    assert recorded["false_rejection_rate"] == 0.05 and recorded["threshold"] > 0
    strange = tmp_path / "strange"
    strange.mkdir()
    for i in range(6):
        pixels = np.zeros((36, 36, 3), np.uint8)
        pixels[:, (i % 3)::3] = (255, 0, 255)
        Image.fromarray(pixels).save(strange / f"stripes{i}.png")
    answers = pipeline.predict(run, sorted(strange.iterdir()))
    assert all(a.unknown for a in answers) and all(a.unknown_score > recorded["threshold"] for a in answers)
    known = pipeline.predict(run, [images / path for path, _ in rows[:20]])
    assert sum(a.unknown for a in known) <= 3  # training images themselves: near 0
    rejected = pipeline.predict(run, sorted(strange.iterdir())[:1], unknown="reject")
    assert rejected[0].labels == [] and rejected[0].unknown
