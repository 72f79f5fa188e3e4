"""What to label next: a cache's unlabelled images ranked by how much labelling them should help.

Each candidate's *uncertainty* under a head run (one minus the margin between its two most
probable classes; for a multi-label run, the mean closeness of each label's probability to its
threshold) is combined with *diversity* in the cached feature space: from the most uncertain
images (ten times the budget), images are taken greedily by uncertainty times the cosine distance
to everything chosen or labelled already (a weighted k-center), so the suggestions are not
near-copies of each other or of the training images. Without a run (or without labelled images)
the ranking is by diversity alone, and the summary says so.

The table written is a labels table: `path`, `id`, the label column left empty to fill in, the
head's `guess`, the `score` and the `rank`. Filled in, it goes back to train-head as a second
`--labels` table (over the first) with no backbone pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic, tables
from pipeline.cache.store import FeatureStore
from pipeline.errors import PipelineError
from pipeline.runs.novelty import unit

CANDIDATES_PER_SUGGESTION = 10  # the uncertain pool the diversity step chooses from, as a multiple of the budget


@dataclass
class Suggestions:
    """What suggest wrote: the table, the rows in rank order, how they were ranked."""

    path: Path | None
    rows: list[dict[str, Any]]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def uncertainty(proba: np.ndarray, thresholds: list[float] | None = None) -> np.ndarray:
    """1 - (top probability - second) for one class an image; for a multi-label run, the mean over
    the labels of 1 - |p - t| / max(t, 1 - t) (1 at the threshold, 0 at certainty)."""
    if thresholds is not None:
        t = np.asarray(thresholds)[None, :]
        return np.mean(1 - np.abs(proba - t) / np.maximum(t, 1 - t), axis=1)
    ordered = np.sort(proba, axis=1)
    return 1 - (ordered[:, -1] - ordered[:, -2])


def weighted_k_center(vectors: np.ndarray, weights: np.ndarray, budget: int, anchors: np.ndarray | None) -> list[int]:
    """`budget` rows of `vectors` (unit length), each chosen greedily to maximise its weight times its
    cosine distance to the chosen rows and the `anchors` (the labelled images); ties to the lower row."""
    distance = np.full(len(vectors), 2.0)
    if anchors is not None and len(anchors):
        for start in range(0, len(anchors), 4096):
            distance = np.minimum(distance, 1 - (vectors @ anchors[start:start + 4096].T).max(axis=1))
    chosen: list[int] = []
    for _ in range(budget):
        scores = np.maximum(distance, 0) * weights
        scores[chosen] = -1
        best = int(np.argmax(scores))
        chosen.append(best)
        distance = np.minimum(distance, 1 - vectors @ vectors[best])
    return chosen


def suggest(store: FeatureStore, run: Any, budget: int, out: Path | None, progress: bool = True) -> Suggestions:
    """Rank the unlabelled images of `store` (already seen through the run's labelling) for
    labelling; `run` a head run, or None for diversity alone. Writes `out` (CSV) where given."""
    started = time.perf_counter()
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise PipelineError(f"--budget {budget}: a positive whole number of images to suggest")
    labelled_flags = store.labelled_rows()
    pool, labelled = np.flatnonzero(~labelled_flags), np.flatnonzero(labelled_flags)
    if not len(pool):
        raise PipelineError(f"{store.directory} has no unlabelled images ({len(labelled)} labelled): nothing to "
                            "suggest; extract new images into it (a flat folder or a table of paths)")
    if budget > len(pool):
        raise PipelineError(f"--budget {budget} is more than the {len(pool)} unlabelled images of {store.directory}: "
                            f"suggest at most {len(pool)}")
    view = run.view if run is not None else _default_view(store)
    locations = store.rows_index().locations
    vectors = view.vectors(store.read_rows(locations[pool], view.layers))
    notes = []
    if run is not None and len(labelled):
        from pipeline.heads import ArrayFeatures

        head = run.head()
        proba = head.predict_proba(ArrayFeatures(vectors, np.zeros(len(vectors), np.int32), run.class_names))
        weights = uncertainty(proba, run.thresholds)
        how = "uncertainty (margin) x diversity (weighted k-center on cosine distance)"
    else:
        proba = None
        weights = np.ones(len(pool))
        how = "diversity alone (k-center on cosine distance)"
        notes.append(("no head run" if run is None else "no labelled images") + ": the suggestions are ranked by "
                     "diversity alone (the images least like each other and the labelled ones)")
    candidates = np.argsort(-weights, kind="stable")[:min(len(pool), CANDIDATES_PER_SUGGESTION * budget)]
    unit_vectors = unit(vectors[candidates])
    anchors = None
    if len(labelled):
        anchors = unit(view.vectors(store.read_rows(locations[labelled], view.layers)))
    picked = [int(candidates[i]) for i in weighted_k_center(unit_vectors, weights[candidates], budget, anchors)]
    rows_index = store.rows_index()
    label_column = _label_column(run)
    rows = []
    for rank, i in enumerate(picked, 1):
        guess = "" if proba is None else _guess(proba[i], run)
        rows.append({"path": rows_index.paths[pool[i]], "id": rows_index.sha256[pool[i]], label_column: "",
                     "guess": guess, "score": round(float(weights[i]), 6), "rank": rank})
    if out is not None:
        _write(Path(out), rows, label_column)
    details = {"cache": str(store.directory), "run": None if run is None else str(run.directory),
               "unlabelled": int(len(pool)), "labelled": int(len(labelled)), "budget": budget, "how": how,
               "candidates": int(len(candidates)), "notes": notes, "label_column": label_column}
    return Suggestions(None if out is None else Path(out), rows, time.perf_counter() - started, details)


def _default_view(store: FeatureStore) -> Any:
    from pipeline.cache.reader import FeatureView

    return FeatureView.for_cache(store)


def _label_column(run: Any) -> str:
    """The label column the run's labels table used (so the filled table reads back with the same flags)."""
    if run is None:
        return "label"
    source = (run.config.get("labelling") or {}).get("source") or {}
    return source.get("label_column") or "label"


def _guess(probabilities: np.ndarray, run: Any) -> str:
    if run.thresholds is not None:
        return ";".join(name for name, p, t in zip(run.class_names, probabilities, run.thresholds) if p >= t)
    return run.class_names[int(np.argmax(probabilities))]


def _write(path: Path, rows: list[dict[str, Any]], label_column: str) -> None:
    columns = ["path", "id", label_column, "guess", "score", "rank"]
    with atomic.replacing(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = tables.writer(handle)
        writer.writerow(columns)
        writer.writerows([row[column] for column in columns] for row in rows)
