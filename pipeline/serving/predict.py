"""Inference with any run: a head run (its backbone rebuilt with the head on top) or a fine-tuned
run (its exported model). Top-k labels per image; unreadable files are reported, not fatal."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import atomic, backend, tables
from pipeline.data.dataset import printable
from pipeline.errors import PipelineError
from pipeline.images.formats import DEFAULT_MAX_PIXELS
from pipeline.runs import Run

BATCH = 32
UNKNOWN = ("flag", "reject")  # an image beyond the run's training images: flagged with its labels, or no labels


@dataclass
class Prediction:
    path: str
    labels: list[str]
    probabilities: list[float]
    error: str | None = None
    unknown: bool | None = None  # beyond the run's recorded distance to its training images (None: not measured)
    unknown_score: float | None = None  # cosine distance to the nearest training image


def image_files(targets: list[Path]) -> list[Path]:
    """Files as given, and the images under directories (recursively, hidden entries skipped)."""
    from pipeline.images.formats import IMAGE_EXTENSIONS

    files = []
    for target in targets:
        if target.is_dir():
            files.extend(sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                                and not any(part.startswith(".") for part in p.relative_to(target).parts)))
        else:
            files.append(target)
    return files


class Predictor:
    """A run opened once for predictions: its classifier built at the precision the features had,
    for any number of calls on lists of files."""

    def __init__(self, run: Path, models: Path = Path("models"), data: Path | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, tta: str = "none", unknown: str = "flag") -> None:
        from pipeline.images.views import view_transforms

        view_transforms(tta)  # an unknown name is refused before any work
        opened = Run.open(run, models, data=data)
        # At the precision the features had. On TensorFlow the model resizes inside (as exported);
        # elsewhere the pipeline's image path has squashed the images already.
        if unknown not in UNKNOWN:
            raise PipelineError(f"--unknown {unknown!r}: choose {' or '.join(UNKNOWN)}")
        self.unknowns = opened.unknowns()  # None: a fine-tuned run, or one made before unknowns were recorded
        self.unknown = unknown
        self.model = opened.classifier(resize=backend.is_tensorflow(), with_features=self.unknowns is not None)
        self.class_names, self.size = opened.class_names, opened.fingerprint.image_size
        self.max_pixels, self.tta = max_pixels, tta
        self.thresholds = opened.thresholds  # a multi-label run: every label at or above its threshold
        self.threshold = opened.threshold  # a binary run deciding its second class at or above it

    def __call__(self, files: list[Path], top_k: int) -> list[Prediction]:
        """Top-k labels of every file, in order; a file that is not a readable image gets an error."""
        from pipeline.images.reading import EncodedImages
        from pipeline.images.views import averaged_by_image

        results = [Prediction(printable(path), [], []) for path in files]
        if not files:
            return results
        source = EncodedImages(files, self.max_pixels)
        rows = averaged_by_image(self.model.predict_on_batch, source, self.size, BATCH, self.tta)
        classes = len(self.class_names)
        scores = {}
        if self.unknowns is not None and rows and len(next(iter(rows.values()))) > classes:  # features follow
            order = sorted(rows)
            distances = self.unknowns.scores(np.stack([rows[i][classes:] for i in order]))
            scores = dict(zip(order, distances.tolist()))
        for index, full in rows.items():
            row = full[:classes]
            top = np.argsort(-row, kind="stable")[:top_k]
            if self.thresholds is not None:  # every label at or above its threshold, most probable first
                top = [i for i in np.argsort(-row, kind="stable") if row[i] >= self.thresholds[i]]
            elif self.threshold is not None:  # the class said first, at the run's threshold
                top = ([1, 0] if row[1] >= self.threshold else [0, 1])[:top_k]
            results[index] = Prediction(results[index].path, [self.class_names[i] for i in top],
                                        [float(row[i]) for i in top])
            if index in scores:
                results[index].unknown_score = float(scores[index])
                results[index].unknown = bool(scores[index] > self.unknowns.threshold)
                if results[index].unknown and self.unknown == "reject":  # no class said for an unknown image
                    results[index].labels, results[index].probabilities = [], []
        for index in sorted(set(range(len(files))) - set(rows)):
            try:
                reason = f"not a readable image: {source.failure_reason(index, self.size)}"
            except PipelineError as error:  # too large, or no memory: said as it is
                reason = str(error)
            results[index].error = reason
        return results


def predict_files(run: Path, targets: list[Path], top_k: int = 3, models: Path = Path("models"),
                  data: Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, tta: str = "none",
                  unknown: str = "flag") -> list[Prediction]:
    """Top-k labels of every image, decoded and resized as extract does (the shared image path);
    a file that is not a readable image gets an error instead. `data`: where `run` is `best`, choose
    among the runs of this data folder. `tta`: average the probabilities over test-time views
    (flip: 2, dihedral: 8; pipeline/images/views.py)."""
    predictor = Predictor(run, models, data, max_pixels, tta, unknown)
    files = image_files(targets)
    if not files:
        raise PipelineError(f"no images found in {', '.join(map(str, targets))}")
    return predictor(files, top_k)


STREAM_CHUNK = 256  # paths taken from a stream at a time: memory bounded by a chunk, not the stream


def predict_stream(predictor: Predictor, targets: Iterator[Path], top_k: int,
                   chunk: int = STREAM_CHUNK) -> Iterator[Prediction]:
    """Predictions of a stream of paths (files or folders), yielded in order, `chunk` paths at a
    time: a generator of 10,000 paths starts answering after its first chunk, in flat memory."""
    for paths in _chunks(targets, chunk):
        yield from predictor(image_files(paths), top_k)


def _chunks(items: Iterator[Path], size: int) -> Iterator[list[Path]]:
    chunk: list[Path] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def check_output(output: Path) -> None:
    """--output must be a .csv or .json file in a folder that exists."""
    if output.suffix.lower() not in (".csv", ".json"):
        raise PipelineError(f"--output {output}: write .csv or .json")
    if not output.parent.is_dir():
        raise PipelineError(f"--output {output}: the folder {output.parent} does not exist; create it first")
    if output.is_dir():
        raise PipelineError(f"--output {output} is a folder: name a .csv or .json file")


def write_predictions(results: list[Prediction], output: Path) -> None:
    check_output(output)
    if output.suffix.lower() == ".json":
        atomic.write_json(output, [vars(r) for r in results])
        return
    k = max((len(r.labels) for r in results), default=0)
    with atomic.replacing(output) as temporary, \
            open(temporary, "w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
        writer = tables.writer(handle)
        writer.writerow(["path", *[f"{kind}_{i + 1}" for i in range(k) for kind in ("label", "probability")], "error",
                         "unknown", "unknown_score"])
        for r in results:
            cells = [c for label, p in zip(r.labels, r.probabilities) for c in (label, f"{p:.6f}")]
            writer.writerow([r.path, *cells, *[""] * (2 * k - len(cells)), r.error or "",
                             "" if r.unknown is None else str(r.unknown).lower(),
                             "" if r.unknown_score is None else f"{r.unknown_score:.6f}"])


def predictions_table(results: list[Prediction]) -> str:
    lines = []
    for r in results:
        if r.error:
            lines.append(f"{r.path}  error: {r.error}")
        else:
            flag = "" if not r.unknown else f"  UNKNOWN (distance {r.unknown_score:.3f})"
            lines.append(f"{r.path}  " + "  ".join(f"{label} {p:.4f}" for label, p in zip(r.labels, r.probabilities))
                         + flag)
    return "\n".join(lines).encode("utf-8", "backslashreplace").decode()  # an error may quote a non-UTF-8 name
