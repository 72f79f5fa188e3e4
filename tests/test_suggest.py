"""What to label next: suggest ranks a cache's unlabelled images by a run's uncertainty and by
diversity, writes a labels table that train-head reads back (filled in) with no backbone pass."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import pipeline
from conftest import FAST_LOGREG, clustered_features, write_feature_cache
from pipeline.auditing.suggest import uncertainty, weighted_k_center
from pipeline.cache.store import FeatureStore
from pipeline.cli import main
from pipeline.errors import PipelineError


@pytest.fixture
def half_labelled(tmp_path: Path) -> dict:
    """Three clusters; a labels table names a third of the images; the rest are unlabelled."""
    features, labels, splits = clustered_features(240, 3, seed=5, shape=(12,), separation=3.0)
    store = FeatureStore(write_feature_cache(tmp_path / "features" / "pool", features, labels, splits,
                                             ["a", "b", "c"], pooling="avg"))
    rows = store.rows_index()
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "kind"])
        writer.writerows([p, store.class_names[k]] if i % 3 == 0 else [p, ""]
                         for i, (p, k) in enumerate(zip(rows.paths, rows.labels)))
    run = pipeline.train_head(store, labels=table, label="kind", models=tmp_path / "models", progress=False,
                              **FAST_LOGREG)
    return {"store": store, "table": table, "run": run, "root": tmp_path, "truth": dict(zip(rows.paths, rows.labels))}


def test_suggest_writes_a_labels_table_that_train_head_reads_back(half_labelled: dict) -> None:
    root, run, store = half_labelled["root"], half_labelled["run"], half_labelled["store"]
    found = pipeline.suggest(model=run, budget=20, out=root / "next.csv", progress=False)
    assert len(found.rows) == 20 and found.details["unlabelled"] == 160
    with open(root / "next.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == ["path", "id", "kind", "guess", "score", "rank"]
    labelled = set(run.split_record)
    assert not {row["path"] for row in table} & labelled  # only unlabelled images are suggested
    for row in table:  # "labelled" from the truth, as a person would
        row["kind"] = store.class_names[half_labelled["truth"][row["path"]]]
    with open(root / "next.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    again = pipeline.train_head(store, labels=[half_labelled["table"], root / "next.csv"], label="kind",
                                models=root / "models", progress=False, **FAST_LOGREG)
    counts = again.config["labelling"]["counts"]
    assert sum(counts[s] for s in ("train", "validation", "test")) == 80 + 20


def test_the_suggestions_are_uncertain_and_spread(half_labelled: dict) -> None:
    found = pipeline.suggest(model=half_labelled["run"], budget=10, progress=False)
    assert len({row["path"] for row in found.rows}) == 10
    assert [row["rank"] for row in found.rows] == list(range(1, 11))
    features, _, splits = clustered_features(40, 2, seed=2, shape=(12,))
    unlabelled = write_feature_cache(half_labelled["root"] / "features" / "flat", features, np.full(40, -1), splits,
                                     ["x"], pooling="avg")
    alone = pipeline.suggest(unlabelled, budget=5, progress=False)
    assert "diversity alone" in alone.details["how"] and alone.details["notes"]
    assert alone.details["unlabelled"] == 40 and len(alone.rows) == 5


def test_weighted_k_center_spreads_its_choices() -> None:
    points = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.14, 0.99], [-1, 0]], np.float64)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    chosen = weighted_k_center(points, np.ones(5), 3, None)
    assert sorted(chosen) in ([0, 2, 4], [1, 2, 4], [0, 3, 4], [1, 3, 4])
    assert uncertainty(np.array([[0.5, 0.5], [1.0, 0.0]])).tolist() == [1.0, 0.0]


def test_suggest_refuses_in_one_line(half_labelled: dict, capsys) -> None:
    with pytest.raises(PipelineError, match="is more than the 160 unlabelled images"):
        pipeline.suggest(model=half_labelled["run"], budget=161, progress=False)
    features, labels, splits = clustered_features(30, 3, seed=1, shape=(12,))
    full = write_feature_cache(half_labelled["root"] / "features" / "full", features, labels, splits,
                               ["a", "b", "c"], pooling="avg")
    with pytest.raises(PipelineError, match="has no unlabelled images"):
        pipeline.suggest(full, budget=1, progress=False)
    assert main(["suggest", "--model", str(half_labelled["run"].directory), "--budget", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["rows"]) == 3
