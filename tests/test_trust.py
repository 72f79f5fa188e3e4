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

from conftest import (
    ROOT,
    assert_features_close,
    clustered_features,
    make_image_folder,
    tiny_options,
    write_feature_cache,
    write_image,
)
from pipeline import runs
from pipeline.cache import store
from pipeline.cache.reader import FeatureView, load_splits
from pipeline.cli import main
from pipeline.data.dataset import SplitConfig
from pipeline.errors import PipelineError
from pipeline.extraction.extract import extract_features
from pipeline.training.train import TrainOptions, evaluate_run, train_head

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
    for command in commands:  # in this process: an unpickled payload would write its marker here just the same
        assert main(command) == 0, command
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
    import signal
    import subprocess
    import time

    features, labels, splits = clustered_features(120, 3, seed=3)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, CLASSES)
    run = train_head(TrainOptions(head="logreg", features=cache, models=tmp_path / "models",
                                  head_params=FAST_LOGREG, progress=False)).directory
    rng = np.random.default_rng(5)
    killed = 0
    for _ in range(4):  # SIGKILL evaluate at random moments while it writes its reports
        before = (run / "metrics.json").stat().st_mtime_ns
        process = subprocess.Popen([sys.executable, str(ROOT / "run_pipeline.py"), "evaluate", "--model", str(run)],
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.monotonic()
        while time.monotonic() - started < 120 and process.poll() is None and not any(
                p.name.startswith(".") for p in run.iterdir()):
            time.sleep(0.001)  # until it begins to write
        time.sleep(rng.uniform(0.0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed += process.returncode == -signal.SIGKILL
        metrics = json.loads((run / "metrics.json").read_text())  # never empty, never half written
        assert metrics["test"]["images"] > 0
        assert (run / "metrics.json").stat().st_mtime_ns >= before
    assert killed >= 3, "the kills landed while evaluate ran"
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

    # train-head and finetune write every file of a run inside a hidden staging directory (or
    # under a hidden temporary name): nothing visible is ever open for writing
    models = tmp_path / "models"
    written: list[Path] = []

    def record_runs(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str | Path) and str(args[0]).startswith(str(models)):
            mode, flags = args[1], args[2]
            if (mode and any(flag in mode for flag in "wax")) or (flags and flags & (os.O_WRONLY | os.O_RDWR)):
                written.append(Path(args[0]).relative_to(models))

    data = make_image_folder(tmp_path / "images", per_class=6)
    image_cache = extract_features(tiny_options(data, tmp_path / "image-cache")).cache_dir
    _AUDIT_HOOKS.append(record_runs)
    try:
        head = train_head(TrainOptions(head="logreg", features=image_cache, models=models, name="watched",
                                       head_params=FAST_LOGREG, progress=False)).directory
        from pipeline.finetuning.finetune import FinetuneOptions, finetune

        finetune(FinetuneOptions(source=str(head), models=models, epochs=1, batch_size=4, progress=False))
    finally:
        _AUDIT_HOOKS.remove(record_runs)
    staged = {path.parts[0] for path in written}
    assert any(name.startswith(".watched.tmp-") for name in staged), staged  # train-head was watched
    assert any(name.startswith(".watched-finetuned") for name in staged), staged  # and finetune
    visible = [str(path) for path in written if not any(part.startswith(".") for part in path.parts)]
    assert not visible, visible


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


def test_evaluate_refuses_a_cache_that_was_re_split_since_training(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=10)
    cache_root, models = tmp_path / "features", tmp_path / "models"
    common = ["--data", str(data), "--cache", str(cache_root), "--weights", "none", "--image-size", "32",
              "--precision", "fp32", "--no-progress"]
    assert main(["extract", *common]) == 0
    assert main(["train-head", "--head", "logreg", "--cache", str(cache_root), "--models", str(models),
                 "--c-grid", "0.1,1", "--n-jobs", "1", "--name", "run", "--no-progress"]) == 0
    before = (models / "run" / "metrics.json").read_text()
    assert (models / "run" / runs.SPLIT_RECORD).is_file()
    assert main(["extract", *common, "--val-fraction", "0.05", "--test-fraction", "0.6"]) == 0
    result = _cli("evaluate", "--model", str(models / "run"))
    line = _one_error_line(result)
    assert "other splits than run run was trained with" in line
    assert (models / "run" / "metrics.json").read_text() == before, "the run's metrics are untouched"
    assert main(["extract", *common]) == 0  # the split the run was trained with: evaluate works again
    assert main(["evaluate", "--model", str(models / "run")]) == 0


# --- the cache: features always belong to the bytes whose hash the row records -----------------------


def _rows_by_path(cache: Path) -> dict[str, tuple[str, np.ndarray]]:
    rows = {}
    for shard in store.shard_paths(cache):
        with h5py.File(shard, "r") as handle:
            for path, digest, values in zip(handle["paths"][()], handle["sha256"][()],
                                            handle["features/block5_pool"][()]):
                rows[path.decode()] = (digest.decode(), values)
    return rows


def test_an_image_overwritten_between_scan_and_decode_gets_the_hash_of_the_bytes_decoded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4)
    victim = data / "cats" / "img001.png"
    old_bytes = victim.read_bytes()
    new_bytes = write_image(tmp_path / "other.png", seed=999).read_bytes()
    reference = extract_features(tiny_options(data, tmp_path / "reference")).cache_dir
    old_features = _rows_by_path(reference)["cats/img001.png"][1]

    import pipeline.extraction.extract as extract_module

    real_scan = extract_module.scan_dataset

    def scan_then_overwrite(*args, **kwargs):
        scanned = real_scan(*args, **kwargs)
        victim.write_bytes(new_bytes)  # after the scan hashed the old bytes, before the decode
        return scanned

    monkeypatch.setattr(extract_module, "scan_dataset", scan_then_overwrite)
    cache = extract_features(tiny_options(data, tmp_path / "cache")).cache_dir
    monkeypatch.undo()
    digest, features = _rows_by_path(cache)["cats/img001.png"]
    assert digest == hashlib.sha256(new_bytes).hexdigest(), "the row records the bytes it was computed from"
    new_features = _rows_by_path(extract_features(tiny_options(data, tmp_path / "fresh")).cache_dir)[
        "cats/img001.png"][1]
    assert_features_close(features, new_features)  # computed beside other images: see conftest

    victim.write_bytes(old_bytes)  # the old bytes come back: that image must be extracted again
    summary = extract_features(tiny_options(data, tmp_path / "cache"))
    assert summary.new == 1
    digest, features = _rows_by_path(cache)["cats/img001.png"]
    assert digest == hashlib.sha256(old_bytes).hexdigest()
    assert_features_close(features, old_features)  # a batch of one now, of four before


def test_a_reader_of_a_cache_being_rewritten_stops_with_a_clear_message(tmp_path: Path) -> None:
    features, labels, splits = clustered_features(160, 3, seed=5)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, CLASSES, shard_size=40)
    feature_store = store.FeatureStore(cache)
    data = load_splits(feature_store, FeatureView.for_cache(feature_store), stream=True)["train"]
    # extract rewrites a shard (other rows, same name) while a streamed head is reading
    shard = store.shard_paths(cache)[1]
    fingerprint = feature_store.fingerprint
    rows = store.read_shard_rows(shard, fingerprint.layers, list(range(10)))
    store.write_shard(shard, rows, CLASSES, fingerprint)
    with pytest.raises(PipelineError, match="changed while it was being read"):
        for _ in data.chunks(rows=16, order=np.random.default_rng(0).permutation(len(data))):
            pass
    with pytest.raises(PipelineError, match="changed while it was being read"):
        list(data.chunks())


@pytest.mark.parametrize("damage", ["shape", "nan", "strings", "labels", "splits"])
def test_a_shard_with_damaged_content_is_refused_naming_the_file(tmp_path: Path, damage: str) -> None:
    features, labels, splits = clustered_features(120, 3, seed=6)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, CLASSES, shard_size=60)
    shard = store.shard_paths(cache)[1]
    with h5py.File(shard, "r+") as handle:
        rows = handle["labels"].shape[0]
        if damage == "shape":
            del handle["features/block5_pool"]
            handle["features/block5_pool"] = np.zeros((rows, 7), np.float32)
        elif damage == "nan":
            values = handle["features/block5_pool"][()]
            values[3, 0] = np.nan
            handle["features/block5_pool"][...] = values
        elif damage == "strings":
            del handle["features/block5_pool"]
            handle.create_dataset("features/block5_pool", data=np.array([b"x"] * rows, dtype=object),
                                  dtype=h5py.string_dtype())
        elif damage == "labels":
            handle["labels"][0] = 7
        else:
            del handle["splits"]
            handle.create_dataset("splits", data=np.array([b"holdout"] * rows, dtype=object),
                                  dtype=h5py.string_dtype())
    result = _cli("train-head", "--head", "logreg", "--features", str(cache), "--models", str(tmp_path / "m"),
                  "--c-grid", "1", "--n-jobs", "1", "--no-progress")
    line = _one_error_line(result)
    assert shard.name in line and "damaged" in line and "delete it and rerun extract" in line
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


# --- inputs and errors ------------------------------------------------------------------------------


def test_resource_failures_are_errors_not_skipped_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow as tf

    import pipeline.images.decode_tf as images_module

    data = make_image_folder(tmp_path / "data", per_class=4)
    victim = hashlib.sha256((data / "dogs" / "img002.png").read_bytes()).hexdigest()
    real = images_module.decode_bytes_and_resize

    def exhausting(encoded, size):
        def check(value):
            if hashlib.sha256(value.numpy()).hexdigest() == victim:
                raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
            return np.int32(0)

        done = tf.py_function(check, [encoded], tf.int32)
        with tf.control_dependencies([done]):
            return real(encoded, size)

    monkeypatch.setattr(images_module, "decode_bytes_and_resize", exhausting)
    with pytest.raises(PipelineError, match="lack of resources"):
        extract_features(tiny_options(data, tmp_path / "cache"))
    monkeypatch.undo()
    manifest = json.loads(next((tmp_path / "cache").glob("*/manifest.json")).read_text())
    assert manifest["skipped"] == [] and manifest["counts"]["train"] + manifest["counts"]["validation"] + \
        manifest["counts"]["test"] == 7
    summary = extract_features(tiny_options(data, tmp_path / "cache"))
    assert (summary.new, summary.images, summary.skipped) == (1, 8, [])


def test_image_size_and_pixel_count_are_bounded(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    line = _one_error_line(_cli("extract", "--data", str(data), "--cache", str(tmp_path / "c"), "--weights", "none",
                                "--image-size", "100000", "--no-progress"))
    assert "--image-size 100000" in line
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    write_image(data / "cats" / "big.png", seed=5, size=1200)
    result = _cli("extract", "--data", str(data), "--cache", str(tmp_path / "c"), "--weights", "none",
                  "--image-size", "32", "--precision", "fp32", "--no-progress", "--max-megapixels", "1")
    line = _one_error_line(result)
    assert "big.png is 1200 x 1200 pixels" in line and "--max-megapixels" in line
    manifest = json.loads(next((tmp_path / "c").glob("*/manifest.json")).read_text())
    assert sum(manifest["counts"].values()) == 6 and manifest["skipped"] == []
    result = _cli("extract", "--data", str(data), "--cache", str(tmp_path / "c"), "--weights", "none",
                  "--image-size", "32", "--precision", "fp32", "--no-progress")
    assert result.returncode == 0 and "1 new, 6 reused" in result.stdout


@pytest.mark.parametrize("flag", ["--val-fraction", "--test-fraction"])
def test_fractions_must_be_finite(tmp_path: Path, flag: str) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    result = _cli("extract", "--data", str(data), "--cache", str(tmp_path / "c"), flag, "nan")
    assert result.returncode != 0 and "finite" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(PipelineError, match="finite"):
        extract_features(tiny_options(data, tmp_path / "c", splits=SplitConfig(float("nan"), 0.2, 0)))


def test_a_class_folder_with_a_control_character_is_refused_by_name(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    (data / "dogs").rename(data / "dogs\nand wolves")
    line = _one_error_line(_cli("extract", "--data", str(data), "--cache", str(tmp_path / "c"), "--weights", "none",
                                "--image-size", "32", "--no-progress"))
    assert "dogs\\nand wolves" in line and "control character" in line


def test_predict_output_into_a_missing_folder_fails_before_the_work(logreg_run: dict[str, Path]) -> None:
    image = str(next((logreg_run["data"] / "cats").glob("*.png")))
    missing = logreg_run["root"] / "nowhere" / "predictions.csv"
    line = _one_error_line(_cli("predict", "--model", str(logreg_run["run"]), image, "--output", str(missing)))
    assert "does not exist" in line and str(missing.parent) in line


def test_os_failures_a_user_can_cause_are_one_line(tmp_path: Path) -> None:
    features, labels, splits = clustered_features(60, 3, seed=7)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, CLASSES)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for models in (a_file, a_file / "models"):
        line = _one_error_line(_cli("train-head", "--features", str(cache), "--models", str(models),
                                    "--c-grid", "1", "--n-jobs", "1", "--no-progress"))
        assert "cannot save runs in" in line
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if not os.access(read_only, os.W_OK):  # root writes anywhere: then this case cannot be built
            line = _one_error_line(_cli("train-head", "--features", str(cache), "--models", str(read_only / "m"),
                                        "--c-grid", "1", "--n-jobs", "1", "--no-progress"))
            assert "Permission denied" in line
    finally:
        read_only.chmod(0o755)
    line = _one_error_line(_cli("train-head", "--features", str(cache), "--models", str(tmp_path / "m"),
                                "--name", "x" * 300, "--c-grid", "1", "--n-jobs", "1", "--no-progress"))
    assert "too long" in line


def test_reports_stay_fast_and_readable_at_hundreds_of_classes(tmp_path: Path) -> None:
    import time

    classes = [f"class{i:03d}" for i in range(200)]
    labels = np.repeat(np.arange(200), 3)
    rng = np.random.default_rng(0)
    features = (rng.normal(size=(600, 16)) + labels[:, None] * 0.05).astype(np.float32)
    splits = np.array(["train", "validation", "test"] * 200)
    cache = write_feature_cache(tmp_path / "cache", features, labels, list(splits), classes, shard_size=256)
    started = time.perf_counter()
    result = _cli("train-head", "--head", "logreg", "--features", str(cache), "--models", str(tmp_path / "m"),
                  "--name", "many", "--c-grid", "0.1,1", "--n-jobs", "1", "--no-progress")
    took = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    run = tmp_path / "m" / "many"
    assert not (run / "confusion_matrix.png").exists()
    assert (run / "confusion_matrix.csv").read_text().count("\n") == 201
    assert (run / "most_confused.csv").is_file()
    assert len(result.stdout.splitlines()) < 60, "the terminal gets a summary, not 200 rows"
    printed = float(result.stdout.split("head: ")[1].split(" s in all")[0])
    assert printed <= took and printed > 0.5 * took - 3, (printed, took)  # the command's own time


@pytest.mark.parametrize("target", ["file_hashes.json", "classification_report.txt", "config.json"])
def test_a_full_disk_while_saving_is_one_line_and_leaves_nothing_half_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, target: str) -> None:
    import errno

    data = make_image_folder(tmp_path / "data", per_class=5)
    common = ["--cache", str(tmp_path / "features")]
    extract = ["extract", "--data", str(data), *common, "--weights", "none", "--image-size", "32",
               "--precision", "fp32", "--no-progress"]
    if target != "file_hashes.json":
        assert main(extract) == 0
    real_write_text = Path.write_text

    failed_after_writing: list[Path] = []

    def full_disk(self: Path, text: str, *args, **kwargs):
        if target in self.name:  # the disk fills up half way through the temporary file
            real_write_text(self, text[:len(text) // 2], *args, **kwargs)
            failed_after_writing.append(self)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    command = extract if target == "file_hashes.json" else [
        "train-head", *common, "--models", str(tmp_path / "models"), "--c-grid", "1", "--n-jobs", "1",
        "--no-progress", "--name", "run"]
    capsys.readouterr()
    assert main(command) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(err) == 1 and "No space left on device" in err[0] and target in err[0], err
    assert failed_after_writing and failed_after_writing[0].name.startswith("."), "a temporary was half written"
    assert not failed_after_writing[0].exists(), "the half-written temporary is removed"
    assert not list(tmp_path.rglob(f".{target}*")), "no temporary file is left"
    assert not (tmp_path / "models" / "run").exists()
    models = tmp_path / "models"
    leftovers = sorted(p.name for p in models.iterdir()) if models.is_dir() else []
    assert not leftovers, f"no staging directory with the files written before the failure: {leftovers}"


def test_a_cache_root_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    line = _one_error_line(_cli("extract", "--data", str(data), "--cache", str(a_file / "features"),
                                "--weights", "none", "--image-size", "32", "--no-progress"))
    assert str(a_file) in line and "Not a directory" in line
