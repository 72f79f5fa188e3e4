"""Label issues from the cache: out-of-fold predicted probabilities of the project's own logistic
regression on the cached features (stratified K-fold; C chosen inside each fold on a validation
part of its training images, never on the held-out fold), ranked by cleanlab's confident
learning (`cleanlab.filter.find_label_issues`, `cleanlab.rank.get_label_quality_scores`): the
library's method, not a re-implementation. Probability columns are in class order, as cleanlab
expects."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.auditing import require
from pipeline.errors import PipelineError

# Five fits per fold. Not below 0.01: when labels are noisy, the validation loss that breaks the
# head's accuracy ties favours the most regularised C, whose probabilities are too soft for confident
# learning's per-class thresholds (a test with planted mislabels: 1 of 3 found from 1e-4:1e2:7, 3 of
# 3 from this grid, at the top).
AUDIT_C_GRID = "1e-2:1e2:5"


@dataclass
class LabelIssues:
    pred_probs: np.ndarray  # (images, classes), out of fold
    issues: np.ndarray  # row indices flagged by cleanlab, most suspicious first
    quality: np.ndarray  # (images,) cleanlab's label quality score: lower is more suspicious
    chosen_c: list[float]  # the C chosen inside each fold


def check_folds(labels: np.ndarray, class_names: list[str], folds: int) -> None:
    """Every class needs at least `folds` images (stratified folds), and two classes at least."""
    if folds < 2:
        raise PipelineError(f"--folds {folds}: use 2 or more")
    counts = np.bincount(labels, minlength=len(class_names))
    present = [i for i, count in enumerate(counts) if count]
    if len(present) < 2:
        raise PipelineError("label issues need images of two classes at least")
    small = [(class_names[i], int(counts[i])) for i in present if counts[i] < max(folds, 3)]
    if small:
        name, count = small[0]
        fewer = max(2, min(count, folds) - 1) if count >= 3 else None
        hint = f"use --folds {fewer}" if fewer and fewer < folds else "add images to it"
        raise PipelineError(f"class {name} has {count} images, too few for {folds} folds (each fold needs some of "
                            f"every class, and at least 3 in all): {hint}")


def out_of_fold_probabilities(x: np.ndarray, labels: np.ndarray, class_names: list[str], folds: int = 5,
                              seed: int = 0, c_grid: str = AUDIT_C_GRID, progress: bool = True,
                              c_per_fold: bool = False) -> tuple[np.ndarray, list[float]]:
    """(images, classes) probabilities, each row from a head that never saw that image. C is
    chosen in the first fold (on a validation part of its training images) and the other folds
    fit that one C (`c_per_fold`: each fold searches the grid again, as before, for the bench to
    compare). After the first fold the time the rest will take is said, with the quicker options."""
    import sys
    import time

    from sklearn.model_selection import StratifiedKFold, train_test_split
    from tqdm import tqdm

    from pipeline.errors import option
    from pipeline.heads import ArrayFeatures, LogRegHead

    classes = len(class_names)
    proba = np.zeros((len(labels), classes))
    chosen: list[float] = []
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    bar = tqdm(list(splitter.split(x, labels)), desc="label issues: folds", disable=not progress, leave=False,
               file=sys.stderr)
    for number, (kept, held) in enumerate(bar):
        started = time.perf_counter()
        counts = np.bincount(labels[kept], minlength=classes)
        present, held_out = int(np.sum(counts > 0)), math.ceil(0.2 * len(kept))
        # stratified where every class can be in both parts (scikit-learn refuses otherwise): a small cache's folds
        stratify = labels[kept] if counts[counts > 0].min() >= 2 and min(held_out, len(kept) - held_out) >= present \
            else None
        inner, validation = train_test_split(kept, test_size=0.2, random_state=seed, stratify=stratify)
        grid = c_grid if number == 0 or c_per_fold else repr(chosen[0])
        head = LogRegHead(c_grid=grid, n_jobs=-1)
        head.fit(ArrayFeatures(x[inner], labels[inner], class_names),
                 ArrayFeatures(x[validation], labels[validation], class_names), progress=False)
        fold = head.predict_proba(ArrayFeatures(x[held], labels[held], class_names))
        present = np.unique(labels[inner])
        if fold.shape[1] == classes:
            proba[held] = fold
        else:  # a class absent from this fold's training part gets probability 0
            proba[np.ix_(held, present)] = fold
        chosen.append(float(head.C_))
        if number == 0 and progress and folds > 1:
            seconds = time.perf_counter() - started
            fits = len(head.history_)
            rest = (folds - 1) * seconds * (1 if c_per_fold else 1 / max(fits, 1))
            bar.write(f"label issues: fold 1 of {folds} took {seconds:.0f} s ({fits} fits of C); the other "
                      f"{folds - 1} take about {rest:.0f} s more. Quicker: {option('folds', 3)}, or one C "
                      f"({option('c_grid', repr(chosen[0]))}, the one chosen here)", file=sys.stderr)
    return proba, chosen


def find_label_issues(labels: np.ndarray, pred_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flagged rows ranked most suspicious first, every row's label quality score), by cleanlab."""
    from cleanlab.filter import find_label_issues as cleanlab_issues
    from cleanlab.rank import get_label_quality_scores

    ranked = cleanlab_issues(labels, pred_probs, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(labels, pred_probs, method="self_confidence")
    return np.asarray(ranked, np.int64), np.asarray(quality, np.float64)


def multilabel_issues(x: np.ndarray, targets: np.ndarray, class_names: list[str], folds: int, seed: int,
                      c_grid: str, progress: bool) -> LabelIssues:
    """Multi-label: out-of-fold probabilities of the one-vs-rest logistic regression (one sigmoid a
    label; C chosen in the first fold), ranked by cleanlab's multi-label confident learning
    (`cleanlab.multilabel_classification`)."""
    import sys

    from cleanlab.multilabel_classification.filter import find_label_issues as multilabel_filter
    from cleanlab.multilabel_classification.rank import get_label_quality_scores
    from sklearn.model_selection import KFold, train_test_split
    from tqdm import tqdm

    from pipeline.heads import ArrayFeatures, LogRegHead

    truth = np.asarray(targets) >= 0.5
    if len(truth) < 2 * folds:
        raise PipelineError(f"{len(truth)} labelled images are too few for {folds} folds: use --folds 2, or label more")
    proba = np.zeros(truth.shape)
    chosen: list[float] = []
    splitter = KFold(n_splits=folds, shuffle=True, random_state=seed)
    for number, (kept, held) in enumerate(tqdm(list(splitter.split(x)), desc="label issues: folds",
                                                 disable=not progress, leave=False, file=sys.stderr)):
        inner, validation = train_test_split(kept, test_size=0.2, random_state=seed)
        head = LogRegHead(c_grid=c_grid if number == 0 else repr(chosen[0]), n_jobs=-1)
        head.fit(ArrayFeatures(x[inner], truth[inner].argmax(1), class_names, truth[inner], multilabel=True),
                 ArrayFeatures(x[validation], truth[validation].argmax(1), class_names, truth[validation],
                               multilabel=True), progress=False)
        proba[held] = head.predict_proba(ArrayFeatures(x[held], truth[held].argmax(1), class_names, truth[held],
                                                       multilabel=True))
        chosen.append(float(head.C_))
    given = [list(np.flatnonzero(row)) for row in truth]
    issues = multilabel_filter(given, proba, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(given, proba)
    return LabelIssues(proba, np.asarray(issues, np.int64), np.asarray(quality, np.float64), chosen)


def label_issues(x: np.ndarray, labels: np.ndarray, class_names: list[str], folds: int = 5, seed: int = 0,
                 progress: bool = True, c_grid: str | None = None, c_per_fold: bool = False,
                 targets: np.ndarray | None = None) -> LabelIssues:
    """Label issues of one class an image, or (`targets`: 0/1 a label) of several."""
    require("cleanlab", "finding label issues")
    if targets is not None:
        return multilabel_issues(x, targets, class_names, folds, seed, c_grid or AUDIT_C_GRID, progress)
    check_folds(labels, class_names, folds)
    proba, chosen = out_of_fold_probabilities(x, labels, class_names, folds, seed, c_grid or AUDIT_C_GRID, progress,
                                              c_per_fold)
    issues, quality = find_label_issues(labels, proba)
    return LabelIssues(proba, issues, quality, chosen)
