"""The command line: one-line errors with a non-zero exit, a summary on success."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, make_image_folder
from pipeline.cli import main
from pipeline.data.demo import class_of, elpv_data_dir, elpv_labels


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
