"""A second dataset, round three (issue 46): heads in seconds, an audit and exports that say what
they cost, advice and summaries in the caller's language, `best` that weighs calibration,
duplicates by band, and a quiet terminal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST_LOGREG, clustered_features, make_image_folder, tiny_options, write_feature_cache
from pipeline import api
from pipeline.errors import PipelineError


def test_the_path_visits_a_decade_at_a_time_stops_after_patience_and_refines_around_the_best() -> None:
    from pipeline.heads.logreg import PATH_PATIENCE, log_grid, path_search

    grid = sorted(log_grid("1e-6:1e5:45"))
    accuracy = {i: 0.9 - abs(np.log10(c) + 2) * 0.02 for i, c in enumerate(grid)}  # best near C = 1e-2
    fitted, warm = [], {}

    def fit_at(i: int, start: int | None) -> dict[str, float]:
        fitted.append(i)
        warm[i] = start
        return {"C": grid[i], "validation_accuracy": accuracy[i], "validation_loss": 1 - accuracy[i]}

    visited = path_search(grid, fit_at)
    best = max(range(len(grid)), key=lambda i: accuracy[i])
    assert best in visited and len(visited) < 20, visited
    coarse = [i for i in fitted if i % 4 == 0]
    assert max(coarse) < len(grid) - 1, "the climb stopped before the slowest, largest C"
    assert len([i for i in coarse if i > best]) == PATH_PATIENCE
    assert all(warm[i] is None or warm[i] < i for i in fitted), "each fit starts from a smaller C's solution"


def test_the_default_search_matches_the_whole_grid_in_fewer_fits(tmp_path: Path) -> None:
    from pipeline.cache.reader import FeatureView, load_splits
    from pipeline.cache.store import FeatureStore
    from pipeline.heads import LogRegHead

    features, labels, splits = clustered_features(600, 3, seed=5, shape=(16,), separation=0.5)
    store = FeatureStore(write_feature_cache(tmp_path / "cache", features, labels, splits, ["a", "b", "c"],
                                             pooling="avg"))
    data = load_splits(store, FeatureView.for_cache(store))
    heads = {search: LogRegHead(c_search=search, n_jobs=1).fit(
        data["train"], data["validation"], progress=False) for search in ("grid", "path")}
    grid, path = (max(row["validation_accuracy"] for row in heads[s].history_) for s in ("grid", "path"))
    assert len(heads["path"].history_) < len(heads["grid"].history_) == 45
    assert path >= grid - 0.002


def test_the_audit_chooses_c_in_its_first_fold_and_says_what_the_rest_will_take(capsys) -> None:
    pytest.importorskip("cleanlab")
    from pipeline.auditing.labels import label_issues

    features, labels, _ = clustered_features(300, 3, seed=1, shape=(12,), separation=1.0)
    found = label_issues(features.reshape(300, -1), labels, ["a", "b", "c"], folds=4, seed=0, progress=True)
    assert len(set(found.chosen_c)) == 1 and len(found.chosen_c) == 4
    said = capsys.readouterr().err
    assert "fold 1 of 4 took" in said and "the other 3 take about" in said and "folds=3" in said
    with pytest.raises(PipelineError, match="--c-grid"):
        api.audit(None, c_grid="nonsense")


def test_python_calls_print_the_summary_the_command_line_prints(tmp_path: Path, capsys) -> None:
    from pipeline.cli import main

    data = make_image_folder(tmp_path / "data", per_class=6)
    cache = api.extract(data, weights="none", image_size=32, precision="fp32", cache=tmp_path / "features",
                        progress=True)
    out = capsys.readouterr().out
    assert "extracted: 12 images in cache" in out and "splits: train" in out and "cache: " in out
    api.train_head(cache, models=tmp_path / "models", name="quiet", progress=False, **FAST_LOGREG)
    assert capsys.readouterr().out == ""
    run = api.train_head(cache, models=tmp_path / "models", name="loud", progress=True, **FAST_LOGREG)
    out = capsys.readouterr().out
    assert "trained logreg head" in out and f"run: {run.directory}" in out
    assert main(["train-head", "--features", str(cache.path), "--models", str(tmp_path / "models"), "--name", "cli",
                 "--c-grid", "0.1,1", "--n-jobs", "1", "--no-progress"]) == 0
    assert capsys.readouterr().out.count("trained logreg head") == 1, "the command line prints it once"


def test_advice_is_spoken_in_the_callers_language(tmp_path: Path) -> None:
    from conftest import train_test_folder
    from pipeline.backbone.registry import get_backbone
    from pipeline.data.dataset import scan_dataset
    from pipeline.errors import option, speak_as_command_line
    from pipeline.extraction.extract import small_image_note

    scanned = scan_dataset(train_test_folder(tmp_path / "data", train=6, test=2, size=8))
    python = small_image_note(scanned, 64, get_backbone("vgg16"))
    assert "image_size=32, layer='block4_pool', pooling='avg'" in python and "--image-size" not in python
    assert option("folds", 3) == "folds=3"
    speak_as_command_line()
    try:
        assert "--image-size 32 --layer block4_pool --pooling avg" in small_image_note(scanned, 64,
                                                                                      get_backbone("vgg16"))
        assert option("folds", 3) == "--folds 3"
    finally:
        speak_as_command_line(False)


def test_best_breaks_a_near_tie_by_validation_loss() -> None:
    from pipeline.runs.listing import near_tie_by_loss

    dense = {"name": "dense", "validation_accuracy": 0.905, "validation_accuracy_ci95": [0.89, 0.92],
             "validation_loss": 0.48}
    logreg = {"name": "logreg", "validation_accuracy": 0.900, "validation_accuracy_ci95": [0.885, 0.915],
              "validation_loss": 0.30}
    far = {"name": "far", "validation_accuracy": 0.80, "validation_accuracy_ci95": [0.78, 0.82],
           "validation_loss": 0.10}
    assert near_tie_by_loss([dense, logreg, far])["name"] == "logreg"
    assert near_tie_by_loss([dense, far])["name"] == "dense", "a run outside the interval never wins on loss"
    old = {"name": "old", "validation_accuracy": 0.95, "validation_accuracy_ci95": None, "validation_loss": None}
    assert near_tie_by_loss([old, logreg])["name"] == "old"


def test_duplicate_pairs_are_counted_by_similarity_band() -> None:
    from pipeline.auditing.audit import similarity_bands
    from pipeline.auditing.duplicates import Pair

    pairs = [Pair(0, 1, 1.0, True), Pair(0, 2, 0.9995, False), Pair(1, 2, 0.995, False), Pair(2, 3, 0.985, False),
             Pair(3, 4, 0.981, False)]
    assert similarity_bands(pairs, 0.98) == {">=0.999": 2, "0.99-0.999": 1, "0.98-0.99": 2}
    assert similarity_bands(pairs[:2], 0.995) == {">=0.999": 2, "0.995-0.999": 0}


def test_suspect_captions_are_wrapped_to_their_tile() -> None:
    from pipeline.auditing.pictures import _wrapped

    caption = "a-very-long-file-name-from-a-camera-roll-0001234567.png (train)\ngiven trousers, suggested dress"
    assert all(len(line) <= 34 for line in _wrapped(caption).splitlines())
    assert _wrapped(caption).replace("\n", "").replace(" ", "") == caption.replace("\n", "").replace(" ", "")


def test_the_onnx_batch_dimension_is_named(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from pipeline.backbone.onnx_graph import named_batch_dimension

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ("unk__651", 4))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ("unk__652", 4))])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), path)
    named_batch_dimension(path)
    saved = onnx.load(path).graph
    assert [v.type.tensor_type.shape.dim[0].dim_param for v in (*saved.input, *saved.output)] == ["batch", "batch"]


def test_runs_show_the_split_counts_and_validation_loss(head_run: dict[str, Path], capsys) -> None:
    from pipeline.cli import main

    assert main(["runs", "--models", str(head_run["models"])]) == 0
    out = capsys.readouterr().out
    row = api.list_runs(head_run["models"])[0]
    assert "train/val/test" in out and row["split_counts"] in out and "val loss" in out


def test_the_dense_head_stops_after_four_epochs_without_improvement() -> None:
    from pipeline.heads import DenseHead

    assert DenseHead.DEFAULTS["patience"] == 4


QUIET = """
import sys
sys.path.insert(0, sys.argv[3])
from conftest import make_image_folder
from pathlib import Path
import pipeline
data = make_image_folder(Path(sys.argv[1]) / "data", per_class=3)
pipeline.extract(data, weights="none", image_size=32, precision="fp32", cache=Path(sys.argv[2]), progress=False)
"""


def test_a_python_call_keeps_tensorflows_start_up_chatter_off_stderr(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", QUIET, str(tmp_path), str(tmp_path / "features"),
                           str(Path(__file__).parent)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for noise in ("cuInit", "absl::InitializeLog", "cudart_stub", "oneDNN custom operations"):
        assert noise not in done.stderr, done.stderr


def test_export_says_what_it_does_and_how_many_images_it_checks(head_run: dict[str, Path], tmp_path: Path,
                                                                 capsys) -> None:
    api.export(head_run["run"], "keras", tmp_path / "out", models=head_run["models"], check_images=3)
    said = capsys.readouterr()
    assert "export: building the keras model (then checked against predict on up to 3 validation images)" in said.err
    assert "exported" in said.out and "model.keras" in said.out
    api.export(head_run["run"], "keras", tmp_path / "out2", models=head_run["models"], check_images=0,
               progress=False)
    said = capsys.readouterr()
    assert said.out == "" and said.err == ""


def test_extract_from_the_command_line_prints_the_split_counts(tmp_path: Path, capsys) -> None:
    from pipeline.cli import main
    from pipeline.extraction.extract import extract_features

    data = make_image_folder(tmp_path / "data", per_class=10)
    extract_features(tiny_options(data, tmp_path / "features"))
    assert main(["extract", "--data", str(data), "--cache", str(tmp_path / "features"), "--weights", "none",
                 "--image-size", "32", "--precision", "fp32", "--val-fraction", "0.2", "--test-fraction", "0.2",
                 "--no-progress"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  splits:"))
    counts = json.loads(next((tmp_path / "features").glob("*/manifest.json")).read_text())["counts"]
    for split, count in counts.items():  # the stable rule's counts, said as they are (near, not at, 60/20/20)
        assert f"{split} {count} ({count / 20:.1%})" in line
