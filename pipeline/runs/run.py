"""The run directory, from birth to listing, and the run it holds: one module owns both.

A run (`models/<name>/`) is created in a hidden staging directory (`.<name>.tmp-<pid>`) and
renamed into place when complete, so it appears whole, under its own name, or not at all.
Staging and retired directories are never listed or chosen, and those of dead processes are
removed by the next run. Reading a run reads JSON, text and plain arrays only: nothing in a run
directory is ever unpickled or executed.

`Run.open(path or "best")` reads a finished run once and checks it: config.json with its
`format_version` (runs written before versions existed open as version 0; a newer version is
refused in one line), labels.txt and metrics.json, their shapes and their agreement. A Run gives
the run's kind, fingerprint, feature view, class names, split record and metrics, and:

- `features()`: the feature cache it was trained on (or another of the same fingerprint);
- `head()`: the fitted head of a head run;
- `classifier(precision)`: the run as one Keras model from pixels to probabilities: the only
  place that turns a run into a model and the only place that tells a head run from a
  fine-tuned one (`trainable_classifier` gives a head run's with its backbone, to fine-tune);
- `check_same_splits()`: refuses a cache that moved images between splits since the run was made.

Scoring and writing a run's results (`score_splits`, `RunSummary`) end stage two and stage
three alike, and live here too.
"""

from __future__ import annotations

import csv
import math
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic, report
from pipeline.backbone.pooling import POOLINGS
from pipeline.cache.reader import FeatureView, open_cache
from pipeline.cache.store import FeatureStore, Fingerprint, SplitIndex
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
    for entry in root.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match and entry.is_dir() and _abandoned(entry, int(match["pid"])):
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


def write_run_files(directory: Path, config: dict[str, Any], class_names: Sequence[str],
                    splits: Mapping[str, SplitIndex]) -> None:
    """What every run holds besides its model and reports: config.json, labels.txt, splits.csv
    (`splits`: the feature cache's split indexes, as the run read them)."""
    write_config(directory, config)
    write_labels(directory, class_names)
    write_split_record(directory, splits)


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
        writer = csv.writer(handle)
        writer.writerow(["path", "split", "sha256"])
        for split, index in splits.items():
            writer.writerows(zip(index.paths, [split] * len(index.paths), index.sha256))


def read_split_record(run: Path) -> list[tuple[str, str, str]] | None:
    """(path, split, sha256) of every image as the run saw them (sha256 "" in records made before
    it was kept); None for runs made before the record existed."""
    path = Path(run) / SPLIT_RECORD
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = csv.reader(handle)
            header = next(rows, None)
            if header not in (["path", "split"], ["path", "split", "sha256"]):
                raise ValueError("unexpected header")
            return [(row[0], row[1], row[2] if len(header) == 3 else "") for row in rows]
    except (OSError, ValueError, IndexError, csv.Error) as error:
        raise PipelineError(f"{path} is damaged ({atomic.one_line(error)}): train the run again") from None


# --- all runs -------------------------------------------------------------------------------------


def list_runs(models_root: Path, data: Path | None = None) -> list[dict[str, Any]]:
    """One row per finished run under `models_root` (of the data folder `data` if given), best
    validation accuracy first. Staging and retired directories are never listed; a run whose
    files are damaged is listed with its problem, and an accuracy that is not a number from 0 to 1
    counts as none (it can never win `best`)."""
    rows = []
    wanted = _data_key(data) if data is not None else None
    for config_path in sorted(Path(models_root).glob(f"*/{CONFIG}")):
        directory = config_path.parent
        if not is_visible_run(directory):
            continue
        try:
            config = atomic.read_json(config_path)
            metrics = atomic.read_json(directory / METRICS)
            if not isinstance(config, dict) or not isinstance(metrics, dict):
                raise ValueError("not a JSON object")
            row = _run_row(directory.name, config, metrics)
        except (OSError, ValueError, TypeError, AttributeError, RecursionError):
            row = {"name": directory.name, "problem": "config.json or metrics.json missing or damaged"}
        if wanted is None or row.get("data") == wanted:
            rows.append(row)
    return sorted(rows, key=lambda r: (-(r.get("validation_accuracy") or -1.0), r["name"]))


def _run_row(name: str, config: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    features = _mapping(config.get("features"))
    fingerprint = _mapping(features.get("fingerprint"))
    view = _mapping(config.get("view"))

    def split(name: str) -> dict[str, Any]:
        return _mapping(metrics.get(name))

    fusion = [_mapping(part) for part in config.get("fusion", [])] if isinstance(config.get("fusion"), list) else []
    backbone = _text(fingerprint.get("backbone"))
    layers = ",".join(str(layer) for layer in view.get("layers", []) if isinstance(layer, str))
    if fusion:  # several caches side by side: their backbones joined by +, each one's layers by ;
        backbone = "+".join(str(_mapping(_mapping(p.get("features")).get("fingerprint")).get("backbone"))
                            for p in fusion)
        layers = ";".join(",".join(str(layer) for layer in _mapping(p.get("view")).get("layers", []))
                          for p in fusion)
    return {
        "name": name,
        "kind": _text(config.get("kind", "head")),
        "head": _text(_mapping(config.get("head")).get("kind")),
        "data": _text(features.get("data")),
        "backbone": backbone,
        "image_size": _number(fingerprint.get("image_size")),
        "layers": layers,
        "pooling": _text(view.get("pooling")),
        "pretrained": features.get("pretrained") if isinstance(features.get("pretrained"), bool) else None,
        "validation_accuracy": _fraction(split("validation").get("accuracy")),
        "test_accuracy": _fraction(split("test").get("accuracy")),
        "validation_accuracy_ci95": _interval(split("validation")),
        "test_accuracy_ci95": _interval(split("test")),
        "test_mean_per_class_accuracy": _fraction(split("test").get("mean_per_class_accuracy")),
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
    """The finished run with the highest validation accuracy (of `kind`: head or finetune), among
    the runs of one data folder: `data`, or the only one the runs under `models_root` were trained
    on. Validation accuracies of different folders are measured on different images, so where runs
    of several folders stand side by side `best` asks which one."""
    rows = [r for r in list_runs(models_root, data)
            if r.get("validation_accuracy") is not None and (kind is None or r.get("kind") == kind)]
    if not rows:
        what = "head run" if kind == "head" else "run"
        where = f" on {data}" if data is not None else ""
        raise PipelineError(f"no {what}{where} under {models_root}/: train one with `run_pipeline.py train-head` first")
    folders = sorted({r["data"] for r in rows if r.get("data")})
    if data is None and len(folders) > 1:
        shown = ", ".join(folders[:4]) + (", ..." if len(folders) > 4 else "")
        raise PipelineError(f"best: the runs under {models_root}/ were trained on {len(folders)} data folders "
                            f"({shown}), whose validation accuracies do not compare: add --data DIR to choose among "
                            "one folder's runs, or name the run")
    return Path(models_root) / rows[0]["name"]


def resolve(run: str | Path, models_root: Path, kind: str | None = None, data: Path | None = None) -> Path:
    """`best` (the best run, of `kind`, of the data folder `data`) or a run directory as given."""
    return best_run(models_root, kind, data) if str(run) == "best" else Path(run)


def _interval(split_metrics: dict[str, Any]) -> list[float] | None:
    """[low, high] of a split's 95% accuracy interval (absent in runs made before it was recorded)."""
    low, high = _fraction(split_metrics.get("accuracy_ci95_low")), _fraction(split_metrics.get("accuracy_ci95_high"))
    return None if low is None or high is None else [low, high]


# --- one run, opened ------------------------------------------------------------------------------

FORMAT_VERSION = 1  # config.json's "format_version"; runs without one are version 0 and still open
KINDS = ("head", "finetune")
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


class Run:
    """A finished run directory, read once and checked (see the module docstring)."""

    def __init__(self, directory: Path, config: dict[str, Any], class_names: list[str],
                 metrics: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.config = config
        self.class_names = class_names
        self.metrics = metrics
        self.format_version: int = config.get("format_version", 0)
        self.kind: str = config.get("kind", "head")
        features = config["features"]
        self.fingerprint = Fingerprint.from_dict(features["fingerprint"])
        self.view = FeatureView(tuple(config["view"]["layers"]), config["view"]["pooling"])
        self.trained_class_names: list[str] = list(features["class_names"])
        # (fingerprint, view, features record) of each cache the head reads, in input order: one,
        # or several for fused features
        self.parts: list[tuple[Fingerprint, FeatureView, dict[str, Any]]] = [
            (Fingerprint.from_dict(part["features"]["fingerprint"]),
             FeatureView(tuple(part["view"]["layers"]), part["view"]["pooling"]), part["features"])
            for part in config["fusion"]] if "fusion" in config else [(self.fingerprint, self.view, features)]

    @property
    def fused(self) -> bool:
        """Whether the head reads the features of several backbones side by side."""
        return len(self.parts) > 1

    @classmethod
    def open(cls, run: str | Path, models: Path = Path("models"), kind: str | None = None,
             data: Path | None = None) -> Run:
        """The run directory `run`, or `best` (the best run under `models`, of `kind` and of the
        data folder `data` if given)."""
        directory = resolve(run, models, kind, data)
        config = read_config(directory)
        way_out = "train the run again"
        version = config.get("format_version", 0)
        if not isinstance(version, int) or version < 0:
            raise PipelineError(f"{directory / CONFIG} is damaged (format_version {version!r}): {way_out}")
        if version > FORMAT_VERSION:
            raise PipelineError(f"{directory} was written by a newer version of this pipeline (run format {version}, "
                                f"this one reads up to {FORMAT_VERSION}): upgrade it, or train the run again")
        try:
            opened = cls(directory, config, read_labels(directory), read_metrics(directory))
            _check_shape(opened)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise PipelineError(f"{directory / CONFIG} is damaged (missing or wrong {error}): {way_out}") from None
        if opened.class_names != opened.trained_class_names:
            raise PipelineError(
                f"{directory / LABELS_FILE} lists {len(opened.class_names)} classes, the run was trained on "
                f"{len(opened.trained_class_names)} ({', '.join(opened.trained_class_names[:5])}...): restore "
                "labels.txt, or train the run again")
        if kind is not None and opened.kind != kind:
            raise PipelineError(f"{directory} is a {opened.kind} run: this command needs a {kind} run")
        return opened

    @property
    def name(self) -> str:
        return self.directory.name

    @cached_property
    def split_record(self) -> dict[str, str] | None:
        """path -> split as the run saw them; None for runs made before the record existed."""
        rows = read_split_record(self.directory)
        return None if rows is None else {path: split for path, split, _ in rows}

    @cached_property
    def trained_contents(self) -> dict[str, str]:
        """sha256 -> path of every image the run trained on (empty for records without hashes)."""
        return {digest: path for path, split, digest in read_split_record(self.directory) or [] if
                split == "train" and digest}

    # --- what the run was trained on ----------------------------------------------------------------

    def features(self, features: Path | None = None, cache_root: Path = Path("features")) -> FeatureStore:
        """The feature cache the run was trained on (or `features`, which must have the same
        fingerprint and classes)."""
        self._one_backbone()
        return self._cache(self.config["features"], self.fingerprint, features, cache_root)

    def fused_features(self, features: Path | None = None, cache_root: Path = Path("features")) -> list[FeatureStore]:
        """The caches a fused run was trained on, in input order."""
        if features is not None:
            raise PipelineError(f"{self.name} fuses the features of {self.backbones}: it reads the caches it was "
                                "trained on (drop --features)")
        return [self._cache(record, fingerprint, None, cache_root) for fingerprint, _, record in self.parts]

    def _one_backbone(self) -> None:
        if self.fused:
            raise PipelineError(f"{self.name} fuses the features of {self.backbones}: fine-tuning trains one backbone "
                                "under its head, so it starts from a head run of one backbone (--from RUN); fused "
                                "runs support runs, evaluate, predict and export")

    @property
    def backbones(self) -> str:
        return "+".join(fingerprint.backbone for fingerprint, _, _ in self.parts)

    def _cache(self, recorded: dict[str, Any], f: Fingerprint, features: Path | None, cache_root: Path) -> FeatureStore:
        store = open_cache(features or Path(recorded["directory"]), cache_root)
        if store.fingerprint.digest() != recorded["fingerprint_digest"]:
            raise PipelineError(
                f"{store.directory} holds features of another fingerprint than run {self.name} was trained on "
                f"({f.backbone} {f.image_size} px, {f.precision}): use that cache, or train a new head")
        if store.class_names != self.trained_class_names:
            raise PipelineError(f"{store.directory} now has classes {store.class_names}, run {self.name} was trained "
                                f"on {self.trained_class_names}: train a new head")
        return store

    def check_same_splits(self, current: Mapping[str, SplitIndex], cache: Path) -> None:
        """Refuse to score the run on a cache that moved images between splits since it was
        trained (a re-split would put training images into "test"), or that holds an image the
        run trained on under a new name in validation or test (a renamed or copied file: known by
        its content hash; copies the run already saw there are its own data's)."""
        recorded = self.split_record
        if recorded is None:
            return
        trained = self.trained_contents
        for split in ("validation", "test"):
            index = current.get(split)
            for path, digest in zip(index.paths if index else [], index.sha256 if index else []):
                if digest in trained and trained[digest] != path and recorded.get(path) != split:
                    raise PipelineError(
                        f"{cache} holds {path} in the {split} split, with the same content as {trained[digest]}, which "
                        f"run {self.name} was trained on: its scores would count an image it was trained on; remove "
                        "the copy (or train a new head on this cache)")
        moved = [(path, recorded[path], split) for split, index in current.items() for path in index.paths
                 if path in recorded and recorded[path] != split]
        if moved:
            path, was, now = moved[0]
            raise PipelineError(
                f"{cache} assigns {len(moved)} images to other splits than run {self.name} was trained with "
                f"(e.g. {path}: {was} then, {now} now), so its scores would count images it was trained on: "
                "extract again with the split settings the run used, or train a new head on this cache")

    # --- the run as a model ------------------------------------------------------------------------

    def head(self) -> Any:
        """The fitted head of a head run (checked against its sidecar)."""
        from pipeline.heads.base import Head

        if self.kind != "head":
            raise PipelineError(f"{self.directory} is a {self.kind} run: it has no separate head")
        return Head.load(self.directory)

    def classifier(self, precision: str | None = None, resize: bool = True) -> Any:
        """The run as one Keras model, pixels 0..255 -> probabilities: a head run's backbone
        rebuilt with its head on top (at `precision`, default the features'), a fine-tuned run's
        saved model (in float32 when `precision` is fp32). `resize=False`: images arrive already
        squashed to the run's size (head runs)."""
        from pipeline.runs import classifier

        if self.kind == "finetune":
            model = classifier.load_finetuned(self.directory / MODEL_FILE, float32=precision == "fp32")
        else:
            parts = [classifier.ClassifierPart(fingerprint, classifier.weights_for(fingerprint, _weights_path(record)),
                                               view) for fingerprint, view, record in self.parts]
            model, _ = classifier.build_fused_classifier(parts, self.head(), precision, resize)
        outputs = model.output_shape[-1]
        if outputs != len(self.class_names):
            raise PipelineError(f"{self.directory / LABELS_FILE} lists {len(self.class_names)} classes, the "
                                f"model has {outputs} outputs: restore labels.txt, or train the run again")
        return model

    def trainable_classifier(self, precision: str) -> tuple[Any, Any]:
        """(classifier, its backbone) of a head run, to fine-tune: the backbone's layers are the
        classifier's, so unfreezing them trains the classifier."""
        from pipeline.runs import classifier

        if self.kind != "head":
            raise PipelineError(f"{self.directory} is a {self.kind} run: fine-tune starts from a head run")
        self._one_backbone()
        weights = classifier.weights_for(self.fingerprint, _weights_path(self.config["features"]))
        return classifier.build_classifier(self.fingerprint, weights, self.view, self.head(), precision)


def _weights_path(features: dict[str, Any]) -> str | None:
    return features.get("weights", {}).get("path")


def _check_shape(run: Run) -> None:
    """Types a run's config must have; a KeyError/TypeError/ValueError names what is wrong."""
    if run.kind not in KINDS:
        raise ValueError(f"kind {run.kind!r}")
    if not run.view.layers or not all(isinstance(name, str) for name in run.view.layers):
        raise ValueError("view.layers")
    if run.view.pooling not in POOLINGS:
        raise ValueError(f"view.pooling {run.view.pooling!r}")
    if not isinstance(run.config["features"]["fingerprint_digest"], str):
        raise TypeError("features.fingerprint_digest")
    if not isinstance(run.fingerprint.image_size, int) or not 0 < run.fingerprint.image_size <= 2048:
        raise ValueError(f"image_size {run.fingerprint.image_size!r}")


def score_splits(directory: Path, predict: Callable[[str], np.ndarray], splits: Mapping[str, Any],
                 class_names: list[str], title: str, report_split: str = REPORTED_SPLIT) -> tuple[dict[str, Any], str]:
    """metrics.json for every split (`splits` maps a split to something with labels and paths;
    `predict(split)` gives its probabilities), and the reports of `report_split` (at the top of the
    run directory for the test split, in a subfolder named after any other). Returns the metrics
    and the report text."""
    atomic.remove_abandoned_temporaries(directory)  # e.g. a killed evaluate's .metrics.json.<pid>.tmp
    metrics: dict[str, Any] = {}
    text = ""
    for split, data in splits.items():
        proba = predict(split)
        metrics[split] = report.split_metrics(data.labels, proba, class_names)
        if split == report_split and len(data):
            target = directory if split == REPORTED_SPLIT else directory / split
            text = report.write_split_reports(target, data.labels, proba, data.paths, class_names,
                                              f"{title}: {split} split, {len(data)} images")
        elif split == report_split:
            text = f"the {split} split has no images: no report for it"
    write_metrics(directory, read_metrics(directory) | metrics)
    return metrics, text
