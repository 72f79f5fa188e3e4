"""The run directory, from birth to listing: one module owns it.

A run (`models/<name>/`) is created in a hidden staging directory (`.<name>.tmp-<pid>`) and
renamed into place when complete, so it appears whole, under its own name, or not at all.
Staging and retired directories are never listed or chosen, and those of dead processes are
removed by the next run. Reading a run reads JSON, text and plain arrays only: nothing in a run
directory is ever unpickled or executed.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import atomic
from pipeline.errors import PipelineError

CONFIG = "config.json"
METRICS = "metrics.json"
LABELS_FILE = "labels.txt"
SPLIT_RECORD = "splits.csv"  # the split of every image a run was trained, validated and tested on
MODEL_FILE = "model.keras"  # a fine-tuned run's end-to-end model
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


def check_run_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", name):
        raise PipelineError(
            f"run name {name!r}: use letters, digits and . _ + = - (no slashes, not starting with a dot)"
        )
    if len(name.encode()) > 200:
        raise PipelineError(f"run name {name[:40]}...: {len(name.encode())} bytes is too long; use at most 200")
    return name


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_leftovers(models_root: Path) -> list[Path]:
    """Delete the staging and retired directories of processes that no longer run (a killed
    train-head or finetune). Returns what was removed."""
    removed = []
    root = Path(models_root)
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match and entry.is_dir() and not _alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def check_writable(models_root: Path) -> None:
    """Fail before any work when runs cannot be saved under `models_root`."""
    root = Path(models_root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        atomic.probe_writable(root)
    except OSError as error:
        raise PipelineError(atomic.os_error_message(error, "cannot save runs in")) from None


@contextmanager
def staged(final: Path) -> Iterator[Path]:
    """Yield a hidden staging directory beside `final`; on success it replaces `final` in one
    rename (an earlier run of that name is retired and removed). On failure nothing is left."""
    final = Path(final)
    check_writable(final.parent)
    remove_leftovers(final.parent)
    with atomic.replacing_directory(final, "no run was left half-written") as staging:
        yield staging


def is_visible_run(directory: Path) -> bool:
    return not directory.name.startswith(".")


# --- what a run holds -----------------------------------------------------------------------------


def write_run_files(directory: Path, config: dict[str, Any], class_names: Sequence[str],
                    paths_by_split: dict[str, Sequence[str]]) -> None:
    """What every run holds besides its model and reports: config.json, labels.txt, splits.csv."""
    write_config(directory, config)
    write_labels(directory, class_names)
    write_split_record(directory, paths_by_split)


def write_config(directory: Path, config: dict[str, Any]) -> None:
    atomic.write_json(Path(directory) / CONFIG, config)


def read_config(run: Path) -> dict[str, Any]:
    run = Path(run)
    path = run / CONFIG
    if not run.is_dir():
        raise PipelineError(f"run {run} does not exist: see `run_pipeline.py runs` for the runs there are")
    if not is_visible_run(run):
        raise PipelineError(f"{run} is a staging directory, not a finished run: see `run_pipeline.py runs`")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: {run} is not a complete run; train it again") from None
    except (OSError, ValueError) as error:
        raise PipelineError(f"{path} is damaged ({atomic.one_line(error)}): train the run again") from None
    if not isinstance(config, dict):
        raise PipelineError(f"{path} is damaged (not a JSON object): train the run again")
    return config


def write_labels(directory: Path, class_names: Sequence[str]) -> None:
    atomic.write_text(Path(directory) / LABELS_FILE, "".join(f"{name}\n" for name in class_names))


def read_labels(run: Path) -> list[str]:
    path = Path(run) / LABELS_FILE
    try:
        return path.read_text(encoding="utf-8").split("\n")[:-1]
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: train the run again") from None
    except (OSError, ValueError) as error:
        raise PipelineError(f"{path} is damaged ({atomic.one_line(error)}): train the run again") from None


def read_metrics(run: Path) -> dict[str, Any]:
    """metrics.json, or {} where it is missing or damaged (evaluate rewrites it)."""
    try:
        metrics = json.loads((Path(run) / METRICS).read_text())
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def write_metrics(directory: Path, metrics: dict[str, Any]) -> None:
    atomic.write_json(Path(directory) / METRICS, metrics)


def write_split_record(directory: Path, paths_by_split: dict[str, Sequence[str]]) -> None:
    """splits.csv: the split of every image the run was trained, validated and tested on."""
    with atomic.replacing(Path(directory) / SPLIT_RECORD) as temporary, \
            open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "split"])
        for split, paths in paths_by_split.items():
            writer.writerows((path, split) for path in paths)


def read_split_record(run: Path) -> dict[str, str] | None:
    """path -> split as the run saw them; None for runs made before the record existed."""
    path = Path(run) / SPLIT_RECORD
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = csv.reader(handle)
            if next(rows, None) != ["path", "split"]:
                raise ValueError("unexpected header")
            return {row[0]: row[1] for row in rows}
    except (OSError, ValueError, IndexError, csv.Error) as error:
        raise PipelineError(f"{path} is damaged ({atomic.one_line(error)}): train the run again") from None


def check_same_splits(run: Path, current: dict[str, Sequence[str]], cache: Path) -> None:
    """Refuse to score a run on a cache that moved images between splits since it was trained
    (a re-split would put training images into "test")."""
    recorded = read_split_record(run)
    if recorded is None:
        return
    moved = [(path, recorded[path], split) for split, paths in current.items() for path in paths
             if path in recorded and recorded[path] != split]
    if moved:
        path, was, now = moved[0]
        raise PipelineError(
            f"{cache} assigns {len(moved)} images to other splits than run {Path(run).name} was trained with "
            f"(e.g. {path}: {was} then, {now} now), so its scores would count images it was trained on: "
            "extract again with the split settings the run used, or train a new head on this cache"
        )


# --- all runs -------------------------------------------------------------------------------------


def list_runs(models_root: Path) -> list[dict[str, Any]]:
    """One row per finished run under `models_root`, best validation accuracy first. Staging and
    retired directories are never listed."""
    rows = []
    for config_path in sorted(Path(models_root).glob(f"*/{CONFIG}")):
        directory = config_path.parent
        if not is_visible_run(directory):
            continue
        try:
            config = json.loads(config_path.read_text())
            metrics = json.loads((directory / METRICS).read_text())
            if not isinstance(config, dict) or not isinstance(metrics, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError):
            rows.append({"name": directory.name, "problem": "config.json or metrics.json missing or damaged"})
            continue
        fingerprint = config.get("features", {}).get("fingerprint", {})
        rows.append({
            "name": directory.name,
            "kind": config.get("kind", "head"),
            "head": config.get("head", {}).get("kind"),
            "backbone": fingerprint.get("backbone"),
            "image_size": fingerprint.get("image_size"),
            "layers": ",".join(config.get("view", {}).get("layers", [])),
            "pooling": config.get("view", {}).get("pooling"),
            "pretrained": config.get("features", {}).get("pretrained"),
            "validation_accuracy": metrics.get("validation", {}).get("accuracy"),
            "test_accuracy": metrics.get("test", {}).get("accuracy"),
            "validation_accuracy_ci95": _interval(metrics.get("validation", {})),
            "test_accuracy_ci95": _interval(metrics.get("test", {})),
            "test_mean_per_class_accuracy": metrics.get("test", {}).get("mean_per_class_accuracy"),
            "seconds": config.get("seconds"),
            "created": config.get("created"),
        })
    return sorted(rows, key=lambda r: (-(r.get("validation_accuracy") or -1.0), r["name"]))


def best_run(models_root: Path, kind: str | None = None) -> Path:
    """The finished run with the highest validation accuracy (of `kind`: head or finetune)."""
    rows = [r for r in list_runs(models_root)
            if r.get("validation_accuracy") is not None and (kind is None or r.get("kind") == kind)]
    if not rows:
        what = "head run" if kind == "head" else "run"
        raise PipelineError(f"no {what} under {models_root}/: train one with `run_pipeline.py train-head` first")
    return Path(models_root) / rows[0]["name"]


def resolve(run: str | Path, models_root: Path, kind: str | None = None) -> Path:
    """`best` (the best run, of `kind`) or a run directory as given."""
    return best_run(models_root, kind) if str(run) == "best" else Path(run)


def _interval(split_metrics: dict[str, Any]) -> list[float] | None:
    """[low, high] of a split's 95% accuracy interval (absent in runs made before it was recorded)."""
    if "accuracy_ci95_low" not in split_metrics:
        return None
    return [split_metrics["accuracy_ci95_low"], split_metrics["accuracy_ci95_high"]]
