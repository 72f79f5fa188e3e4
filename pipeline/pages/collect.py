"""What the report page shows, gathered into plain data (the page's JSON): a run's metrics and its
evaluated split image by image (the confusion matrix's cells, the errors), the images beyond the
run's unknown threshold, what to label next, and an audit's suspects, cross-split near-duplicate
pairs and 2-D map. Images are listed once (`Images`) and referred to by number everywhere else.

Head runs are read from their caches (seconds); a fine-tuned run's split is predicted from its
images. Nothing here writes.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic
from pipeline.cache.store import SPLITS, FeatureStore
from pipeline.errors import PipelineError

SUGGESTIONS = 50  # what to label next: the page's budget
TOP_PROBABILITIES = 3  # the classes shown under each image of the evaluated split
MAP_POINTS = 5000  # the map's points (every marked one, a sample of the rest), as the audit's map


@dataclass
class Images:
    """Every image the page shows, once: cache-relative path, split, given label, content id."""

    root: Path | None = None
    paths: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    _number: dict[str, int] = field(default_factory=dict)

    def add(self, path: str, split: str = "", label: str = "", digest: str = "") -> int:
        number = self._number.get(path)
        if number is None:
            number = self._number[path] = len(self.paths)
            self.paths.append(path)
            self.splits.append(split)
            self.labels.append(label)
            self.ids.append(digest)
        else:  # what one source did not know, another may
            self.splits[number] = self.splits[number] or split
            self.labels[number] = self.labels[number] or label
            self.ids[number] = self.ids[number] or digest
        return number

    def number_of(self, path: str) -> int | None:
        return self._number.get(path)

    def files(self) -> list[Path]:
        root = self.root if self.root is not None else Path("")
        return [root / path for path in self.paths]


@dataclass
class PageData:
    """The page's content; `as_json()` is what its script reads."""

    title: str
    images: Images
    sections: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_json(self, sources: list[str], missing: list[str]) -> dict[str, Any]:
        return {"title": self.title, "notes": self.notes, "missing": missing,
                "images": [{"path": p, "split": s, "label": label, "src": src}
                           for p, s, label, src in zip(self.images.paths, self.images.splits, self.images.labels,
                                                       sources)],
                **self.sections}


def _label_of(labels: Any, row: int, class_names: list[str], multilabel: bool) -> str:
    if multilabel:
        return ";".join(name for name, on in zip(class_names, labels[row]) if on >= 0.5)
    return class_names[int(labels[row])] if int(labels[row]) >= 0 else ""


# --- a run ---------------------------------------------------------------------------------------


def run_sections(page: PageData, run: Any, split: str, cache_root: Path,
                 progress: bool) -> tuple[FeatureStore, dict[str, Any]] | None:
    """The run's header, metrics, evaluated split, unknowns and suggestions into `page`; returns a
    head run's cache and its splits (the map's vectors), None for a fine-tuned run."""
    if split not in SPLITS:
        raise PipelineError(f"--split {split}: choose from {', '.join(SPLITS)}")
    config = run.config
    page.sections["run"] = {
        "name": run.name, "kind": run.kind, "head": (config.get("head") or {}).get("kind"), "backbones": run.backbones,
        "task": run.task, "classes": list(run.class_names), "created": config.get("created"),
        "threshold": run.threshold, "thresholds": run.thresholds,
        "directory": str(run.directory),
    }
    page.sections["metrics"] = {name: _rounded(values) for name, values in run.metrics.items() if name in SPLITS}
    if run.kind == "head":
        store, splits = run.cached_splits(cache_root=cache_root)
        page.images.root = Path(store.data_root) if store.data_root else None
        data = splits[split]
        head = run.head()
        proba = head.predict_proba(data) if len(data) else np.zeros((0, len(run.class_names)))
        truth = data.targets if run.task == "multilabel" else data.labels
        page.sections["evaluation"] = evaluation(page.images, split, data.paths, _digests(store, split, data),
                                                 truth, proba, run)
        unknown_section(page, run, store, split, data, proba, head)
        if store.unlabelled and not run.fused:
            suggestion_section(page, run, store)
        return store, splits
    store = run.caches(cache_root=cache_root)[0]
    page.images.root = Path(store.data_root) if store.data_root else None
    paths, truth, proba = _predicted_from_images(run, store, split, progress)
    if paths is None:
        page.notes.append(f"the {split} split of {run.name} could not be predicted from its images ({truth}): "
                          "no confusion matrix or errors")
    else:
        index = dict(zip(store.split_indexes()[split].paths, store.split_indexes()[split].sha256))
        page.sections["evaluation"] = evaluation(page.images, split, paths, [index.get(p, "") for p in paths],
                                                 truth, proba, run)
    page.notes.append(f"{run.name} is a fine-tuned run: its unknowns are not recorded (its backbone moved), "
                      "and its suggestions come from head runs")
    return None


def _digests(store: FeatureStore, split: str, data: Any) -> list[str]:
    index = store.split_indexes()[split]
    known = dict(zip(index.paths, index.sha256))
    return [known.get(path, "") for path in data.paths]


def _rounded(values: Any) -> Any:
    if isinstance(values, dict):
        return {key: _rounded(value) for key, value in values.items()}
    if isinstance(values, float):
        return round(values, 4)
    if isinstance(values, list):
        return [_rounded(value) for value in values]
    return values


def _predicted_from_images(run: Any, store: FeatureStore, split: str, progress: bool) -> tuple[Any, Any, Any]:
    """(paths, labels, probabilities) of a fine-tuned run's `split`, predicted from its images;
    (None, the reason, None) where they cannot be read."""
    from pipeline.cache.reader import split_images
    from pipeline.images.reading import EncodedImages
    from pipeline.images.views import averaged_by_image

    try:
        images = split_images(store)[split]
    except PipelineError as error:
        return None, str(error), None
    source = EncodedImages(images.files)
    rows = averaged_by_image(run.classifier().predict_on_batch, source, run.fingerprint.image_size, 32, "none")
    kept = sorted(rows)
    proba = np.stack([rows[i] for i in kept]) if kept else np.zeros((0, len(run.class_names)))
    return [images.paths[i] for i in kept], np.asarray(images.labels)[kept], proba


def evaluation(images: Images, split: str, paths: list[str], digests: list[str], truth: np.ndarray,
               proba: np.ndarray, run: Any) -> dict[str, Any]:
    """The evaluated split image by image: predicted labels, the top probabilities, the cells (a
    confusion matrix; for a multi-label run, each label's true positives, misses and false
    alarms) as lists of image numbers, and the errors, most confident first."""
    names = list(run.class_names)
    multilabel = run.task == "multilabel"
    if multilabel:
        decided = proba >= np.asarray(run.thresholds)[None, :]
    elif run.threshold is not None:
        decided = (proba[:, 1] >= run.threshold).astype(np.int64)
    else:
        decided = proba.argmax(axis=1) if len(proba) else np.zeros(0, np.int64)
    rows, numbers = [], []
    for row, path in enumerate(paths):
        number = images.add(path, split, _label_of(truth, row, names, multilabel), digests[row])
        numbers.append(number)
        top = np.argsort(-proba[row])[:TOP_PROBABILITIES]
        predicted = (";".join(n for n, on in zip(names, decided[row]) if on) if multilabel
                     else names[int(decided[row])])
        rows.append({"i": number, "predicted": predicted,
                     "top": [[names[int(c)], round(float(proba[row, c]), 4)] for c in top]})
    if multilabel:
        truth = np.asarray(truth) >= 0.5
        columns = ["true positive", "missed", "false alarm"]
        cells = [[[numbers[r] for r in np.flatnonzero(truth[:, k] & decided[:, k])],
                  [numbers[r] for r in np.flatnonzero(truth[:, k] & ~decided[:, k])],
                  [numbers[r] for r in np.flatnonzero(~truth[:, k] & decided[:, k])]] for k in range(len(names))]
        wrong = np.flatnonzero((truth != decided).any(axis=1)) if len(truth) else np.zeros(0, np.int64)
        confidence = np.abs(proba - np.asarray(run.thresholds)[None, :]).max(axis=1) if len(proba) else proba
    else:
        truth = np.asarray(truth, np.int64)
        columns = names
        cells = [[[numbers[r] for r in np.flatnonzero((truth == t) & (decided == p))] for p in range(len(names))]
                 for t in range(len(names))]
        wrong = np.flatnonzero(truth != decided)
        confidence = proba[np.arange(len(proba)), decided] if len(proba) else np.zeros(0)
    errors = [int(r) for r in wrong[np.argsort(-confidence[wrong], kind="stable")]] if len(wrong) else []
    return {"split": split, "rows": rows, "row_of": {str(n): r for r, n in enumerate(numbers)},
            "matrix": {"rows": names, "columns": columns, "cells": cells,
                       "kind": "labels" if multilabel else "confusion"},
            "errors": [numbers[r] for r in errors]}


def unknown_section(page: PageData, run: Any, store: FeatureStore, split: str, data: Any, proba: np.ndarray,
                    head: Any) -> None:
    """The evaluated split's images and the cache's unlabelled ones beyond the run's unknown
    threshold, farthest first."""
    novelty = run.unknowns()
    if novelty is None:
        page.notes.append(f"{run.name} records no unknown threshold (made before it was recorded): no unknowns")
        return
    names = list(run.class_names)
    scores = np.concatenate([novelty.scores(vectors) for vectors, _ in data.chunks()]) if len(data) else np.zeros(0)
    candidates = [(images_number, float(score), names[int(np.argmax(p))])
                  for images_number, score, p in zip([page.images.add(path, split) for path in data.paths],
                                                     scores, proba)]
    checked = {split: len(data)}
    if store.unlabelled and not run.fused:
        pool = np.flatnonzero(~store.labelled_rows())
        rows = store.rows_index()
        vectors = run.view.vectors(store.read_rows(rows.locations[pool], run.view.layers))
        from pipeline.heads import ArrayFeatures

        guesses = head.predict_proba(ArrayFeatures(vectors, np.zeros(len(vectors), np.int32), names))
        for row, score, p in zip(pool, novelty.scores(vectors), guesses):
            candidates.append((page.images.add(rows.paths[row], "", "", rows.sha256[row]), float(score),
                               names[int(np.argmax(p))]))
        checked["unlabelled"] = int(len(pool))
    flagged = sorted((c for c in candidates if c[1] > novelty.threshold), key=lambda c: -c[1])
    page.sections["unknowns"] = {
        "threshold": round(novelty.threshold, 6), "false_rejection_rate": novelty.rate, "checked": checked,
        "rows": [{"i": number, "score": round(score, 4), "guess": guess} for number, score, guess in flagged]}


def suggestion_section(page: PageData, run: Any, store: FeatureStore) -> None:
    from pipeline.auditing.suggest import suggest

    budget = min(SUGGESTIONS, store.unlabelled)
    found = suggest(store, run, budget, None, progress=False)
    page.sections["suggestions"] = {
        "how": found.details["how"], "unlabelled": found.details["unlabelled"],
        "rows": [{"i": page.images.add(row["path"], "", "", row["id"]), "guess": row["guess"], "score": row["score"]}
                 for row in found.rows]}


# --- an audit ------------------------------------------------------------------------------------


def read_audit(directory: Path) -> dict[str, Any]:
    summary = Path(directory) / "audit.json"
    if not summary.is_file():
        raise PipelineError(f"--audit {directory}: not an audit's folder (no audit.json): run `audit` first")
    try:
        details = atomic.read_json(summary)
    except ValueError as error:
        raise PipelineError(f"{summary} is damaged ({error}): run the audit again") from None
    if not isinstance(details, dict):
        raise PipelineError(f"{summary} is damaged (not an object): run the audit again")
    return details


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def audit_data_root(directory: Path, details: dict[str, Any]) -> Path | None:
    """Where the audit's image paths are relative to: recorded in audit.json, or (older audits) in
    its first cache's manifest."""
    if details.get("data_root"):
        return Path(details["data_root"])
    for cache in details.get("caches", [])[:1]:
        try:
            root = FeatureStore(Path(cache)).data_root
        except PipelineError:
            return None
        return Path(root) if root else None
    return None


def audit_sections(page: PageData, directory: Path, details: dict[str, Any], pairs_shown: int) -> None:
    """The audit's suspects, cross-split pairs (the closest `pairs_shown`) and map into `page`."""
    directory = Path(directory)
    page.sections["audit"] = {"directory": str(directory), "images": details.get("images"),
                              "label_issues": details.get("label_issues", {}),
                              "duplicates": {k: v for k, v in details.get("duplicates", {}).items()
                                             if not isinstance(v, dict)}}
    suspects = []
    for row in _rows(directory / "suspects.csv"):
        number = page.images.add(row.get("path", ""), row.get("split", ""), row.get("label", ""), row.get("id", ""))
        suspects.append({"i": number, "given": row.get("label", ""), "suggested": row.get("suggested", ""),
                         "score": _number(row.get("score"))})
    page.sections["suspects"] = suspects
    crossing = [row for row in _rows(directory / "duplicates.csv") if row.get("split_a") != row.get("split_b")]
    crossing.sort(key=lambda row: -(_number(row.get("similarity")) or 0.0))
    pairs = []
    for row in crossing[:pairs_shown]:
        a = page.images.add(row["path_a"], row.get("split_a", ""), row.get("class_a", ""))
        b = page.images.add(row["path_b"], row.get("split_b", ""), row.get("class_b", ""))
        pairs.append({"a": a, "b": b, "similarity": _number(row.get("similarity")),
                      "exact": row.get("exact") == "True"})
    page.sections["pairs"] = {"rows": pairs, "total": len(crossing)}
    points = _rows(directory / "map.csv")
    if points:
        page.sections["map"] = {"how": details.get("map", ""), "points": [
            [_number(p.get("x")), _number(p.get("y")),
             page.images.add(p.get("path", ""), p.get("split", ""), p.get("label", ""), p.get("id", ""))]
            for p in points]}


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


# --- the map without an audit ----------------------------------------------------------------------


def run_map(page: PageData, run: Any, store: FeatureStore, splits: dict[str, Any], seed: int = 0) -> None:
    """The 2-D map of a head run's cache (t-SNE, as the audit's): every image the page marks (the
    errors, the unknowns, the suggestions) and a sample of the others, up to MAP_POINTS."""
    from pipeline.auditing.pictures import map_layout

    names, multilabel = list(run.class_names), run.task == "multilabel"
    pieces: list[tuple[str, str, str, int | None]] = []  # split, path, given label, unlabelled cache row
    for split in SPLITS:
        data = splits[split]
        truth = data.targets if multilabel else data.labels
        pieces += [(split, path, _label_of(truth, r, names, multilabel), None) for r, path in enumerate(data.paths)]
    rows_index = store.rows_index()
    if store.unlabelled and not run.fused:
        pieces += [("", rows_index.paths[row], "", int(row)) for row in np.flatnonzero(~store.labelled_rows())]
    marked_numbers = set(page.sections.get("evaluation", {}).get("errors", []))
    marked_numbers |= {row["i"] for key in ("unknowns", "suggestions")
                       for row in page.sections.get(key, {}).get("rows", [])}
    marked = [k for k, piece in enumerate(pieces) if page.images.number_of(piece[1]) in marked_numbers]
    rest = np.setdiff1d(np.arange(len(pieces)), marked)
    room = min(len(rest), max(0, MAP_POINTS - len(marked)))
    chosen = set(marked) | set(np.random.default_rng(seed).choice(rest, room, replace=False).tolist())
    vectors, kept, start = [], [], 0
    for split in SPLITS:  # the labelled images' vectors, a block at a time, keeping the chosen
        for block, _ in splits[split].chunks():
            for k in range(len(block)):
                if start + k in chosen:
                    vectors.append(block[k].reshape(-1))
                    kept.append(start + k)
            start += len(block)
    extra = [k for k in sorted(chosen) if k >= start]  # the unlabelled ones, read from the cache
    if extra:
        locations = rows_index.locations[[pieces[k][3] for k in extra]]
        vectors += list(run.view.vectors(store.read_rows(locations, run.view.layers)).reshape(len(extra), -1))
        kept += extra
    if not kept:
        return
    layout = map_layout(np.stack(vectors).astype(np.float32), range(len(kept)), seed)
    points = []
    for position, (x, y) in zip(layout.rows, layout.xy):
        split, path, given, _ = pieces[kept[int(position)]]
        points.append([round(float(x), 4), round(float(y), 4), page.images.add(path, split, given)])
    page.sections["map"] = {"how": layout.how, "points": points}
