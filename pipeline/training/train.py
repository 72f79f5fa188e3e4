"""Stage two: fit a head on cached features and leave a complete run directory; score a run again.

Never builds or calls a backbone: everything comes from the feature cache. A run directory is
written under a temporary name and renamed when complete, so `runs` never lists half a run.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import runs, tables
from pipeline.atomic import one_line
from pipeline.backbone.pooling import POOLINGS
from pipeline.backbone.registry import BACKBONES
from pipeline.cache.reader import FeatureView, SplitData, load_head_inputs, open_features
from pipeline.cache.store import SPLITS, FeatureStore
from pipeline.errors import PipelineError
from pipeline.heads import HEADS, make_head
from pipeline.labelling import LabelSpec, labelling_from_table
from pipeline.runs import REPORTED_SPLIT, Run, RunSummary, novelty, rescoring, score_splits


@dataclass
class TrainOptions:
    head: str = "logreg"
    # a cache (a FeatureStore, its directory or its name under cache_root), default the latest; several: fused
    features: Path | FeatureStore | Sequence[Path | FeatureStore] | None = None
    cache_root: Path = Path("features")
    models: Path = Path("models")
    name: str | None = None
    layers: list[str] | None = None
    pooling: str | None = None  # default: as extracted
    seed: int = 0
    head_params: dict[str, Any] = field(default_factory=dict)
    memory_budget: int | None = None  # bytes; default a quarter of physical memory
    stream: bool = False
    exclude: Path | None = None  # images left out of training: a suspects.csv, or paths or ids one a line
    labels: LabelSpec | None = None  # a labels table (pipeline/labelling); default the cache's own labels
    threshold: str | float | None = None  # binary: "validation" (chosen there) or a probability; None: argmax
    progress: bool = True

    def __post_init__(self) -> None:
        """The one check of train-head's options, for the command line and Python alike: the head
        and its parameters (a parameter of another head, a value out of range), the run name, the
        pooling and the memory budget."""
        make_head(self.head, None, self.head_params)
        if self.name is not None:
            runs.check_run_name(self.name)
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise PipelineError(f"--pooling {self.pooling!r}: choose from {', '.join(POOLINGS)}")
        if self.layers is not None and (isinstance(self.layers, str)
                                        or not all(isinstance(name, str) for name in self.layers)):
            raise PipelineError("--layer takes layer names (a list in Python)")
        if self.memory_budget is not None and self.memory_budget < 1:
            raise PipelineError("--memory-budget must be a positive number of MB")
        if self.threshold is not None and self.threshold != "validation":
            try:
                value = float(self.threshold)
            except (TypeError, ValueError):
                value = float("nan")
            if isinstance(self.threshold, bool) or not 0 < value < 1:
                raise PipelineError(f"--threshold {self.threshold}: validation (chosen on the validation split), or a "
                                    "probability between 0 and 1")
            self.threshold = value
        if self.exclude is not None and not Path(self.exclude).is_file():
            raise PipelineError(f"--exclude {self.exclude}: no such file (an audit's suspects.csv, or a list of paths "
                                "or ids)")


def _dataset_name(store: FeatureStore) -> str:
    root = store.data_root
    return Path(root).name if root else store.directory.name.split("-")[0]


def default_run_name(kind: str, stores: Sequence[FeatureStore], views: Sequence[FeatureView],
                     params: Mapping[str, Any], seed: int, labels: str | None = None) -> str:
    """Readable and unique per configuration: the same command replaces its own run. Fused
    features are named by their backbones joined with +; a labels table's digest (`labels`) enters
    the key, so runs of two labellings stand side by side."""
    parts = [[store.fingerprint.digest(), str(store.directory.resolve()), view.as_dict()]
             for store, view in zip(stores, views)]
    # one cache: the key as before fusion existed, so the same command keeps its run's name
    key = json.dumps([*parts[0], dict(params), seed] if len(parts) == 1 else [*parts, dict(params), seed],
                     sort_keys=True, default=str)
    if labels is not None:
        key += labels
    digest = hashlib.sha256(key.encode()).hexdigest()[:6]
    fingerprint, view = stores[0].fingerprint, views[0]
    # the layers read enter the name unless they are the backbone's default (given to extract or
    # to train-head alike), so runs on caches of other layers are told apart by name
    spec = BACKBONES.get(fingerprint.backbone)
    default = tuple(spec.default_layers) if spec else fingerprint.layers
    layers = "" if len(stores) > 1 or tuple(view.layers) == default else "-" + "+".join(view.layers)
    backbones = "+".join(store.fingerprint.backbone for store in stores)
    return (f"{_dataset_name(stores[0])}-{kind}-{backbones}-{fingerprint.image_size}"
            f"{layers}-{view.pooling}-{digest}")


def _features_record(store: FeatureStore) -> dict[str, Any]:
    """What a run records of a cache it was trained on (Run reads it back)."""
    return {
        "directory": str(store.directory.resolve()),
        "data": store.data_root,  # the image folder (resolved)
        "fingerprint": store.fingerprint.as_dict(),
        "fingerprint_digest": store.fingerprint.digest(),
        "pretrained": store.pretrained,
        "weights": store.manifest.get("weights", {}),
        "class_names": store.class_names,
    }


@dataclass
class Exclusions:
    """What an --exclude file names: image paths (relative to the data folder, as the cache keeps
    them) and content ids. An audit's rows name an image by its path first; its id stands in only
    where no image of the cache has that path any more."""

    paths: list[str]
    ids: list[str]
    fallback_ids: dict[str, str]  # path -> id, from tables whose rows carry both
    entries: int


ID_PATTERN = re.compile(r"[0-9a-f]{64}")


def read_exclusions(path: Path, data_root: str | None = None) -> Exclusions:
    """The images a file names: an audit's suspects.csv (its path and id columns), or one path or
    content-hash id a line (blank lines and # comments skipped). Absolute paths under the data
    folder are taken relative to it."""
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"--exclude {path} is a folder: name a file (an audit's suspects.csv, or paths or ids "
                            "one a line)")
    if path.exists() and not path.is_file():
        raise PipelineError(f"--exclude {path} is not a regular file (a pipe or device): name a file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"--exclude {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PipelineError(f"--exclude {path}: cannot read it ({one_line(error)})") from None
    root = Path(data_root).resolve() if data_root else None

    def relative(name: str) -> str:
        name = tables.unquoted(name.strip())
        if root is not None and Path(name).is_absolute():
            with contextlib.suppress(ValueError):
                return Path(name).resolve().relative_to(root).as_posix()
        return name

    lines = text.splitlines()
    found = Exclusions([], [], {}, 0)
    header = next(csv.reader(lines[:1]), []) if lines else []
    if "path" in header and ("split" in header or "id" in header):  # suspects.csv, a labels table
        for row in csv.DictReader(lines):
            found.entries += 1
            name, digest = relative(row.get("path") or ""), (row.get("id") or "").strip()
            if name:
                found.paths.append(name)
                if digest:
                    found.fallback_ids[name] = digest
            elif digest:
                found.ids.append(digest)
        return found
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        found.entries += 1
        (found.ids if ID_PATTERN.fullmatch(entry) else found.paths).append(entry if ID_PATTERN.fullmatch(entry)
                                                                            else relative(entry))
    return found


def exclude_from_training(train: SplitData, ids: Sequence[str], path: Path, every_path: set[str],
                          every_id: set[str], data_root: str | None = None) -> tuple[SplitData, dict[str, Any]]:
    """The training split without the images `path` names (by path, or by content id where the
    file gives only an id or the path is gone), and what the run records of it: how many entries
    named images outside training (kept there), and how many named no image of the cache."""
    wanted = read_exclusions(path, data_root)
    by_id = set(wanted.ids) | {digest for name, digest in wanted.fallback_ids.items() if name not in every_path}
    by_path = set(wanted.paths)
    drop = np.asarray([p in by_path or i in by_id for p, i in zip(train.paths, ids)], bool)
    unmatched = [name for name in wanted.paths
                 if name not in every_path and wanted.fallback_ids.get(name) not in every_id]
    unmatched += [digest for digest in wanted.ids if digest not in every_id]
    kept = train.subset(np.flatnonzero(~drop))
    if len(np.unique(kept.labels)) < 2:
        raise PipelineError(f"--exclude {path} leaves fewer than two classes in the training split")
    check_every_class_trained(kept.labels, train.class_names or [], f" after --exclude {path}")
    by_content = [p for p, i, d in zip(train.paths, ids, drop) if d and p not in by_path]
    return kept, {"file": str(Path(path).resolve()), "named": wanted.entries, "from_training": int(drop.sum()),
                  "paths": [p for p, d in zip(train.paths, drop) if d],
                  "by_content_id": by_content, "matched_nothing": len(unmatched),
                  "matched_nothing_first": unmatched[:5]}


def exclusion_note(excluded: dict[str, Any]) -> str:
    """One line for the summary: what --exclude left out, and what it could not match."""
    text = f"--exclude: {excluded['from_training']} training images left out of {excluded['named']} entries named"
    if excluded.get("by_content_id"):
        text += f", {len(excluded['by_content_id'])} of them by content id (their paths were not named)"
    if excluded.get("matched_nothing"):
        first = ", ".join(map(str, excluded.get("matched_nothing_first", [])[:3]))
        text += (f"; {excluded['matched_nothing']} entries matched no image of the cache (paths are relative to the "
                 f"data folder, or absolute under it; ids are content sha256), e.g. {first}")
    return text


def check_every_class_trained(labels: np.ndarray, class_names: Sequence[str], when: str = "") -> None:
    """Every class has training images: a class folder found only in validation/ or test/ cannot
    be learned (and scikit-learn would fail on its missing column)."""
    present = set(np.unique(np.asarray(labels)).tolist())
    absent = [name for index, name in enumerate(class_names) if index not in present]
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise PipelineError(f"class {absent[0]!r}{more} has no training images{when}: it is only in validation or "
                            "test, and a head cannot learn it; add training images of it, or remove its folders")


def check_every_label_trained(targets: np.ndarray, names: Sequence[str]) -> None:
    """Every label of a multi-label task has training images with it and without it."""
    for k, name in enumerate(names):
        present = int(np.sum(np.asarray(targets)[:, k] >= 0.5))
        if present in (0, len(targets)):
            raise PipelineError(f"label {name!r} is on {'no' if present == 0 else 'every'} training image: a label "
                                "needs training images with it and without it (label more images, or move some "
                                "between splits)")


def decision_threshold(rule: str | float | None, head: Any, validation: SplitData) -> float | None:
    """A binary run's decision threshold on the probability of its second class: the given one, or
    the one of the highest validation accuracy (`rule` "validation"); None: the most probable class."""
    if rule is None:
        return None
    if rule != "validation":
        return float(rule)
    from pipeline.heads.thresholds import choose_binary_threshold

    return choose_binary_threshold(head.predict_proba(validation)[:, 1], validation.labels)


def run_training(options: TrainOptions) -> RunSummary:
    runs.check_writable(options.models)  # before the work, not after
    stores, views = open_features(options.features, options.cache_root, options.layers, options.pooling)
    labelling = None
    if options.labels is not None and options.labels.given:
        labellings = [labelling_from_table(s, options.labels) for s in stores]
        stores, labelling = [one.apply() for one in labellings], labellings[0]
        if options.progress:
            for note in labelling.notes:
                print(f"note: {note}", file=sys.stderr, flush=True)
    store, view = stores[0], views[0]
    params = dict(options.head_params)
    if options.head in HEADS and "seed" in HEADS[options.head].DEFAULTS:
        params["seed"] = options.seed
    head = make_head(options.head, store.class_names, params)
    trained = store.split_indexes()["train"]
    if labelling is not None and labelling.multilabel:  # noqa: SIM114 - two checks, two kinds of task
        check_every_label_trained(trained.targets, store.class_names)
    elif len(np.unique(trained.labels)) >= 2:  # one class only: load_splits says so
        check_every_class_trained(trained.labels, store.class_names)
    name = runs.check_run_name(options.name or default_run_name(head.kind, stores, views, head.params, options.seed,
                                                                      labelling and labelling.digest()))
    splits = load_head_inputs(stores, views, options.memory_budget, options.stream)
    excluded = None
    if options.exclude is not None:
        indexes = store.split_indexes()
        every_path = {p for index in indexes.values() for p in index.paths}
        every_id = {i for index in indexes.values() for i in index.sha256}
        splits["train"], excluded = exclude_from_training(splits["train"], indexes["train"].sha256,
                                                          Path(options.exclude), every_path, every_id,
                                                          store.data_root)
        if options.progress:
            print(f"note: {exclusion_note(excluded)}", file=sys.stderr, flush=True)
    train, validation = splits["train"], splits["validation"]

    multilabel = labelling is not None and labelling.multilabel
    if options.threshold is not None and (multilabel or len(store.class_names) != 2):
        raise PipelineError(f"--threshold applies to a task of two classes ({len(store.class_names)} here"
                            + (", multi-label: each label's threshold is chosen on validation already" if
                               multilabel else "") + ")")
    started = time.perf_counter()
    head.fit(train, validation, progress=options.progress)
    seconds = time.perf_counter() - started
    threshold = decision_threshold(options.threshold, head, validation)
    unknowns = novelty.fit(train, validation)  # what a training image's distance looks like: predict's unknowns

    config = {
        "head": {"kind": head.kind, "params": head.params} | head.outcome()
        | ({"thresholds": head.thresholds_} if head.multilabel_ else {})
        | ({} if threshold is None else {"threshold": threshold, "threshold_rule": str(options.threshold if
                                                                                      options.threshold == "validation"
                                                                                      else "given")}),
        "features": _features_record(store) | {"counts": {split: len(data) for split, data in splits.items()}},
        "view": view.as_dict(),
        "input_dimension": train.dimension,
        "read": "in memory" if train.in_memory else "streamed by shard",
        "seed": options.seed,
        "seconds": round(seconds, 3),
    }
    if excluded is not None:
        config["excluded"] = excluded
    if labelling is not None:
        config["labelling"] = labelling.record()
    if len(stores) > 1:  # every cache, the first included, with the head's view of it, in input order
        config["fusion"] = [{"features": _features_record(s), "view": v.as_dict()} for s, v in zip(stores, views)]
    # what the head reads, in its input order: checked against config.json's parts whenever it is loaded
    head.input_parts_ = [{"fingerprint_digest": s.fingerprint.digest(), "view": v.as_dict()}
                         for s, v in zip(stores, views)]
    with runs.create(options.models, name, "head") as run:
        head.save(run.directory)
        if unknowns is not None:
            config["unknown"] = unknowns.save(run.directory)
        if labelling is not None:
            labelling.write(run.directory)
        config = run.write_config(config, store.class_names, store.split_indexes())
        run.write_history(head.history_, head.HISTORY_AXIS)
        run.score(lambda split: head.predict_proba(splits[split]), splits, store.class_names, name,
                  ordered=head.params.get("loss") == "ordinal", thresholds=head.thresholds_, threshold=threshold,
                  groups=labelling.metric_groups() if labelling is not None else None)
    return RunSummary(Path(options.models) / name, run.metrics, seconds, run.report, train.in_memory, config)


# --- evaluate an existing run ---------------------------------------------------------------------


def evaluate_run(run: Path, split: str = REPORTED_SPLIT, features: Path | None = None,
                 cache_root: Path = Path("features"), memory_budget: int | None = None,
                 labels: LabelSpec | None = None) -> RunSummary:
    """Score a head run again from its cache, through the labels it was trained on, or through the
    labels table `labels` (corrected labels: a split that moved images the run trained on is refused)."""
    if split not in SPLITS:
        raise PipelineError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    opened = Run.open(run)
    head = opened.head()
    store, splits = opened.cached_splits(features, cache_root, memory_budget, labels)
    with rescoring(opened.directory) as staging:
        metrics, text = score_splits(staging, lambda name: head.predict_proba(splits[name]), splits,
                                     store.class_names, opened.name, split, opened.ordered, opened.thresholds,
                                     opened.threshold,
                                     store.labelling.metric_groups() if store.labelling is not None else None)
    return RunSummary(opened.directory, metrics, opened.config.get("seconds", 0.0), text, splits["train"].in_memory,
                      opened.config)


def evaluate_with_views(run: Path, tta: str, split: str = REPORTED_SPLIT) -> RunSummary:
    """Any run (head or fine-tuned) scored from its images end to end, its probabilities averaged
    over the test-time views of `tta` (pipeline/images/views.py), into RUN/tta-<views>/:
    metrics.json and the reports of `split`. The run's own metrics are left as they are."""
    from pipeline.images.reading import EncodedImages
    from pipeline.images.views import averaged_by_image, view_transforms

    view_transforms(tta)  # refuses an unknown name before any work
    if split not in SPLITS:
        raise PipelineError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    opened = Run.open(run)
    if opened.task == "multilabel":
        raise PipelineError(f"{opened.name} is multi-label: --tta scores runs of one class an image; evaluate it "
                            "without --tta (its exports take --tta)")
    records = opened.images()
    model = opened.classifier()
    size = opened.fingerprint.image_size
    started = time.perf_counter()
    probabilities = {}
    for name, images in records.items():
        source = EncodedImages(images.files)
        rows = averaged_by_image(model.predict_on_batch, source, size, 32, tta)
        missing = sorted(set(range(len(images.files))) - set(rows))
        if missing:
            raise PipelineError(f"{images.files[missing[0]]} can no longer be read as an image "
                                f"({source.failure_reason(missing[0], size)}): the run's {name} split cannot be "
                                "scored from its images")
        probabilities[name] = np.stack([rows[i] for i in range(len(images.files))]) if rows else \
            np.zeros((0, len(opened.class_names)))
    target = opened.directory / f"tta-{tta}"
    with rescoring(opened.directory, target.name) as staging:
        metrics, text = score_splits(staging, lambda name: probabilities[name], records, opened.class_names,
                                     f"{opened.name} with test-time views: {tta}", split, opened.ordered,
                                     threshold=opened.threshold)
    return RunSummary(target, metrics, time.perf_counter() - started, text, True, opened.config)
