"""Writing a run has one owner: `create(models, name, kind)` checks the folder and the name,
stages the run, and on leaving the block renames it in whole (pipeline/runs/files.py); the
`RunWriter` it yields stamps every config with `format_version`, `name`, `kind` and `created`,
writes labels.txt and splits.csv beside it, the history, and scores the splits (metrics.json, the
reports). Stage two and stage three add only their own parts: the model and their config keys.

A finished run is scored again (evaluate) through `rescoring(run)`, staged the same way: the new
metrics and reports are written in a hidden folder inside the run and moved in when complete.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic, report
from pipeline.cache.store import SplitIndex
from pipeline.errors import PipelineError
from pipeline.runs import files
from pipeline.runs.record import FORMAT_VERSION, KINDS
from pipeline.runs.scoring import REPORTED_SPLIT, score_splits


class RunWriter:
    """A run being written in its staging directory (`directory`); see `create`."""

    def __init__(self, directory: Path, name: str, kind: str) -> None:
        self.directory = directory
        self.name = name
        self.kind = kind
        self.config: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        self.report = ""

    def write_config(self, config: Mapping[str, Any], class_names: Sequence[str],
                     splits: Mapping[str, SplitIndex]) -> dict[str, Any]:
        """config.json (`config` with the run's format version, name, kind and creation time first),
        labels.txt and splits.csv (`splits`: the feature cache's split indexes, as the run read them).
        Returns the config as written."""
        self.config = {"format_version": FORMAT_VERSION, "name": self.name, "kind": self.kind, **config,
                       "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        files.write_config(self.directory, self.config)
        files.write_labels(self.directory, class_names)
        files.write_split_record(self.directory, splits)
        return self.config

    def write_history(self, rows: Sequence[dict[str, Any]], axis: str) -> None:
        """history.csv and curves.png: one row per epoch, or per C tried (`axis`)."""
        report.write_history(self.directory, rows, axis)

    def score(self, predict: Callable[[str], np.ndarray], splits: Mapping[str, Any], class_names: list[str],
              title: str, report_split: str = REPORTED_SPLIT, ordered: bool = False,
              thresholds: list[float] | None = None, threshold: float | None = None,
              groups: Mapping[str, str] | None = None) -> dict[str, Any]:
        """metrics.json for every split and the reports of `report_split` (see score_splits)."""
        self.metrics, self.report = score_splits(self.directory, predict, splits, class_names, title, report_split,
                                                 ordered, thresholds, threshold, groups)
        return self.metrics

    def add_metrics(self, extra: Mapping[str, Any]) -> None:
        """Merge `extra` into metrics.json (for example the test figures before fine-tuning)."""
        self.metrics = self.metrics | dict(extra)
        files.write_metrics(self.directory, self.metrics)


@contextmanager
def create(models: Path, name: str, kind: str) -> Iterator[RunWriter]:
    """A new run `models/<name>` of `kind` ("head" or "finetune"), written in a staging directory
    and renamed in when the block ends without an error (replacing an earlier run of that name);
    on an error or an interrupt nothing is left. The name and the folder are checked first."""
    if kind not in KINDS:
        raise PipelineError(f"unknown run kind {kind!r}: {', '.join(KINDS)}")
    files.check_run_name(name)
    with files.staged(Path(models) / name) as directory:
        yield RunWriter(directory, name, kind)


RESCORING = "rescoring"  # the staging folder's name: RUN/.rescoring.tmp-<pid>-<random>


@contextmanager
def rescoring(run: Path, into: str = "") -> Iterator[Path]:
    """Score a finished run again: yields a hidden staging folder inside `run` holding the metrics
    of `run/into` (the run itself by default; "tta-flip" for its test-time views), to
    score into (score_splits merges the new splits' metrics into it). When the block ends without
    an error, the staged files are moved into `run/into`, metrics.json last, each file replaced in
    one rename; on an error or an interrupt the staging folder goes and the run's scores stay as
    they were. A killed evaluate's staging folder is removed by the next one. Nothing else in the
    run (its config, model, labels, split record) is touched."""
    run = Path(run)
    destination = run / into if into else run
    files.remove_leftovers(run)
    atomic.remove_abandoned_temporaries(destination)  # e.g. a killed older evaluate's .metrics.json.<pid>.tmp
    staging = run / f".{RESCORING}.tmp-{atomic.staging_token()}"
    try:
        staging.mkdir()
        earlier = files.read_metrics(destination)
        if earlier:
            files.write_metrics(staging, earlier)
        yield staging
        _move_in(staging, destination)
    except OSError as error:
        raise atomic.write_error(destination, error, "the run's earlier scores were kept") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_in(staging: Path, destination: Path) -> None:
    """Every file under `staging` to the same place under `destination`, metrics.json last."""
    staged = sorted((path for path in staging.rglob("*") if path.is_file()),
                    key=lambda path: (path.relative_to(staging) == Path(files.METRICS), str(path)))
    for path in staged:
        target = destination / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
