"""What a run tells its reader: metrics, per-class report, confusion matrix, curves, mistakes, and
the table of all runs side by side. Pictures beside machine-readable CSV and JSON."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic, tables
from pipeline.drawing import pyplot, serialised
from pipeline.errors import command

CONFIDENCE = 0.95


def wilson_interval(correct: int, total: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval for a proportion (correct of total): unlike the normal
    approximation it stays inside [0, 1] and is sound for small splits and accuracies near 100%."""
    from scipy.stats import norm

    if total <= 0:
        return 0.0, 1.0
    z = float(norm.ppf(0.5 + confidence / 2))
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    low, high = float(centre - half), float(centre + half)
    # exactly 0 and 1 at the ends (rounding would leave the point estimate outside by 1e-16)
    return (0.0 if correct == 0 else max(0.0, min(low, p)), 1.0 if correct == total else min(1.0, max(high, p)))


def accuracy_text(values: dict[str, Any]) -> str:
    """`85.32% (95% CI 82.41-87.86%)`: an accuracy with its interval, as reports and `runs` show it."""
    low, high = values.get("accuracy_ci95_low", float("nan")), values.get("accuracy_ci95_high", float("nan"))
    return f"{values['accuracy']:.2%} (95% CI {low:.2%}-{high:.2%})".replace("%-", "-", 1)


ECE_BINS = 15  # equal-width bins of the top-class probability (Guo et al. 2017)


def expected_calibration_error(labels: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS) -> float:
    """How far the top-class probability is from the accuracy it claims: the images binned by that
    probability into `bins` equal-width bins over [0, 1], the gap between each bin's mean
    probability and its accuracy, weighted by the bin's share of the images (0: calibrated)."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            error += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(error)


def decisions(proba: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """The class said for each image: the most probable, or for a binary run with a decision
    `threshold`, class 1 where its probability is at or above it."""
    if threshold is None:
        return proba.argmax(axis=1)
    return (np.asarray(proba)[:, 1] >= threshold).astype(np.int64)


def split_metrics(labels: np.ndarray, proba: np.ndarray, class_names: Sequence[str],
                  threshold: float | None = None) -> dict[str, Any]:
    """Accuracy with its 95% Wilson interval, mean per-class accuracy (over classes present), macro
    F1, log loss and expected calibration error."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score, f1_score, log_loss

    if len(labels) == 0:
        return {"images": 0}
    predicted = decisions(proba, threshold)
    classes = list(range(len(class_names)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true": intended
        per_class = balanced_accuracy_score(labels, predicted)  # mean recall over the classes present
    correct = int(np.sum(predicted == labels))
    return {
        "images": int(len(labels)),
        "accuracy": correct / len(labels),
        # the 95% Wilson score interval, as two numbers (metrics stay a flat mapping of numbers)
        **dict(zip(("accuracy_ci95_low", "accuracy_ci95_high"), wilson_interval(correct, len(labels)))),
        "mean_per_class_accuracy": float(per_class),
        "macro_f1": float(f1_score(labels, predicted, labels=classes, average="macro", zero_division=0)),
        "loss": float(log_loss(labels, _normalised(proba), labels=classes)),
        "ece": expected_calibration_error(labels, _normalised(proba)),
    }


def soft_metrics(targets: np.ndarray, proba: np.ndarray) -> dict[str, Any]:
    """Scores against soft targets (a probability per class and image, e.g. ELPV's defect
    probability): the cross-entropy against them ("log_loss"), the Brier score (mean squared
    difference summed over classes) and, for two classes, the mean absolute error of the
    probability of class 1. The hard figures (accuracy against the thresholded target) are
    split_metrics' own."""
    if len(targets) == 0:
        return {"images": 0}
    q = np.clip(_normalised(proba), 1e-15, 1.0)
    t = np.asarray(targets, np.float64)
    figures = {"images": int(len(t)), "log_loss": float(np.mean(-np.sum(t * np.log(q), axis=1))),
               "brier": float(np.mean(np.sum((q - t) ** 2, axis=1)))}
    if t.shape[1] == 2:
        figures["mean_absolute_error"] = float(np.mean(np.abs(q[:, 1] - t[:, 1])))
    return figures


def multilabel_metrics(targets: np.ndarray, proba: np.ndarray, thresholds: Sequence[float],
                       class_names: Sequence[str]) -> dict[str, Any]:
    """Multi-label scores, each label decided at its threshold: exact-match accuracy (every label of
    the image right; with its 95% Wilson interval) as "accuracy", the share of labels right
    ("hamming_accuracy"), micro and macro F1, mean average precision (over the labels present),
    and per label: precision, recall, F1, average precision, images with it."""
    from sklearn.metrics import average_precision_score, f1_score, precision_recall_fscore_support

    truth = np.asarray(targets) >= 0.5
    if len(truth) == 0:
        return {"images": 0}
    said = np.asarray(proba) >= np.asarray(thresholds)[None, :]
    exact = int(np.sum(np.all(said == truth, axis=1)))
    precision, recall, f1, support = precision_recall_fscore_support(truth, said, average=None, zero_division=0)
    present = [k for k in range(truth.shape[1]) if truth[:, k].any()]
    precisions = {k: float(average_precision_score(truth[:, k], proba[:, k])) for k in present}
    return {
        "images": int(len(truth)),
        "accuracy": exact / len(truth),  # what runs are compared and chosen by: the exact match
        **dict(zip(("accuracy_ci95_low", "accuracy_ci95_high"), wilson_interval(exact, len(truth)))),
        "exact_match_accuracy": exact / len(truth),
        "hamming_accuracy": float(np.mean(said == truth)),
        "micro_f1": float(f1_score(truth, said, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(truth, said, average="macro", zero_division=0)),
        "mean_average_precision": float(np.mean(list(precisions.values()))) if precisions else float("nan"),
        "per_label": {name: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                             "average_precision": precisions.get(k), "images": int(support[k]),
                             "threshold": float(thresholds[k])} for k, name in enumerate(class_names)},
    }


def write_multilabel_reports(directory: Path, targets: np.ndarray, proba: np.ndarray, thresholds: Sequence[float],
                             paths: Sequence[str], class_names: Sequence[str], title: str) -> str:
    """classification_report.txt (per label, at its threshold) and misclassified.csv (the images
    whose label set is not exactly right) for one split; returns the text report."""
    from sklearn.metrics import classification_report

    directory.mkdir(parents=True, exist_ok=True)
    truth = np.asarray(targets) >= 0.5
    said = np.asarray(proba) >= np.asarray(thresholds)[None, :]
    figures = multilabel_metrics(targets, proba, thresholds, class_names)
    report = classification_report(truth, said, target_names=list(class_names), digits=4, zero_division=0)
    lines = [f"exact-match accuracy {accuracy_text(figures)}: every label of the image right (95% Wilson interval)",
             f"labels right {figures['hamming_accuracy']:.2%}, micro F1 {figures['micro_f1']:.4f}, macro F1 "
             f"{figures['macro_f1']:.4f}, mean average precision {figures['mean_average_precision']:.4f}",
             "thresholds (chosen on validation): " + ", ".join(f"{name} {t:.3f}" for name, t in
                                                              zip(class_names, thresholds))]
    text = f"{report}\n" + "\n".join(lines) + "\n"
    atomic.write_text(directory / "classification_report.txt", f"{title}\n\n{text}")
    wrong = np.flatnonzero(np.any(said != truth, axis=1))
    with atomic.replacing(directory / "misclassified.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = tables.writer(handle)
        writer.writerow(["path", "true_labels", "predicted_labels", *[f"probability_{n}" for n in class_names]])
        for i in wrong:
            writer.writerow([paths[i], ";".join(n for n, t in zip(class_names, truth[i]) if t),
                             ";".join(n for n, t in zip(class_names, said[i]) if t),
                             *[f"{p:.4f}" for p in proba[i]]])
    for stale in ("confusion_matrix.csv", "confusion_matrix.png", "most_confused.csv"):
        (directory / stale).unlink(missing_ok=True)
    return text


def _normalised(proba: np.ndarray) -> np.ndarray:
    """float32 softmax outputs sum to one only within float32 rounding; log_loss wants float64 rows."""
    proba = np.asarray(proba, np.float64)
    return proba / proba.sum(axis=1, keepdims=True)


def confusion(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, predicted, labels=list(range(classes))).astype(np.int64)


MAX_PICTURE_CLASSES = 30  # a confusion-matrix picture with more classes is unreadable (and slow to draw)
MAX_TERMINAL_CLASSES = 20  # above this the terminal gets the summary and the most-confused pairs
MOST_CONFUSED = 20


def write_split_reports(directory: Path, labels: np.ndarray, proba: np.ndarray, paths: Sequence[str],
                        class_names: Sequence[str], title: str, threshold: float | None = None) -> str:
    """classification_report.txt, confusion_matrix.csv (always), confusion_matrix.png (up to
    MAX_PICTURE_CLASSES classes), most_confused.csv and misclassified.csv for one split; returns
    the text report for the terminal (the whole per-class table and matrix for a few classes, the
    averages and the most-confused pairs for many)."""
    from sklearn.metrics import classification_report

    directory.mkdir(parents=True, exist_ok=True)
    predicted = decisions(proba, threshold)
    classes = list(range(len(class_names)))
    report = classification_report(labels, predicted, labels=classes, target_names=list(class_names),
                                   digits=4, zero_division=0)
    matrix = confusion(labels, predicted, len(class_names))
    pairs = most_confused(matrix, class_names)
    pairs_text = _pairs_text(pairs)
    many = len(class_names) > MAX_TERMINAL_CLASSES
    matrix_text = (f"confusion matrix: {len(class_names)} classes, see confusion_matrix.csv\n" if many
                   else _confusion_text(matrix, class_names))
    correct = int(np.sum(predicted == labels))
    low, high = wilson_interval(correct, len(labels))
    interval = {"accuracy": correct / max(len(labels), 1), "accuracy_ci95_low": low, "accuracy_ci95_high": high}
    accuracy_line = (f"accuracy {accuracy_text(interval)}: {correct} of {len(labels)} images; the interval is the "
                     "95% Wilson score interval, how far the figure could move from the split alone\n")
    if threshold is not None:
        accuracy_line += (f"decided at the threshold {threshold:.4g} on the probability of {class_names[1]} (chosen on "
                          "validation)\n")
    report = f"{report}\n{accuracy_line}"
    atomic.write_text(directory / "classification_report.txt", f"{title}\n\n{report}\n{matrix_text}\n{pairs_text}")
    with atomic.replacing(directory / "most_confused.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = tables.writer(handle)
        writer.writerow(["true_label", "predicted_label", "images", "share_of_true_class"])
        writer.writerows([true, guess, count, f"{share:.4f}"] for true, guess, count, share in pairs)
    with atomic.replacing(directory / "confusion_matrix.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = tables.writer(handle)
        writer.writerow(["true \\ predicted", *class_names, "images", "class_accuracy"])
        for name, row in zip(class_names, matrix):
            total = int(row.sum())
            accuracy = row[class_names.index(name)] / total if total else float("nan")
            writer.writerow([name, *map(int, row), total, f"{accuracy:.4f}"])
    picture = directory / "confusion_matrix.png"
    if len(class_names) <= MAX_PICTURE_CLASSES:
        _confusion_picture(picture, matrix, class_names, title)
    else:
        picture.unlink(missing_ok=True)  # an earlier, smaller report's picture would mislead
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-proba[wrong, predicted[wrong]], kind="stable")]  # most confident first
    with atomic.replacing(directory / "misclassified.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = tables.writer(handle)
        writer.writerow(["path", "true_label", "predicted_label", "probability", "probability_of_true"])
        for i in wrong:
            writer.writerow([paths[i], class_names[labels[i]], class_names[predicted[i]],
                             f"{proba[i, predicted[i]]:.4f}", f"{proba[i, labels[i]]:.4f}"])
    if many:
        summary = "\n".join(report.rstrip("\n").splitlines()[-5:])  # accuracy, averages, the interval
        return (f"{len(class_names)} classes: per-class figures in classification_report.txt\n{summary}\n\n"
                f"{pairs_text}")
    return f"{report}\n{matrix_text}\n{pairs_text}"


def most_confused(matrix: np.ndarray, class_names: Sequence[str], top: int = MOST_CONFUSED) -> list[tuple]:
    """The off-diagonal cells with the most images: (true, predicted, images, share of the true class)."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    flat = np.flatnonzero(off)
    flat = flat[np.argsort(-off.flat[flat], kind="stable")][:top]
    totals = matrix.sum(axis=1)
    rows, columns = np.unravel_index(flat, matrix.shape)
    return [(class_names[r], class_names[c], int(matrix[r, c]), matrix[r, c] / totals[r])
            for r, c in zip(rows, columns)]


def _pairs_text(pairs: Sequence[tuple]) -> str:
    if not pairs:
        return "no confusions\n"
    lines = ["most confused (true -> predicted: images, share of the true class)"]
    lines += [f"  {true} -> {guess}: {count} ({share:.1%})" for true, guess, count, share in pairs]
    return "\n".join(lines) + "\n"


def _confusion_text(matrix: np.ndarray, class_names: Sequence[str]) -> str:
    width = max(8, *(len(n) for n in class_names))
    lines = ["confusion matrix (rows: true, columns: predicted)",
             " " * width + "".join(f"{n[:width]:>{width + 2}}" for n in class_names) + "   class accuracy"]
    for c, (name, row) in enumerate(zip(class_names, matrix)):
        total = row.sum()
        accuracy = f"{row[c] / total:.1%}" if total else "-"
        lines.append(f"{name:<{width}}" + "".join(f"{int(v):>{width + 2}}" for v in row) + f"   {accuracy:>8}")
    return "\n".join(lines) + "\n"


@serialised
def _confusion_picture(path: Path, matrix: np.ndarray, class_names: Sequence[str], title: str) -> None:
    plt = pyplot()
    size = max(4.0, 0.9 * len(class_names) + 2.5)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, column), count in np.ndenumerate(matrix):
        axes.text(column, row, f"{count}\n{shares[row, column]:.0%}", ha="center", va="center",
                  color="white" if shares[row, column] > 0.5 else "black", fontsize=9)
    row_labels = [f"{name}\n{shares[i, i]:.1%} correct" if totals[i, 0] else name
                  for i, name in enumerate(class_names)]
    axes.set_xticks(range(len(class_names)), list(class_names), rotation=45, ha="right")
    axes.set_yticks(range(len(class_names)), row_labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the true class")
    figure.tight_layout()
    _save_figure(figure, path)


def _save_figure(figure: Any, path: Path) -> None:
    try:
        with atomic.replacing(path) as temporary:
            figure.savefig(temporary, dpi=110, format="png")
    finally:
        pyplot().close(figure)


@serialised
def write_history(directory: Path, rows: Sequence[dict[str, Any]], kind: str) -> None:
    """history.csv and curves.png: per epoch for dense heads, per setting tried for a search (`kind`,
    the head's HISTORY_AXIS: the logistic regression's and the SVM's C, the kNN's k)."""
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic.replacing(directory / "history.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = tables.dict_writer(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    plt = pyplot()
    if kind == "epochs":
        panels = [("loss", ["loss", "val_loss"]), ("accuracy", ["accuracy", "val_accuracy"]),
                  ("learning rate", ["learning_rate"])]
        x_key, x_label, log_x = "epoch", "epoch", False
    else:  # a search: one row per setting of the head's axis (C for logreg and svm, k for knn)
        panels = [("accuracy", ["train_accuracy", "validation_accuracy"]), ("validation loss", ["validation_loss"])]
        x_key, x_label, log_x = kind, "C (inverse regularisation)" if kind == "C" else kind, kind == "C"
    width, height = 4.2 * len(panels), 3.4  # inches
    figure, axes = plt.subplots(1, len(panels), figsize=(width, height))
    # Margins fixed in inches (the titles, axis labels and tick labels are short and known): half
    # the drawing time of tight_layout, which draws the figure twice; a run draws this on every fit.
    figure.subplots_adjust(left=0.75 / width, right=1 - 0.15 / width, bottom=0.6 / height, top=1 - 0.35 / height,
                           wspace=0.85 * len(panels) / (width - 0.9))
    x = [row[x_key] for row in rows]
    for ax, (title, keys) in zip(np.atleast_1d(axes), panels):
        for key in keys:
            if key in columns:
                points = [(at, row[key]) for at, row in zip(x, rows) if row.get(key) is not None]
                ax.plot(*zip(*points), marker="o" if len(points) < 60 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel(x_label)
        if log_x:
            _plain_log_scale(ax, "x")
        if title == "learning rate":
            _plain_log_scale(ax, "y")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save_figure(figure, directory / "curves.png")


def _plain_log_scale(ax: Any, which: str) -> None:
    """A log scale on the axes' `which` ("x" or "y") axis, labelled 0.001, 0.01, ..., 1e+06 (numbers,
    not typeset powers of ten: no mathtext to lay out), its minor ticks unlabelled."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


# --- all runs side by side ------------------------------------------------------------------------


def runs_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return f"no runs yet: train one with `{command()} train-head --head logreg`"
    columns = [("name", "name"), ("kind", "kind"), ("head", "head"), ("data", "data"), ("backbone", "backbone"),
               ("image_size", "size"), ("layers", "layers"), ("pooling", "pooling"),
               ("split_counts", "train/val/test"),
               ("validation_accuracy", "val acc"), ("validation_accuracy_ci95", "95% CI"),
               ("validation_loss", "val loss"),
               ("test_accuracy", "test acc"), ("test_accuracy_ci95", "95% CI"), ("test_loss", "test loss"),
               ("test_ece", "test ECE"), ("seconds", "seconds")]
    if any(row.get("excluded") for row in rows):  # train-head --exclude: images left out of training
        columns.insert(8, ("excluded", "excluded"))

    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        if value is None:
            return row.get("problem", "-") if key == "head" else "-"
        if key.endswith("accuracy"):
            return f"{value:.2%}"
        if key in ("test_loss", "test_ece", "validation_loss"):
            return f"{value:.3f}"
        if key.endswith("_ci95"):
            return f"{value[0]:.1%}-{value[1]:.1%}".replace("%-", "-", 1)
        if key == "seconds":
            return f"{value:.1f}"
        if key == "excluded":
            return f"{value:.0f}"
        if key == "data":
            return Path(value).name
        return ascii(value)[1:-1] if key == "name" else str(value)  # a newline in a name stays on its row

    table = [[title for _, title in columns]] + [[cell(row, key) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(text.ljust(width) if i == 0 else text.rjust(width) for i, (text, width)
                       in enumerate(zip(line, widths))) for line in table]
    folders = sorted({row["data"] for row in rows if row.get("data")})
    if len(folders) > 1:
        lines.append(f"data: {len(folders)} folders ({', '.join(folders)}): validation accuracies of different "
                     "folders do not compare; `runs --data DIR` lists one folder's runs")
    lines.append("95% CI: Wilson score interval of the split's accuracy (how far the figure could move "
                 "from the split alone); test loss: log loss; test ECE: expected calibration error (15 bins: how far "
                 "the top-class probability is from its accuracy, 0 is calibrated). `best` is the top run by "
                 "validation accuracy, or among runs whose validation intervals overlap it, the lowest val loss")
    if any(row.get("kind") == "finetune" for row in rows):
        lines.append("finetune: the head's backbone trained end to end; head: the head it started from, and its "
                     "scores are the fine-tuned model's, from pixels")
    untrained = [row["name"] for row in rows if row.get("pretrained") is False]
    if untrained:
        lines.append(f"note: {', '.join(untrained)} used randomly initialised backbone weights (--weights none)")
    return "\n".join(lines)
