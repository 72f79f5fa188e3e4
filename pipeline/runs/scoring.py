"""Scoring a run: metrics.json for every split and the reports of one, the end of stage two and
stage three alike."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic, report
from pipeline.heads.ordinal import ordinal_metrics
from pipeline.runs.files import read_metrics, write_metrics

REPORTED_SPLIT = "test"  # whose reports sit at the top of a run directory


@dataclass
class RunSummary:
    """What training or scoring a run left: its directory, metrics, the report of its reported split."""

    directory: Path
    metrics: dict[str, Any]
    seconds: float
    report: str
    in_memory: bool
    config: dict[str, Any]

def score_splits(directory: Path, predict: Callable[[str], np.ndarray], splits: Mapping[str, Any],
                 class_names: list[str], title: str, report_split: str = REPORTED_SPLIT,
                 ordered: bool = False, thresholds: list[float] | None = None,
                 threshold: float | None = None,
                 groups: Mapping[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """metrics.json for every split (`splits` maps a split to something with labels and paths;
    `predict(split)` gives its probabilities), and the reports of `report_split` (at the top of the
    run directory for the test split, in a subfolder named after any other). `ordered`: the classes
    are ordered levels, and every split's metrics add the order's figures under "ordinal" (each cut
    as a binary classifier, the error in levels: pipeline/heads/ordinal.py). `thresholds`: a
    multi-label run, each label decided at its threshold (report.multilabel_metrics); `threshold`:
    a binary run deciding class 1 at or above it. `groups`: path -> a value (a labels table's
    --metrics-by column): each split's figures also per value, under "by_group". Returns the metrics
    and the report text."""
    atomic.remove_abandoned_temporaries(directory)  # e.g. a killed evaluate's .metrics.json.<pid>.tmp
    metrics: dict[str, Any] = {}
    text = ""
    for split, data in splits.items():
        proba = predict(split)
        if thresholds is not None:
            metrics[split] = report.multilabel_metrics(data.targets, proba, thresholds, class_names)
            if split == report_split and len(data):
                target = directory if split == REPORTED_SPLIT else directory / split
                text = report.write_multilabel_reports(target, data.targets, proba, thresholds, data.paths,
                                                       class_names, f"{title}: {split} split, {len(data)} images")
            if groups is not None:
                metrics[split]["by_group"] = _by_group(data, proba, class_names, groups, threshold, thresholds)
            continue
        metrics[split] = report.split_metrics(data.labels, proba, class_names, threshold)
        if groups is not None:
            metrics[split]["by_group"] = _by_group(data, proba, class_names, groups, threshold, thresholds)
        targets = getattr(data, "targets", None)
        if targets is not None and thresholds is None:  # soft targets: the scores against them beside the hard ones
            metrics[split]["soft"] = report.soft_metrics(targets, proba)
        if ordered:
            metrics[split]["ordinal"] = ordinal_metrics(data.labels, proba, class_names)
        if split == report_split and len(data):
            target = directory if split == REPORTED_SPLIT else directory / split
            text = report.write_split_reports(target, data.labels, proba, data.paths, class_names,
                                              f"{title}: {split} split, {len(data)} images", threshold)
        elif split == report_split:
            text = f"the {split} split has no images: no report for it"
    write_metrics(directory, read_metrics(directory) | metrics)
    return metrics, text


def _by_group(data: Any, proba: np.ndarray, class_names: list[str], groups: Mapping[str, str],
              threshold: float | None, thresholds: list[float] | None) -> dict[str, Any]:
    """The split's figures for the images of each value of `groups` (path -> value)."""
    values = [groups.get(path) for path in data.paths]
    out = {}
    for value in sorted({v for v in values if v is not None}):
        rows = np.array([i for i, v in enumerate(values) if v == value], np.int64)
        if thresholds is not None:
            out[value] = report.multilabel_metrics(np.asarray(data.targets)[rows], proba[rows], thresholds,
                                                   class_names)
        else:
            out[value] = report.split_metrics(np.asarray(data.labels)[rows], proba[rows], class_names, threshold)
            if getattr(data, "targets", None) is not None:
                out[value]["soft"] = report.soft_metrics(np.asarray(data.targets)[rows], proba[rows])
    return out
