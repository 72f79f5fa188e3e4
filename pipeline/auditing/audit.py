"""Know your data from the cache: label suspects (out-of-fold probabilities ranked by cleanlab),
exact and near duplicates (above all across train and test), and the pictures a person checks
them by, written whole into one folder:

    suspects.csv      path,split,label,suggested,score,id: the images cleanlab flags, most suspicious first;
                      a labels table (train-head --labels suspects.csv [--label-column suggested])
    pred_probs.npy    (images, classes) out-of-fold probabilities, columns in class order, rows as ids.txt
    ids.txt           the content sha256 of each row of pred_probs.npy
    duplicates.csv    path_a,split_a,class_a,path_b,split_b,class_b,similarity,exact
    map.csv           path,split,label,x,y,id: the 2-D map's points (the report page draws them)
    map.png, suspects.png, duplicates.png
    audit.json        the summary: suspects, duplicate pairs, cross-split pairs, per class

Validation and test labels are never changed: what the audit finds can only be excluded from
training (`train-head --exclude DIR/suspects.csv`).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic, outputs, tables
from pipeline.auditing import pictures
from pipeline.auditing.duplicates import Pair, exact_duplicates, near_duplicates
from pipeline.auditing.labels import LabelIssues, label_issues
from pipeline.cache.reader import load_head_inputs, open_features
from pipeline.cache.store import SPLITS, FeatureStore
from pipeline.errors import PipelineError
from pipeline.labelling import label_cache
from pipeline.runs.files import remove_leftovers

SUSPECTS = "suspects.csv"
DUPLICATES = "duplicates.csv"
MAP = "map.csv"  # the map's points: what the report page draws
SUMMARY = "audit.json"
# Re-encoded copies of small synthetic images sit at 0.986 (tests/test_audit.py); on ELPV's look-alike cells
# 0.98 gives 4,358 pairs, 0.99 772, 0.995 58 (bench/RESULTS.md): raise it for data of near-identical images.
DEFAULT_SIMILARITY = 0.98


@dataclass
class AuditOptions:
    features: Any = None  # a cache (FeatureStore, directory or name under cache_root), or several fused
    out: Path | None = None  # default: <models>/audit-<cache directory name>
    models: Path = Path("models")
    cache_root: Path = Path("features")
    folds: int = 5
    similarity: float = DEFAULT_SIMILARITY
    seed: int = 0
    memory_budget: int | None = None  # bytes
    progress: bool = True
    c_grid: str | None = None  # the first fold's C search (default AUDIT_C_GRID); the other folds fit its C
    labels: Any = None  # a labels table (pipeline/labelling.LabelSpec): audit its labels instead of the cache's

    def __post_init__(self) -> None:
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            raise PipelineError(f"--folds {self.folds}: a whole number, 2 or more")
        if self.c_grid is not None:
            from pipeline.heads import log_grid

            log_grid(str(self.c_grid))  # a grid that cannot be searched is refused before any work
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= 2**32 - 1:
            raise PipelineError(f"--seed {self.seed}: a whole number from 0 to {2**32 - 1}")
        if not (isinstance(self.similarity, int | float) and math.isfinite(self.similarity)
                and 0 < self.similarity <= 1):
            raise PipelineError(f"--similarity {self.similarity}: a cosine similarity above 0, at most 1")


@dataclass
class AuditSummary:
    directory: Path
    images: int
    suspects: int
    duplicate_pairs: int
    exact_pairs: int
    cross_split_pairs: dict[str, int]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Images:
    """Every image of the audited cache(s), in one order: the labelled ones split by split, then the
    unlabelled ones (split ""): label issues are found among the first `labelled`, duplicates among
    all. `targets`: a multi-label labelling's 0/1 a label (else None)."""

    vectors: np.ndarray
    labels: np.ndarray
    paths: list[str]
    ids: list[str]
    splits: list[str]
    root: Path
    class_names: list[str]
    labelled: int = 0
    targets: np.ndarray | None = None

    def given(self, row: int) -> str:
        """The label(s) of a row as written in the audit's tables: a class, labels joined by ';', or ''."""
        if row >= self.labelled:
            return ""
        if self.targets is not None:
            return ";".join(name for name, on in zip(self.class_names, self.targets[row]) if on >= 0.5)
        return self.class_names[self.labels[row]]

    def suggested(self, row: int, proba: np.ndarray) -> str:
        if self.targets is not None:
            return ";".join(name for name, p in zip(self.class_names, proba[row]) if p >= 0.5)
        return self.class_names[int(proba[row].argmax())]


def _load(stores: Sequence[FeatureStore], views: Sequence[Any], budget: int | None) -> _Images:
    store = stores[0]
    for each in stores:
        if not each.pretrained:
            raise PipelineError(f"{each.directory} was extracted with --weights none: neighbours and label errors "
                                "of random features mean nothing; extract with pretrained weights and audit that")
    indexes = store.split_indexes()
    unlabelled = np.flatnonzero(~store.labelled_rows()) if len(stores) == 1 else None
    if not sum(len(index.paths) for index in indexes.values()) and (unlabelled is None or not len(unlabelled)):
        raise PipelineError(f"{store.directory} holds no images: nothing to audit")
    splits: dict[str, Any] = {}
    if store.class_names:
        splits = load_head_inputs(stores, views, budget)
        if not splits["train"].in_memory:
            raise PipelineError(f"the audit holds the features in memory, and those of {store.directory} are "
                                "more than the memory budget: pool them (extract --pooling avg) or raise "
                                "--memory-budget")
    present = [split for split in SPLITS if split in splits and len(splits[split])]
    for split in present:
        check_feature_values(splits[split].matrix, store.directory)
    parts = [splits[s].matrix for s in present]
    paths = [p for s in present for p in splits[s].paths]
    ids = [d for s in present for d in indexes[s].sha256]
    labelled = len(paths)
    if unlabelled is not None and len(unlabelled):
        every = store.rows_index()
        vectors = views[0].vectors(store.read_rows(every.locations[unlabelled], views[0].layers))
        check_feature_values(vectors, store.directory)
        parts.append(vectors)
        paths += [every.paths[r] for r in unlabelled]
        ids += [every.sha256[r] for r in unlabelled]
    multilabel = bool(getattr(store.labelling, "multilabel", False))
    return _Images(
        vectors=np.concatenate(parts).astype(np.float32),
        labels=np.concatenate([*[splits[s].labels for s in present],
                               np.full(len(paths) - labelled, -1)]).astype(np.int64),
        paths=paths,
        ids=ids,
        splits=[s for s in present for _ in splits[s].paths] + [""] * (len(paths) - labelled),
        root=Path(store.data_root or ""),
        class_names=list(store.class_names),
        labelled=labelled,
        targets=np.concatenate([splits[s].targets for s in present]) if multilabel and present else None,
    )


LARGEST_FEATURE = 1e15  # no backbone's features come near; squares of larger ones overflow float32 statistics


def check_feature_values(matrix: np.ndarray, cache: Path) -> None:
    """Features a neighbour search and a logistic regression can take: finite, and far from
    float32's limits (a damaged or hand-edited cache)."""
    for start in range(0, len(matrix), 4096):
        block = matrix[start:start + 4096]
        if not np.isfinite(block).all() or (block.size and float(np.abs(block).max()) > LARGEST_FEATURE):
            raise PipelineError(f"{cache} holds feature values that are not finite or beyond {LARGEST_FEATURE:g} "
                                "(damaged?): extract again into a new cache")


def default_directory(models: Path, stores: Sequence[FeatureStore]) -> Path:
    name = "+".join(store.directory.name for store in stores)
    return Path(models) / f"audit-{name}"[:200]


def run_audit(options: AuditOptions) -> AuditSummary:
    started = time.perf_counter()
    stores, views = open_features(options.features, options.cache_root, None, None)
    stores = [label_cache(store, options.labels) for store in stores]
    final = Path(options.out) if options.out is not None else default_directory(options.models, stores)
    inputs = [("feature cache", store.directory) for store in stores]
    inputs += [("image folder", Path(store.data_root)) for store in stores if store.data_root]
    final = outputs.check_output_folder(final, "--out", inputs, replaces_whole=True, marker=SUMMARY,
                                        what="an earlier audit")
    remove_leftovers(final.parent)  # what a killed audit (or run) left beside it
    images = _load(stores, views, options.memory_budget)
    n = images.labelled
    if n:
        found = label_issues(images.vectors[:n], images.labels[:n], images.class_names, options.folds, options.seed,
                             options.progress, options.c_grid, targets=images.targets)
    else:  # a cache without labels: duplicates only
        found = LabelIssues(np.zeros((0, 0)), np.zeros(0, np.int64), np.zeros(0), [])
    exact = exact_duplicates(images.ids)
    near, method = near_duplicates(images.vectors, options.similarity)
    exact_keys = {(p.a, p.b) for p in exact}
    pairs = exact + [p for p in near if (p.a, p.b) not in exact_keys]
    crossing = [p for p in pairs if images.splits[p.a] != images.splits[p.b]]
    cross_counts = Counter("-".join(sorted((images.splits[p.a], images.splits[p.b]))) for p in crossing)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing_directory(final, "no audit was left half-written") as directory:
        _write_suspects(directory / SUSPECTS, images, found)
        np.save(directory / "pred_probs.npy", found.pred_probs.astype(np.float32), allow_pickle=False)
        atomic.write_text(directory / "ids.txt", "".join(f"{i}\n" for i in images.ids))
        _write_duplicates(directory / DUPLICATES, images, pairs)
        marked_suspects, marked_pairs = found.issues[:200], sorted({r for p in crossing for r in (p.a, p.b)})
        layout = pictures.map_layout(images.vectors, [*marked_suspects, *marked_pairs], options.seed)
        how = pictures.embedding_map(layout, images.labels, images.class_names, marked_suspects, marked_pairs,
                                     directory / "map.png")
        _write_map(directory / MAP, images, layout)
        top = found.issues[:pictures.SHEET]
        pictures.contact_sheet(
            [images.root / images.paths[r] for r in top],
            [f"{Path(images.paths[r]).name} ({images.splits[r]})\ngiven {images.given(r) or '(none)'}, "
             f"suggested {images.suggested(r, found.pred_probs) or '(none)'}" for r in top],
            f"Top {len(top)} label suspects of {len(found.issues)} (cleanlab, out-of-fold probabilities)",
            directory / "suspects.png")
        shown = sorted(crossing, key=lambda p: -p.similarity)[:pictures.PAIRS]
        pictures.pairs_sheet(
            [(images.root / images.paths[p.a], images.root / images.paths[p.b],
              f"{images.splits[p.a]} / {images.splits[p.b]}: {p.similarity:.4f}{' (same bytes)' if p.exact else ''}"
              f"\n{images.paths[p.a]}\n{images.paths[p.b]}") for p in shown],
            f"Closest cross-split pairs ({len(crossing)} at similarity >= {options.similarity})",
            directory / "duplicates.png")
        details = _details(options, stores, images, found, pairs, crossing, cross_counts, method, how)
        atomic.write_json(directory / SUMMARY, details)
    return AuditSummary(final, len(images.labels), len(found.issues), len(pairs), len(exact), dict(cross_counts),
                        time.perf_counter() - started, details)


BANDS = (0.999, 0.99)  # re-encoded copies sit above 0.999 on real data; distinct look-alikes mostly below 0.99


def similarity_bands(pairs: Sequence[Pair], threshold: float) -> dict[str, int]:
    """Pairs counted per band of similarity (exact copies in the top band), so that a headline
    count of look-alikes does not read as a count of copies: ">=0.999", "0.99-0.999", and from
    the threshold to 0.99."""
    edges = [edge for edge in BANDS if edge > threshold] + [threshold]
    names = [f">={edges[0]:g}"] + [f"{low:g}-{high:g}" for low, high in zip(edges[1:], edges[:-1])]
    counts = dict.fromkeys(names, 0)
    for pair in pairs:
        value = 1.0 if pair.exact else pair.similarity
        band = next((i for i, edge in enumerate(edges) if value >= edge), len(edges) - 1)
        counts[names[band]] += 1
    return counts


SUSPECTS_HEADER = ["path", "split", "label", "suggested", "score", "id"]  # a labels table: path, label (given), id


def _write_suspects(path: Path, images: _Images, found: Any) -> None:
    """suspects.csv, in the labels table's form: `--labels suspects.csv` retrains on its `label`
    column as edited, `--label-column suggested` accepts cleanlab's suggestions; either way the
    images it does not list keep their labels."""
    with atomic.replacing(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = tables.writer(handle)
        writer.writerow(SUSPECTS_HEADER)
        for row in found.issues:
            writer.writerow([images.paths[row], images.splits[row], images.given(row),
                             images.suggested(row, found.pred_probs), f"{found.quality[row]:.6f}", images.ids[row]])


def _write_duplicates(path: Path, images: _Images, pairs: Sequence[Pair]) -> None:
    with atomic.replacing(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = tables.writer(handle)
        writer.writerow(["path_a", "split_a", "class_a", "path_b", "split_b", "class_b", "similarity", "exact"])
        for p in sorted(pairs, key=lambda p: (not p.exact, -p.similarity)):
            writer.writerow([images.paths[p.a], images.splits[p.a], images.given(p.a), images.paths[p.b],
                             images.splits[p.b], images.given(p.b), f"{p.similarity:.6f}", p.exact])


def _write_map(path: Path, images: _Images, layout: pictures.MapLayout) -> None:
    with atomic.replacing(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = tables.writer(handle)
        writer.writerow(["path", "split", "label", "x", "y", "id"])
        for row, (x, y) in zip(layout.rows, layout.xy):
            writer.writerow([images.paths[row], images.splits[row], images.given(row), f"{x:.4f}", f"{y:.4f}",
                             images.ids[row]])


def _details(options: AuditOptions, stores: Sequence[FeatureStore], images: _Images, found: Any,
             pairs: Sequence[Pair], crossing: Sequence[Pair], cross_counts: Counter, method: str,
             how: str) -> dict[str, Any]:
    names = images.class_names

    def has(row: int, i: int) -> bool:
        if row >= images.labelled:
            return False
        return bool(images.targets[row, i] >= 0.5) if images.targets is not None else images.labels[row] == i

    per_class = {name: {"images": int(sum(has(r, i) for r in range(images.labelled))),
                        "suspects": int(sum(1 for r in found.issues if has(r, i))),
                        "in_duplicate_pairs": int(sum(1 for p in pairs if has(p.a, i) or has(p.b, i)))}
                 for i, name in enumerate(names)}
    return {
        "caches": [str(store.directory.resolve()) for store in stores],
        "data_root": stores[0].data_root,  # where the images' paths are relative to (the report page's thumbnails)
        "backbones": [store.fingerprint.backbone for store in stores],
        "images": len(images.labels),
        "labelled": images.labelled,
        "unlabelled": len(images.labels) - images.labelled,
        "task": "multilabel" if images.targets is not None else "classes",
        "classes": names,
        "label_issues": {
            "method": "cleanlab.filter.find_label_issues on out-of-fold probabilities of a logistic regression "
                      f"({options.folds}-fold stratified; C chosen in the first fold on a validation part of its "
                      "training images, the other folds fit that C)",
            "folds": options.folds, "chosen_C": found.chosen_c, "suspects": len(found.issues),
            "by_split": dict(Counter(images.splits[r] for r in found.issues)),
        },
        "duplicates": {
            "similarity_threshold": options.similarity, "neighbour_search": method,
            "pairs": len(pairs), "exact_pairs": sum(1 for p in pairs if p.exact),
            "cross_split_pairs": len(crossing), "cross_split_by_splits": dict(cross_counts),
            "exact_under_two_classes": sum(1 for p in pairs if p.exact and max(p.a, p.b) < images.labelled
                                           and images.given(p.a) != images.given(p.b)),
            "pairs_by_similarity": similarity_bands(pairs, options.similarity),
            "cross_split_by_similarity": similarity_bands(crossing, options.similarity),
        },
        "per_class": per_class,
        "map": how,
        "seed": options.seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
