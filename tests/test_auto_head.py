"""`train-head --head auto` (issue 42): every candidate head fitted and kept as a run, the best on
validation chosen, the comparison printed with intervals and written beside the runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from commandline import in_process
from conftest import pooled_cluster_cache
from pipeline import api
from pipeline.errors import PipelineError


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pooled_cluster_cache(tmp_path_factory.mktemp("auto-head"), 240, seed=6, dimension=12, separation=0.35)


def test_auto_keeps_every_candidate_and_returns_the_best_on_validation(cache: Path, tmp_path: Path) -> None:
    run = api.train_head(cache, head="auto", candidates=["logreg", "knn", "sklearn"], c_grid="1e-2:1e2:5",
                         k_grid="1,5", models=tmp_path, progress=False)
    rows = run.comparison.rows
    assert [row["head"] for row in rows] == ["logreg", "knn", "sklearn"]
    for row in rows:  # each candidate is a finished run with its own figures
        metrics = json.loads((Path(row["run"]) / "metrics.json").read_text())
        assert row["validation_accuracy"] == metrics["validation"]["accuracy"]
        assert row["validation_ci95_low"] <= row["validation_accuracy"] <= row["validation_ci95_high"]
        assert row["test_accuracy"] == metrics["test"]["accuracy"]
    best = max(row["validation_accuracy"] for row in rows)
    chosen = [row for row in rows if row["chosen"]]
    assert len(chosen) == 1 and chosen[0]["validation_accuracy"] == best
    assert Path(chosen[0]["run"]) == run.directory and run.config["head"]["kind"] == chosen[0]["head"]
    # the parameters went to the heads they apply to
    assert json.loads((Path(rows[0]["run"]) / "config.json").read_text())["head"]["params"]["c_grid"] == "1e-2:1e2:5"
    assert json.loads((Path(rows[1]["run"]) / "config.json").read_text())["head"]["params"]["k_grid"] == "1,5"
    with run.comparison.path.open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["head"] for r in table] == ["logreg", "knn", "sklearn"] and sum(r["chosen"] == "True" for r in table) == 1
    listed = {row["name"] for row in api.list_runs(tmp_path)}
    assert {Path(row["run"]).name for row in rows} <= listed and "comparisons" not in listed


def test_the_command_line_compares_the_default_heads_and_prints_the_table(cache: Path, tmp_path: Path, capsys) -> None:
    result = in_process(capsys, "train-head", "--features", str(cache), "--models", str(tmp_path), "--head", "auto",
                     "--epochs", "3", "--c-grid", "1e-1:1e1:3", "--no-progress")
    assert result.returncode == 0, result.stderr
    for kind in ("logreg", "svm", "knn", "dense"):
        assert f" {kind} " in result.stdout
    assert "chosen:" in result.stdout and "[" in result.stdout  # the intervals
    result = in_process(capsys, "train-head", "--features", str(cache), "--models", str(tmp_path), "--head", "auto",
                     "--candidates", "logreg,knn", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["chosen"] in ("logreg", "knn") and len(summary["candidates"]) == 2
    assert Path(summary["comparison"]).is_file()


@pytest.mark.parametrize("settings,says", [
    ({"head": "auto", "candidates": ["logreg", "forest"]}, "--candidates logreg,forest"),
    ({"head": "auto", "candidates": ["knn", "knn"]}, "named once each"),
    ({"head": "auto", "candidates": ["knn"], "units": 8}, "--units applies to none of the candidates"),
    ({"head": "logreg", "candidates": ["knn"]}, "--candidates applies to --head auto only"),
])
def test_bad_candidates_are_one_line_before_any_run(cache: Path, tmp_path: Path, settings: dict, says: str) -> None:
    with pytest.raises(PipelineError, match=says):
        api.train_head(cache, models=tmp_path, progress=False, **settings)
    assert not any(tmp_path.iterdir())
