"""The command line: one-line errors with a non-zero exit, a summary on success."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from commandline import in_process, one_error_line, run_cli
from conftest import ROOT, THREE_CLASSES, clustered_features, make_image_folder, write_feature_cache
from pipeline import atomic, runs
from pipeline.cli import main
from pipeline.data.demo import class_of, elpv_data_dir, elpv_labels
from pipeline.errors import PipelineError


def test_extract_prints_a_summary_and_reuses_the_cache(tmp_path: Path, capsys) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4)
    args = ["extract", "--data", str(data), "--cache", str(tmp_path / "cache"), "--weights", "none",
            "--image-size", "32", "--precision", "fp32", "--no-progress"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "8 images in cache, 8 new, 0 reused, 0 skipped" in first and "images/s" in first
    assert main([*args, "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert (second["new"], second["reused"], second["backbone_batches"]) == (0, 8, 0)


def test_user_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_pipeline.py"), "extract", "--data", str(tmp_path / "missing")],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error_lines == [f"error: data folder {tmp_path / 'missing'} does not exist or is not a folder"]
    assert "Traceback" not in result.stderr


def test_unknown_backbone_is_a_clear_error(tmp_path: Path, capsys) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    assert main(["extract", "--data", str(data), "--backbone", "alexnet"]) == 1
    assert "unknown backbone 'alexnet'" in capsys.readouterr().err


def test_elpv_labels_and_classes() -> None:
    labels = elpv_labels(elpv_data_dir())
    assert len(labels) == 2624
    binary = [class_of(p, "binary") for _, p, _ in labels]
    assert (binary.count("functional"), binary.count("defective")) == (1803, 821)
    assert sorted({class_of(p, "4class") for _, p, _ in labels}) == [
        "defect-0.00", "defect-0.33", "defect-0.67", "defect-1.00"]


def test_stderr_carries_only_the_pipelines_own_lines(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    args = ["extract", "--data", str(data), "--weights", "none", "--image-size", "32", "--no-progress"]
    quiet = run_cli(*args, "--cache", str(tmp_path / "cache"))
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "", quiet.stderr
    noisy = run_cli("--debug", *args, "--cache", str(tmp_path / "other"))
    assert noisy.returncode == 0
    assert "I0000" in noisy.stderr or "cuda" in noisy.stderr, "--debug shows TensorFlow's lines"


def test_predict_output_into_a_missing_folder_fails_before_the_work(head_run: dict[str, Path], capsys) -> None:
    image = str(next((head_run["data"] / "cats").glob("*.png")))
    missing = head_run["root"] / "nowhere" / "predictions.csv"
    line = one_error_line(in_process(capsys, "predict", "--model", str(head_run["run"]), image, "--output",
                                     str(missing)))
    assert "does not exist" in line and str(missing.parent) in line


def test_os_failures_a_user_can_cause_are_one_line(tmp_path: Path, capsys) -> None:
    features, labels, splits = clustered_features(60, 3, seed=7)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, THREE_CLASSES)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for models in (a_file, a_file / "models"):
        line = one_error_line(in_process(capsys, "train-head", "--features", str(cache), "--models", str(models),
                                    "--c-grid", "1", "--n-jobs", "1", "--no-progress"))
        assert "cannot save runs in" in line
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if not os.access(read_only, os.W_OK):  # root writes anywhere: then this case cannot be built
            line = one_error_line(in_process(capsys, "train-head", "--features", str(cache), "--models",
                                             str(read_only / "m"),
                                        "--c-grid", "1", "--n-jobs", "1", "--no-progress"))
            assert "Permission denied" in line
    finally:
        read_only.chmod(0o755)
    line = one_error_line(in_process(capsys, "train-head", "--features", str(cache), "--models", str(tmp_path / "m"),
                                "--name", "x" * 300, "--c-grid", "1", "--n-jobs", "1", "--no-progress"))
    assert "too long" in line


def test_a_cache_root_that_cannot_be_created_is_one_line(tmp_path: Path, capsys) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    line = one_error_line(in_process(capsys, "extract", "--data", str(data), "--cache", str(a_file / "features"),
                                "--weights", "none", "--image-size", "32", "--no-progress"))
    assert str(a_file) in line and "Not a directory" in line


def test_a_valid_output_name_near_the_file_system_limit_gets_a_temporary_name_that_fits(tmp_path: Path) -> None:
    target = tmp_path / ("p" * 245 + ".json")
    assert len(target.name.encode()) == 250
    temporary = atomic.temporary_name(target)
    assert len(temporary.name.encode()) <= atomic.NAME_MAX and temporary.name.startswith(".")
    atomic.write_json(target, {"ok": True})
    assert json.loads(target.read_text()) == {"ok": True}
    assert atomic.temporary_name(tmp_path / ("q" * 245 + ".json")) != temporary


def test_h5pys_disk_full_error_from_close_is_one_line(tmp_path: Path) -> None:
    message = ("Can't decrement id ref count (file write failed: time = Tue Dec  1 00:00:00 2026, filename = "
               "'x.h5', file descriptor = 5, errno = 28, error message = 'No space left on device', buf = 0x1, "
               "total write size = 8, bytes this sub-write = 8, bytes actually written = 18446744073709551615, "
               "offset = 0)")
    with pytest.raises(PipelineError) as caught:
        with atomic.replacing(tmp_path / "shard.h5") as temporary:
            temporary.write_bytes(b"partial")
            raise RuntimeError(message)
    text = str(caught.value)
    assert "the disk is full" in text and "\n" not in text
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_models_folder_is_named_not_the_probe(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    models.chmod(0o500)
    try:
        if os.access(models, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(PipelineError) as caught:
            runs.check_writable(models)
        message = str(caught.value)
        assert message.startswith(f"cannot save runs in {models}: ") and ".write-test" not in message
    finally:
        models.chmod(0o700)


def test_a_pipeline_error_buried_in_a_keras_error_comes_out_as_one_line(monkeypatch, capsys) -> None:
    from pipeline.cli.commands import train_head

    def buried(args):
        raise RuntimeError("Graph execution error:\n\nDetected at node PyFunc defined at (most recent call last):\n"
                           "  File ...\npipeline.errors.PipelineError: features/x/shard-00001.h5 changed while it was "
                           "being read: rerun when the extract has finished\n\t [[{{node PyFunc}}]]")

    monkeypatch.setattr(train_head, "run", buried)
    assert main(["train-head"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: features/x/shard-00001.h5 changed while it was being read: rerun when the extract has "
                   "finished")


def test_libjpeg_and_library_warnings_stay_off_stderr() -> None:
    import warnings

    from pipeline.chatter import is_chatter, library_warnings_quiet

    assert is_chatter("Corrupt JPEG data: 1 extraneous bytes before marker 0xc0")
    assert is_chatter("Premature end of JPEG file")
    # TensorFlow's JPEG decoder reports through absl, with an E prefix
    assert is_chatter("E0000 00:00:1796291419.859174    7697 jpeg_mem.cc:332] Premature end of JPEG data. "
                      "Stopped at line 40/60")
    assert not is_chatter("E0000 00:00:1796291419.859174    7697 model.cc:12] a real error")
    assert not is_chatter("error: data/cats is not a folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with library_warnings_quiet():
            warnings.warn_explicit("a notice", UserWarning, "x.py", 1, module="sklearn.linear_model._logistic")
            warnings.warn_explicit("tight_layout not applied", UserWarning, "y.py", 1, module="matplotlib.figure")
            warnings.warn_explicit("ours", UserWarning, "z.py", 1, module="pipeline.heads.base")
    assert [str(w.message) for w in caught] == ["ours"]
