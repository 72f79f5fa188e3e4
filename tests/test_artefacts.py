"""Loading is never executing: hostile pickles and Keras files from a run directory are refused."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

from commandline import in_process, one_error_line
from conftest import THREE_CLASSES, clustered_features, write_feature_cache
from pipeline.cli import main
from pipeline.training.train import TrainOptions, run_training


class _Payload:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_pickle_with_a_matching_checksum_never_runs(head_run: dict[str, Path]) -> None:
    run, models, root = head_run["run"], head_run["models"], head_run["root"]
    marker = root / "payload-ran"
    hostile = pickle.dumps(_Payload(marker))
    (run / "head.joblib").write_bytes(hostile)
    sidecar = json.loads((run / "head.json").read_text())
    sidecar["files"]["head.joblib"] = hashlib.sha256(hostile).hexdigest()
    (run / "head.json").write_text(json.dumps(sidecar))
    image = str(next((head_run["data"] / "cats").glob("*.png")))
    commands = [
        ["evaluate", "--model", str(run)],
        ["predict", "--model", str(run), image],
        ["predict", "--model", "best", "--models", str(models), image],
        ["finetune", "--from", str(run), "--models", str(models), "--epochs", "1", "--batch-size", "4",
         "--name", "tuned", "--no-progress"],
    ]
    for command in commands:  # in this process: an unpickled payload would write its marker here just the same
        assert main(command) == 0, command
        assert not marker.exists(), f"{command} ran the pickle"
    shutil.rmtree(models / "tuned")


def test_a_keras_file_with_a_lambda_layer_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    import keras

    features, labels, splits = clustered_features(120, 3, seed=1)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, THREE_CLASSES)
    run = run_training(TrainOptions(head="dense", features=cache, models=tmp_path / "models", progress=False,
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
    line = one_error_line(in_process(capsys, "evaluate", "--model", str(run)))
    assert "head.keras" in line and "Python code" in line
    assert not marker.exists()
