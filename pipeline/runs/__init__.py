"""Runs: a run directory written whole by one owner, read once by one reader, listed, scored and
turned into a model.

- files.py: a run directory's name, files and staging (written whole or not at all);
- record.py: the one reader of a run's files, with the format-version policy;
- writer.py: `create(models, name, kind)`, the one writer (and `rescoring(run)`, a finished run scored again);
- listing.py: every run side by side, and the best;
- run.py: `Run`, a record with behaviour (its caches, its head, its model);
- scoring.py: metrics and reports of a run's splits;
- classifier.py: a run as one Keras model from pixels to probabilities;
- novelty.py: how far an image is from a head run's training images (predict's unknowns).
"""

from pipeline.runs.files import (
    CONFIG,
    LABELS_FILE,
    METRICS,
    MODEL_FILE,
    SPLIT_RECORD,
    check_run_name,
    check_writable,
    read_config,
    read_labels,
    read_metrics,
    read_split_record,
    remove_leftovers,
    staged,
    write_config,
    write_labels,
    write_metrics,
)
from pipeline.runs.listing import best_run, list_runs, resolve
from pipeline.runs.record import FORMAT_VERSION, KINDS, Part, RunRecord
from pipeline.runs.run import Run, RunResult
from pipeline.runs.scoring import REPORTED_SPLIT, RunSummary, score_splits
from pipeline.runs.writer import RunWriter, create, rescoring

__all__ = [
    "CONFIG", "FORMAT_VERSION", "KINDS", "LABELS_FILE", "METRICS", "MODEL_FILE", "REPORTED_SPLIT", "SPLIT_RECORD",
    "Part", "Run", "RunRecord", "RunResult", "RunSummary", "RunWriter", "best_run", "check_run_name", "check_writable",
    "create",
    "list_runs", "read_config", "read_labels", "read_metrics", "read_split_record", "remove_leftovers", "rescoring",
    "resolve", "score_splits", "staged", "write_config", "write_labels", "write_metrics",
]
