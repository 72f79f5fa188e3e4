"""Stage two: fit a head on cached features and leave a complete run directory; score a run again.

Never builds or calls a backbone: everything comes from the feature cache. A run directory is
written under a temporary name and renamed when complete, so `runs` never lists half a run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import report, runs
from pipeline.errors import PipelineError
from pipeline.heads import HEADS, Head, make_head
from pipeline.reader import FeatureView, load_splits, open_cache
from pipeline.store import SPLITS, FeatureStore

REPORTED_SPLIT = "test"  # whose reports sit at the top of a run directory


@dataclass
class TrainOptions:
    head: str = "logreg"
    features: Path | None = None  # a cache directory (or its name under cache_root); default: the latest
    cache_root: Path = Path("features")
    models: Path = Path("models")
    name: str | None = None
    layers: list[str] | None = None
    pooling: str | None = None  # default: as extracted
    seed: int = 0
    head_params: dict[str, Any] = field(default_factory=dict)
    memory_budget: int | None = None  # bytes; default a quarter of physical memory
    stream: bool = False
    progress: bool = True


@dataclass
class RunSummary:
    directory: Path
    metrics: dict[str, Any]
    seconds: float
    report: str
    in_memory: bool
    config: dict[str, Any]


def _dataset_name(store: FeatureStore) -> str:
    root = store.manifest.get("dataset", {}).get("root")
    return Path(root).name if root else store.directory.name.split("-")[0]


def default_run_name(kind: str, store: FeatureStore, view: FeatureView, params: Mapping[str, Any], seed: int) -> str:
    """Readable and unique per configuration: the same command replaces its own run."""
    fingerprint = store.fingerprint
    key = json.dumps([fingerprint.digest(), str(store.directory.resolve()), view.as_dict(), dict(params), seed],
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:6]
    layers = "" if view.layers == fingerprint.layers else "-" + "+".join(view.layers)
    return (f"{_dataset_name(store)}-{kind}-{fingerprint.backbone}-{fingerprint.image_size}"
            f"{layers}-{view.pooling}-{digest}")


def score_run(directory: Path, predict: Callable[[str], np.ndarray], splits: Mapping[str, Any],
              class_names: list[str], title: str, report_split: str = REPORTED_SPLIT) -> tuple[dict[str, Any], str]:
    """metrics.json for every split (`splits` maps a split to something with labels and paths;
    `predict(split)` gives its probabilities), and the reports of `report_split` (at the top of the
    run directory for the test split, in a subfolder named after any other). Returns the metrics
    and the report text."""
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
    runs.write_metrics(directory, runs.read_metrics(directory) | metrics)
    return metrics, text


def train_head(options: TrainOptions) -> RunSummary:
    runs.check_writable(options.models)  # before the work, not after
    store = open_cache(options.features, options.cache_root)
    view = FeatureView.for_cache(store, options.layers, options.pooling)
    params = dict(options.head_params)
    if options.head in HEADS and "seed" in HEADS[options.head].DEFAULTS:
        params["seed"] = options.seed
    head = make_head(options.head, store.class_names, params)
    name = runs.check_run_name(options.name or default_run_name(head.kind, store, view, head.params, options.seed))
    splits = load_splits(store, view, options.memory_budget, options.stream)
    train, validation = splits["train"], splits["validation"]

    started = time.perf_counter()
    history = head.fit(train, validation, progress=options.progress)
    seconds = time.perf_counter() - started

    config = {
        "name": name,
        "kind": "head",
        "head": {"kind": head.kind, "params": head.params} | head.outcome(history),
        "features": {
            "directory": str(store.directory.resolve()),
            "fingerprint": store.fingerprint.as_dict(),
            "fingerprint_digest": store.fingerprint.digest(),
            "pretrained": store.manifest.get("weights", {}).get("pretrained", True),
            "weights": store.manifest.get("weights", {}),
            "class_names": store.class_names,
            "counts": {split: len(data) for split, data in splits.items()},
        },
        "view": view.as_dict(),
        "input_dimension": train.dimension,
        "read": "in memory" if train.in_memory else "streamed by shard",
        "seed": options.seed,
        "seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    final = Path(options.models) / name
    with runs.staged(final) as directory:
        head.save(directory)
        runs.write_run_files(directory, config, store.class_names,
                             {split: data.paths for split, data in splits.items()})
        report.write_history(directory, history, head.HISTORY_AXIS)
        metrics, text = score_run(directory, lambda split: head.predict_proba(splits[split]), splits,
                                  store.class_names, name)
    return RunSummary(final, metrics, seconds, text, train.in_memory, config)


# --- evaluate an existing run ---------------------------------------------------------------------


def open_run_features(config: dict[str, Any], features: Path | None = None,
                      cache_root: Path = Path("features")) -> tuple[FeatureStore, FeatureView]:
    """The feature cache a run was trained on (or `features`, which must have the same fingerprint)."""
    recorded = config["features"]
    store = open_cache(features or Path(recorded["directory"]), cache_root)
    if store.fingerprint.digest() != recorded["fingerprint_digest"]:
        raise PipelineError(
            f"{store.directory} holds features of another fingerprint than run {config['name']} was "
            f"trained on ({recorded['fingerprint']['backbone']} {recorded['fingerprint']['image_size']} px, "
            f"{recorded['fingerprint']['precision']}): use that cache, or train a new head"
        )
    if store.class_names != recorded["class_names"]:
        raise PipelineError(
            f"{store.directory} now has classes {store.class_names}, run {config['name']} was trained on "
            f"{recorded['class_names']}: train a new head"
        )
    view = FeatureView(tuple(config["view"]["layers"]), config["view"]["pooling"])
    return store, view


def evaluate_run(run: Path, split: str = REPORTED_SPLIT, features: Path | None = None,
                 cache_root: Path = Path("features"), memory_budget: int | None = None) -> RunSummary:
    if split not in SPLITS:
        raise PipelineError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    run = Path(run)
    config = runs.read_config(run)
    if config.get("kind") != "head":
        raise PipelineError(f"{run} is a {config.get('kind')} run: evaluate re-scores head runs; its reports are in it")
    store, view = open_run_features(config, features, cache_root)
    head = Head.load(run)
    splits = load_splits(store, view, memory_budget)
    runs.check_same_splits(run, {name: data.paths for name, data in splits.items()}, store.directory)
    metrics, text = score_run(run, lambda name: head.predict_proba(splits[name]), splits, store.class_names,
                              config["name"], split)
    return RunSummary(run, metrics, config.get("seconds", 0.0), text, splits["train"].in_memory, config)
