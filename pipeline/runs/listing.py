"""All runs under a models folder: listed side by side (read through the one run parser,
pipeline/runs/record.py, lenient where one damaged run must not hide the others), and the best.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline import atomic
from pipeline.atomic import one_line
from pipeline.errors import PipelineError, command
from pipeline.runs.files import CONFIG, METRICS, is_visible_run
from pipeline.runs.record import RunRecord


def list_runs(models_root: Path, data: Path | None = None) -> list[dict[str, Any]]:
    """One row per finished run under `models_root` (of the data folder `data` if given), best
    validation accuracy first. Every run is read through the one run reader (RunRecord.read);
    staging and retired directories are never listed; a run that reader refuses, or whose
    metrics.json is missing or damaged, is listed with its problem (it can never win `best`), and
    an accuracy that is not a number from 0 to 1 counts as none."""
    rows = []
    wanted = _data_key(data) if data is not None else None
    for config_path in sorted(Path(models_root).glob(f"*/{CONFIG}")):
        directory = config_path.parent
        if not is_visible_run(directory):
            continue
        try:
            record = RunRecord.read(directory)
            metrics = atomic.read_json(directory / METRICS)
            if not isinstance(metrics, dict):
                raise ValueError("not a JSON object")
            row = _run_row(record, metrics)
        except PipelineError as error:
            row = {"name": directory.name, "problem": one_line(error)}
        except (OSError, ValueError, TypeError, AttributeError, RecursionError):
            row = {"name": directory.name, "problem": "metrics.json missing or damaged"}
        if wanted is None or row.get("data") == wanted:
            rows.append(row)
    return sorted(rows, key=lambda r: (-(r.get("validation_accuracy") or -1.0), r["name"]))


def _run_row(record: RunRecord, metrics: dict[str, Any]) -> dict[str, Any]:
    config = record.config
    features = _mapping(config.get("features"))

    def split(name: str) -> dict[str, Any]:
        return _mapping(metrics.get(name))

    return {
        "name": record.name,
        "kind": record.kind,
        "head": _text(_mapping(config.get("head")).get("kind")),
        "data": _text(features.get("data")),
        "backbone": record.backbones,  # fused: their backbones joined by +
        "image_size": record.fingerprint.image_size,
        "layers": ";".join(",".join(part.view.layers) for part in record.parts),  # fused: each one's, by ;
        "pooling": record.view.pooling,
        "pretrained": features.get("pretrained") if isinstance(features.get("pretrained"), bool) else None,
        "validation_accuracy": _fraction(split("validation").get("accuracy")),
        "test_accuracy": _fraction(split("test").get("accuracy")),
        "validation_accuracy_ci95": _interval(split("validation")),
        "test_accuracy_ci95": _interval(split("test")),
        "test_mean_per_class_accuracy": _fraction(split("test").get("mean_per_class_accuracy")),
        "validation_loss": _number(split("validation").get("loss")),
        "validation_ece": _fraction(split("validation").get("ece")),
        "test_loss": _number(split("test").get("loss")),
        "test_ece": _fraction(split("test").get("ece")),  # none for runs scored before ECE was recorded
        "excluded": _number(_mapping(config.get("excluded")).get("from_training")),  # images left out of training
        "split_counts": "/".join(str(_mapping(features.get("counts")).get(split, "?"))
                                 for split in ("train", "validation", "test")),
        "seconds": _number(config.get("seconds")),
        "created": _text(config.get("created")),
    }


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: Any) -> float | None:
    """A finite number, else None (JSON has no NaN or Infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _fraction(value: Any) -> float | None:
    """An accuracy: a number from 0 to 1, else None."""
    value = _number(value)
    return value if value is not None and 0 <= value <= 1 else None


def _data_key(data: Path) -> str:
    return str(Path(data).resolve())


def best_run(models_root: Path, kind: str | None = None, data: Path | None = None) -> Path:
    """The finished run with the highest validation accuracy (of `kind`: head or finetune), near
    ties broken by validation log loss (near_tie_by_loss), among the runs of one data folder: `data`,
    or the only one the runs under `models_root` were trained on. Validation accuracies of
    different folders are measured on different images, so where runs of several folders stand
    side by side `best` asks which one."""
    rows = [r for r in list_runs(models_root, data)
            if r.get("validation_accuracy") is not None and (kind is None or r.get("kind") == kind)]
    if not rows:
        what = "head run" if kind == "head" else "run"
        where = f" on {data}" if data is not None else ""
        raise PipelineError(f"no {what}{where} under {models_root}/: train one with `{command()} train-head` first")
    folders = sorted({r["data"] for r in rows if r.get("data")})
    if data is None and len(folders) > 1:
        shown = ", ".join(folders[:4]) + (", ..." if len(folders) > 4 else "")
        raise PipelineError(f"best: the runs under {models_root}/ were trained on {len(folders)} data folders "
                            f"({shown}), whose validation accuracies do not compare: add --data DIR to choose among "
                            "one folder's runs, or name the run")
    return Path(models_root) / near_tie_by_loss(rows)["name"]


def near_tie_by_loss(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The best of `rows` (best validation accuracy first): the top run, unless runs whose 95%
    validation intervals overlap its own (a tie the validation split cannot break) have a lower
    validation log loss, the better calibrated probabilities: then the lowest-loss run of those.
    Runs without an interval or a loss (made before they were recorded) compete on accuracy alone."""
    top = rows[0]
    if top.get("validation_accuracy_ci95") is None or top.get("validation_loss") is None:
        return top
    low = top["validation_accuracy_ci95"][0]
    tied = [r for r in rows if r.get("validation_accuracy_ci95") is not None and r.get("validation_loss") is not None
            and r["validation_accuracy_ci95"][1] >= low]
    return min(tied, key=lambda r: (r["validation_loss"], -(r["validation_accuracy"] or 0), r["name"]))


def resolve(run: str | Path, models_root: Path, kind: str | None = None, data: Path | None = None) -> Path:
    """`best` (the best run, of `kind`, of the data folder `data`) or a run directory as given."""
    return best_run(models_root, kind, data) if str(run) == "best" else Path(run)


def _interval(split_metrics: dict[str, Any]) -> list[float] | None:
    """[low, high] of a split's 95% accuracy interval (absent in runs made before it was recorded)."""
    low, high = _fraction(split_metrics.get("accuracy_ci95_low")), _fraction(split_metrics.get("accuracy_ci95_high"))
    return None if low is None or high is None else [low, high]
