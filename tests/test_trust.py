"""Issue: loading a run runs no code, the cache never lies, runs appear whole, every failure is one line.

Each test builds the situation it names and fails on the code before the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import ROOT, clustered_features, make_image_folder, tiny_options, write_feature_cache, write_image
from pipeline import runs, store
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.extract import extract_features
from pipeline.reader import FeatureView, load_splits
from pipeline.train import TrainOptions, evaluate_run, train_head

CLASSES = ["a", "b", "c"]
_AUDIT_HOOKS: list = []  # sys.addaudithook cannot be undone: one hook that calls these
_RECORDING = True
sys.addaudithook(lambda event, args: [hook(event, args) for hook in _AUDIT_HOOKS])
FAST_LOGREG = {"c_grid": "0.01,0.1,1", "n_jobs": 1}


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), *args], cwd=cwd,
                          capture_output=True, text=True)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


class _Payload:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def logreg_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trust")
    data = make_image_folder(root / "data", per_class=8)
    cache = extract_features(tiny_options(data, root / "features")).cache_dir
    models = root / "models"
    run = train_head(TrainOptions(head="logreg", features=cache, models=models, head_params=FAST_LOGREG,
                                  progress=False)).directory
    return {"root": root, "data": data, "cache": cache, "models": models, "run": run}


def test_a_hostile_pickle_with_a_matching_checksum_never_runs(logreg_run: dict[str, Path]) -> None:
    run, models, root = logreg_run["run"], logreg_run["models"], logreg_run["root"]
    marker = root / "payload-ran"
    hostile = pickle.dumps(_Payload(marker))
    (run / "head.joblib").write_bytes(hostile)
    sidecar = json.loads((run / "head.json").read_text())
    sidecar["files"]["head.joblib"] = hashlib.sha256(hostile).hexdigest()
    (run / "head.json").write_text(json.dumps(sidecar))
    image = str(next((logreg_run["data"] / "cats").glob("*.png")))
    commands = [
        ["evaluate", "--model", str(run)],
        ["predict", "--model", str(run), image],
        ["predict", "--model", "best", "--models", str(models), image],
        ["finetune", "--from", str(run), "--models", str(models), "--epochs", "1", "--batch-size", "4",
         "--name", "tuned", "--no-progress"],
    ]
    for command in commands:
        result = _cli(*command)
        assert result.returncode == 0, (command, result.stderr)
        assert not marker.exists(), f"{command} ran the pickle"
    shutil.rmtree(models / "tuned")


def test_a_keras_file_with_a_lambda_layer_is_refused_in_one_line(tmp_path: Path) -> None:
    import keras

    features, labels, splits = clustered_features(120, 3, seed=1)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, CLASSES)
    run = train_head(TrainOptions(head="dense", features=cache, models=tmp_path / "models", progress=False,
                                  head_params={"epochs": 1})).directory
    marker = tmp_path / "lambda-ran"
    inputs = keras.Input((features[0].size,))
    command = f"touch {marker}"
    outputs = keras.layers.Lambda(lambda x: x * 0 + float(os.system(command)))(inputs)
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(outputs)).save(run / "head.keras")
    sidecar = json.loads((run / "head.json").read_text())
    sidecar["files"]["head.keras"] = hashlib.sha256((run / "head.keras").read_bytes()).hexdigest()
    (run / "head.json").write_text(json.dumps(sidecar))
    marker.unlink(missing_ok=True)  # building the model above ran it once, here
    line = _one_error_line(_cli("evaluate", "--model", str(run)))
    assert "head.keras" in line and "Python code" in line
    assert not marker.exists()


# --- runs appear whole, under their own name, or not at all ----------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_staging_directories_are_never_listed_or_chosen_and_dead_ones_are_removed(tmp_path: Path) -> None:
    features, labels, splits = clustered_features(120, 3, seed=2)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, CLASSES)
    models = tmp_path / "models"
    real = train_head(TrainOptions(head="logreg", features=cache, models=models, name="real",
                                   head_params=FAST_LOGREG, progress=False)).directory
    # A run killed after its staging directory was complete, before the rename: a perfect copy
    # with a better validation accuracy, under the staging name of a process that is gone.
    leftover = models / f".ghost.tmp-{_dead_pid()}"
    shutil.copytree(real, leftover)
    metrics = json.loads((leftover / "metrics.json").read_text())
    metrics["validation"]["accuracy"] = 1.5
    (leftover / "metrics.json").write_text(json.dumps(metrics))
    live = models / f".busy.tmp-{os.getpid()}"  # a staging directory of a live process
    shutil.copytree(real, live)

    assert [row["name"] for row in runs.list_runs(models)] == ["real"]
    assert runs.best_run(models) == real
    result = _cli("runs", "--models", str(models), "--json")
    assert [row["name"] for row in json.loads(result.stdout)] == ["real"]
    with pytest.raises(PipelineError, match="staging directory"):
        runs.read_config(leftover)

    train_head(TrainOptions(head="logreg", features=cache, models=models, name="next",
                            head_params=FAST_LOGREG, progress=False))
    assert not leftover.exists(), "the next run removes a dead process's leftovers"
    assert live.exists(), "a live process's staging directory is left alone"


def test_a_killed_evaluate_leaves_no_empty_metrics_and_evaluate_recovers(tmp_path: Path) -> None:
    features, labels, splits = clustered_features(120, 3, seed=3)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, CLASSES)
    run = train_head(TrainOptions(head="logreg", features=cache, models=tmp_path / "models",
                                  head_params=FAST_LOGREG, progress=False)).directory
    (run / "metrics.json").write_text("")  # what a kill between open and write used to leave
    summary = evaluate_run(run)
    assert summary.metrics["test"]["accuracy"] > 0.9
    assert json.loads((run / "metrics.json").read_text())["validation"]["images"] > 0


def test_every_file_a_run_writes_is_renamed_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers only ever open hidden temporary names: a kill at any moment leaves the old file or
    the new one, never an empty or half one."""
    features, labels, splits = clustered_features(120, 3, seed=4)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, CLASSES)
    run = train_head(TrainOptions(head="logreg", features=cache, models=tmp_path / "models",
                                  head_params=FAST_LOGREG, progress=False)).directory
    opened: list[str] = []

    def record(event: str, args: tuple) -> None:
        if event == "open" and _RECORDING and isinstance(args[0], str | Path) and str(args[0]).startswith(str(run)):
            mode, flags = args[1], args[2]
            if (mode and any(flag in mode for flag in "wax")) or (flags and flags & (os.O_WRONLY | os.O_RDWR)):
                opened.append(Path(args[0]).name)

    _AUDIT_HOOKS.append(record)
    try:
        evaluate_run(run)
        evaluate_run(run, "validation")
    finally:
        _AUDIT_HOOKS.remove(record)
    assert opened, "evaluate writes its reports"
    assert all(name.startswith(".") and ".tmp" in name for name in opened), opened


# --- inputs and errors ------------------------------------------------------------------------------


def test_stderr_carries_only_the_pipelines_own_lines(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    args = ["extract", "--data", str(data), "--weights", "none", "--image-size", "32", "--no-progress"]
    quiet = _cli(*args, "--cache", str(tmp_path / "cache"))
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "", quiet.stderr
    noisy = _cli("--debug", *args, "--cache", str(tmp_path / "other"))
    assert noisy.returncode == 0
    assert "I0000" in noisy.stderr or "cuda" in noisy.stderr, "--debug shows TensorFlow's lines"
