"""`train-head --head auto`: every candidate head fitted on the same cached features, each kept as
its own run, the one with the highest validation accuracy chosen (ties: the lower validation loss),
and the comparison written beside the runs (models/comparisons/<chosen run>.csv and .json) and
printed with validation and test accuracy and their 95% intervals.

The test split is shown, never used to choose: choosing on it would make its figure optimistic.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import atomic, tables
from pipeline.errors import PipelineError
from pipeline.heads import HEADS
from pipeline.runs import RunSummary

CANDIDATES = ("logreg", "svm", "knn", "dense")  # the default: every registered head with its own search
COMPARISONS = "comparisons"  # under the runs root: not a run (no config.json), never listed by `runs`
COLUMNS = ("head", "run", "validation_accuracy", "validation_ci95_low", "validation_ci95_high", "validation_loss",
           "test_accuracy", "test_ci95_low", "test_ci95_high", "seconds", "chosen")


@dataclass
class Comparison:
    chosen: RunSummary
    rows: list[dict[str, Any]]  # one per candidate, in the order fitted
    path: Path  # the comparison's CSV (its JSON beside it)


def check_candidates(candidates: Sequence[str] | str | None, params: Mapping[str, Any],
                     task: str = "classes") -> list[str]:
    """The heads to compare (default CANDIDATES: those of them that take the task's labels, for soft
    targets and multi-label tables), each known and named once, and every given head parameter
    applying to at least one of them."""
    if candidates is None:
        kinds = [kind for kind in CANDIDATES if task == "classes" or (task == "soft" and HEADS[kind].SOFT_TARGETS)
                 or (task == "multilabel" and HEADS[kind].MULTILABEL)]
    else:
        given = [candidates] if isinstance(candidates, str) else list(candidates)
        kinds = [part.strip() for entry in given for part in str(entry).split(",")]  # "a,b" as on the command line
    unknown = [kind for kind in kinds if kind not in HEADS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise PipelineError(f"--candidates {','.join(kinds)}: heads named once each, from {', '.join(sorted(HEADS))}")
    for name in params:
        if not any(name in HEADS[kind].DEFAULTS for kind in kinds):
            raise PipelineError(f"--{name.replace('_', '-')} applies to none of the candidates ({', '.join(kinds)})")
    return kinds


def _row(kind: str, summary: RunSummary) -> dict[str, Any]:
    validation, test = summary.metrics.get("validation", {}), summary.metrics.get("test", {})
    return {"head": kind, "run": str(summary.directory),
            "validation_accuracy": validation.get("accuracy"),
            "validation_ci95_low": validation.get("accuracy_ci95_low"),
            "validation_ci95_high": validation.get("accuracy_ci95_high"),
            "validation_loss": validation.get("loss"),
            "test_accuracy": test.get("accuracy"), "test_ci95_low": test.get("accuracy_ci95_low"),
            "test_ci95_high": test.get("accuracy_ci95_high"), "seconds": round(summary.seconds, 3), "chosen": False}


def compare_heads(train: Callable[[str, dict[str, Any], str | None], RunSummary], kinds: Sequence[str],
                  params: Mapping[str, Any], models: Path, name: str | None, progress: bool) -> Comparison:
    """Fit every head of `kinds` by `train(kind, its parameters, run name)`; choose, write and
    return the comparison."""
    summaries, rows = [], []
    for number, kind in enumerate(kinds, 1):
        if progress:
            print(f"auto: fitting the {kind} head ({number} of {len(kinds)})", file=sys.stderr, flush=True)
        own = {key: value for key, value in params.items() if key in HEADS[kind].DEFAULTS}
        summary = train(kind, own, None if name is None else f"{name}-{kind}")
        summaries.append(summary)
        rows.append(_row(kind, summary))
    scored = [i for i, row in enumerate(rows) if row["validation_accuracy"] is not None]
    if not scored:
        raise PipelineError("no candidate has a validation accuracy (the cache has no validation images): --head "
                            "auto chooses on validation; extract with a validation split, or name a head")
    loss = [math.inf if row["validation_loss"] is None else row["validation_loss"] for row in rows]
    best = min(scored, key=lambda i: (-rows[i]["validation_accuracy"], loss[i], i))
    rows[best]["chosen"] = True
    chosen = summaries[best]
    folder = Path(models) / COMPARISONS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{chosen.directory.name}.csv"
    with atomic.replacing(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as handle:
        table = tables.writer(handle)
        table.writerow(COLUMNS)
        table.writerows([[row[column] for column in COLUMNS] for row in rows])
    atomic.write_json(path.with_suffix(".json"), {"chosen": rows[best]["head"], "run": rows[best]["run"],
                                                  "chosen_by": "validation accuracy, ties by validation loss",
                                                  "candidates": rows})
    return Comparison(chosen, rows, path)


def comparison_text(comparison: Comparison) -> str:
    """The table a person reads: one line per head, the chosen one marked."""

    def accuracy(row: dict[str, Any], split: str) -> str:
        value = row[f"{split}_accuracy"]
        if value is None:
            return "-"
        low, high = row[f"{split}_ci95_low"], row[f"{split}_ci95_high"]
        return f"{value:.2%} [{low:.1%}, {high:.1%}]" if low is not None else f"{value:.2%}"

    lines = ["head comparison (chosen on validation accuracy, ties by validation loss; test shown, not used):",
             f"  {'head':<9}{'validation (95% CI)':<27}{'test (95% CI)':<27}{'val loss':>9}{'seconds':>9}"]
    for row in comparison.rows:
        loss = "-" if row["validation_loss"] is None else f"{row['validation_loss']:.4f}"
        mark = "*" if row["chosen"] else " "
        lines.append(f"{mark} {row['head']:<9}{accuracy(row, 'validation'):<27}{accuracy(row, 'test'):<27}"
                     f"{loss:>9}{row['seconds']:>9.1f}")
    lines.append(f"chosen: {next(r['head'] for r in comparison.rows if r['chosen'])}, run {comparison.chosen.directory}"
                 f"; every candidate is a run (`runs` lists them); table: {comparison.path}")
    return "\n".join(lines)
