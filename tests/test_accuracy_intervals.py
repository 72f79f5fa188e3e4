"""Accuracy with its 95% Wilson interval: in metrics.json, the text reports, the terminal and `runs`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from conftest import make_image_folder, tiny_options
from pipeline.cli import main
from pipeline.extraction.extract import extract_features
from pipeline.report import split_metrics, wilson_interval


@pytest.mark.parametrize("correct, total", [(552, 647), (0, 10), (10, 10), (1, 3), (81, 263), (5000, 5001)])
def test_wilson_interval_matches_scipys(correct: int, total: int) -> None:
    expected = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(correct, total)
    assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-12)
    assert 0 <= low <= correct / total <= high <= 1


def test_the_interval_narrows_with_the_split_size() -> None:
    widths = [np.subtract(*wilson_interval(int(0.85 * n), n)[::-1]) for n in (100, 647, 5000)]
    assert widths[0] > widths[1] > widths[2]
    # ELPV's test split (647 images at 85%): about +-2.8 points, twice the 1.4-point standard error
    assert widths[1] / 2 == pytest.approx(0.0275, abs=0.002)


def test_split_metrics_carry_the_interval_of_their_accuracy() -> None:
    labels = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1])
    proba = np.eye(2)[[0, 1, 1, 1, 1, 0, 0, 0, 1, 1]]
    metrics = split_metrics(labels, proba, ["a", "b"])
    assert metrics["accuracy"] == 0.8
    assert (metrics["accuracy_ci95_low"], metrics["accuracy_ci95_high"]) == pytest.approx(wilson_interval(8, 10))
    assert all(isinstance(v, int | float) for v in metrics.values())  # a flat mapping: pytest.approx compares it


def test_runs_reports_and_the_terminal_show_the_interval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_image_folder(tmp_path / "data", per_class=10)
    cache = extract_features(tiny_options(data, tmp_path / "features")).cache_dir
    assert main(["train-head", "--head", "logreg", "--features", str(cache), "--models", str(tmp_path / "models"),
                 "--no-progress", "--name", "r"]) == 0
    out = capsys.readouterr().out
    assert "95% CI" in out
    metrics = json.loads((tmp_path / "models" / "r" / "metrics.json").read_text())
    for split in ("train", "validation", "test"):
        low, high = metrics[split]["accuracy_ci95_low"], metrics[split]["accuracy_ci95_high"]
        assert low <= metrics[split]["accuracy"] <= high
    assert "95% CI" in (tmp_path / "models" / "r" / "classification_report.txt").read_text()
    assert main(["runs", "--models", str(tmp_path / "models")]) == 0
    table = capsys.readouterr().out
    assert table.count("95% CI") >= 2 and "Wilson" in table
    assert main(["runs", "--models", str(tmp_path / "models"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    test = metrics["test"]
    assert rows[0]["test_accuracy_ci95"] == [test["accuracy_ci95_low"], test["accuracy_ci95_high"]]
