"""A run directory on disk: its name, its files (config.json, labels.txt, metrics.json, splits.csv),
and its staging: a run is made in a hidden staging directory (`.<name>.tmp-<pid>-<random>`) and
swapped into place when complete, so it appears whole, under its own name, or not at all. Staging and retired
directories are never listed or chosen, and those of dead processes are removed by the next run.
Reading a run's files reads JSON, text and CSV only: nothing in a run directory is executed.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import atomic, tables
from pipeline.cache.store import SplitIndex
from pipeline.errors import PipelineError, command

CONFIG = "config.json"
METRICS = "metrics.json"
LABELS_FILE = "labels.txt"
SPLIT_RECORD = "splits.csv"  # the split of every image a run was trained, validated and tested on
MODEL_FILE = "model.keras"  # a fine-tuned run's end-to-end model
# `.<name>.tmp-<pid>-<random>` (staging), `.old-` (moved aside), `.new-` (being made); older versions
# named them by the PID alone
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|new)-(?P<pid>\d+)(?:-[0-9a-f]+)?$")


def check_run_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", name):
        raise PipelineError(
            f"run name {name!r}: use letters, digits and . _ + = - (no slashes, not starting with a dot)"
        )
    if len(name.encode()) > 200:
        raise PipelineError(f"run name {name[:40]}...: {len(name.encode())} bytes is too long; use at most 200")
    return name


def _abandoned(entry: Path, pid: int) -> bool:
    """A staging directory is abandoned when no process holds its lock (atomic.replacing_directory):
    a PID says nothing across PID namespaces or NFS clients. Only directories without a lock file
    (made by older versions) and retired ones fall back to the PID."""
    if (entry / atomic.STAGING_LOCK).exists():
        return atomic.staging_is_abandoned(entry)
    return not atomic.process_alive(pid)


def remove_leftovers(models_root: Path) -> list[Path]:
    """Delete the staging and retired directories of processes that no longer run (a killed
    train-head or finetune). Returns what was removed."""
    removed = []
    root = Path(models_root)
    if not root.is_dir():
        return removed
    for entry in sorted(root.iterdir(), key=lambda e: ".old-" not in e.name):  # put back before removing
        match = _LEFTOVER.match(entry.name)
        if not (match and entry.is_dir() and not entry.is_symlink() and _abandoned(entry, int(match["pid"]))):
            continue
        original = root / match["name"]
        if match["kind"] == "old" and not original.exists():
            # its writer was killed between moving the old run aside and renaming the new one in
            # (a file system without an atomic swap): the old run is put back, whole
            try:
                os.rename(entry, original)
                continue
            except OSError:
                pass
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def check_writable(models_root: Path) -> None:
    """Fail before any work when runs cannot be saved under `models_root`."""
    root = Path(models_root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        atomic.probe_writable(root)
    except OSError as error:  # named by the folder, not by the probe file inside it
        reason = error.strerror or atomic.one_line(error)
        way_out = atomic.way_out(error)
        raise PipelineError(f"cannot save runs in {root}: {reason}" + (f" ({way_out})" if way_out else "")) from None


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




def write_config(directory: Path, config: dict[str, Any]) -> None:
    atomic.write_json(Path(directory) / CONFIG, config)


def read_config(run: Path) -> dict[str, Any]:
    run = Path(run)
    path = run / CONFIG
    if not run.is_dir():
        raise PipelineError(f"run {run} does not exist: see `{command()} runs` for the runs there are")
    if not is_visible_run(run):
        raise PipelineError(f"{run} is a staging directory, not a finished run: see `{command()} runs`")
    try:
        config = atomic.read_json(path)
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
        metrics = atomic.read_json(Path(run) / METRICS)
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def write_metrics(directory: Path, metrics: dict[str, Any]) -> None:
    atomic.write_json(Path(directory) / METRICS, metrics)


def write_split_record(directory: Path, splits: Mapping[str, SplitIndex]) -> None:
    """splits.csv: the split and content hash of every image the run was trained, validated and
    tested on."""
    with atomic.replacing(Path(directory) / SPLIT_RECORD) as temporary, \
            open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = tables.writer(handle)
        writer.writerow(SPLIT_RECORD_HEADER)
        for split, index in splits.items():
            writer.writerows(zip(index.paths, [split] * len(index.paths), index.sha256))


SPLIT_RECORD_HEADER = ["path", "split", "sha256"]


def check_split_record(run: Path) -> None:
    """splits.csv is there and of this version (its header): read once by RunRecord.read."""
    path = Path(run) / SPLIT_RECORD
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), None)
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing (a run of an early version, or damaged): train the run again") \
            from None
    except (OSError, ValueError, csv.Error) as error:
        raise PipelineError(f"{path} is damaged ({atomic.one_line(error)}): train the run again") from None
    if header == ["path", "split"]:
        raise PipelineError(f"{path} records no content hashes (a run of an early version): train the run again")
    if header != SPLIT_RECORD_HEADER:
        raise PipelineError(f"{path} is damaged (unexpected header): train the run again")


def read_split_record(run: Path) -> list[tuple[str, str, str]]:
    """(path, split, sha256) of every image as the run saw them. A run without this record, or with
    one that keeps no content hashes, was made by an early version: refused in one line."""
    check_split_record(run)
    path = Path(run) / SPLIT_RECORD
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = csv.reader(handle)
            next(rows)
            return [(tables.unquoted(row[0]), row[1], row[2]) for row in rows]
    except (OSError, ValueError, IndexError, csv.Error, StopIteration) as error:
        raise PipelineError(f"{path} is damaged ({atomic.one_line(error)}): train the run again") from None
