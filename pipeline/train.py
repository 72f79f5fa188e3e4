"""Stage two: fit a head on cached features and leave a complete run directory; score a run again.

Never builds or calls a backbone: everything comes from the feature cache. A run directory is
written under a temporary name and renamed when complete, so `runs` never lists half a run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import report, runs
from pipeline.errors import PipelineError
from pipeline.heads import HEADS, make_head
from pipeline.reader import FeatureView, load_splits, open_cache
from pipeline.runs import FORMAT_VERSION, REPORTED_SPLIT, Run, RunSummary, score_splits
from pipeline.store import SPLITS, FeatureStore


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
    head.fit(train, validation, progress=options.progress)
    seconds = time.perf_counter() - started

    config = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "kind": "head",
        "head": {"kind": head.kind, "params": head.params} | head.outcome(),
        "features": {
            "directory": str(store.directory.resolve()),
            "data": store.manifest.get("dataset", {}).get("root"),  # the image folder (resolved)
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
        runs.write_run_files(directory, config, store.class_names, store.split_indexes())
        report.write_history(directory, head.history_, head.HISTORY_AXIS)
        metrics, text = score_splits(directory, lambda split: head.predict_proba(splits[split]), splits,
                                     store.class_names, name)
    return RunSummary(final, metrics, seconds, text, train.in_memory, config)


# --- evaluate an existing run ---------------------------------------------------------------------


def evaluate_run(run: Path, split: str = REPORTED_SPLIT, features: Path | None = None,
                 cache_root: Path = Path("features"), memory_budget: int | None = None) -> RunSummary:
    if split not in SPLITS:
        raise PipelineError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    opened = Run.open(run)
    if opened.kind != "head":
        raise PipelineError(f"{run} is a {opened.kind} run: evaluate re-scores head runs; its reports are in it")
    store = opened.features(features, cache_root)
    head = opened.head()
    splits = load_splits(store, opened.view, memory_budget)
    opened.check_same_splits(store.split_indexes(), store.directory)
    metrics, text = score_splits(opened.directory, lambda name: head.predict_proba(splits[name]), splits,
                                 store.class_names, opened.name, split)
    return RunSummary(opened.directory, metrics, opened.config.get("seconds", 0.0), text, splits["train"].in_memory,
                      opened.config)
