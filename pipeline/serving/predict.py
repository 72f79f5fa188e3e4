"""Inference with any run: a head run (its backbone rebuilt with the head on top) or a fine-tuned
run (its exported model). Top-k labels per image; unreadable files are reported, not fatal."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import atomic, backend, tables
from pipeline.data.dataset import printable
from pipeline.errors import PipelineError
from pipeline.images.formats import DEFAULT_MAX_PIXELS
from pipeline.runs import Run

BATCH = 32


@dataclass
class Prediction:
    path: str
    labels: list[str]
    probabilities: list[float]
    error: str | None = None


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


def predict(run: Path, targets: list[Path], top_k: int = 3, models: Path = Path("models"),
            data: Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, tta: str = "none") -> list[Prediction]:
    """Top-k labels of every image, decoded and resized as extract does (the shared image path);
    a file that is not a readable image gets an error instead. `data`: where `run` is `best`, choose
    among the runs of this data folder. `tta`: average the probabilities over test-time views
    (flip: 2, dihedral: 8; pipeline/finetuning/views.py)."""
    from pipeline.finetuning.views import averaged_by_image, view_transforms
    from pipeline.images.reading import EncodedImages

    view_transforms(tta)  # an unknown name is refused before any work

    opened = Run.open(run, models, data=data)
    if opened.kind == "finetune":
        backend.require_tensorflow("predict with a fine-tuned run (its model.keras resizes by area, which only "
                                   "TensorFlow's Keras has)")
    # At the precision the features had. On TensorFlow the model resizes inside (as exported);
    # elsewhere the pipeline's image path has squashed the images already.
    model = opened.classifier(resize=backend.is_tensorflow())
    class_names, size = opened.class_names, opened.fingerprint.image_size
    files = image_files(targets)
    if not files:
        raise PipelineError(f"no images found in {', '.join(map(str, targets))}")
    results = [Prediction(printable(path), [], []) for path in files]
    source = EncodedImages(files, max_pixels)
    rows = averaged_by_image(model.predict_on_batch, source, size, BATCH, tta)
    for index, row in rows.items():
        top = np.argsort(-row, kind="stable")[:top_k]
        results[index] = Prediction(results[index].path, [class_names[i] for i in top], [float(row[i]) for i in top])
    for index in sorted(set(range(len(files))) - set(rows)):
        try:
            reason = f"not a readable image: {source.failure_reason(index, size)}"
        except PipelineError as error:  # too large, or no memory: said as it is
            reason = str(error)
        results[index].error = reason
    return results


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
        writer.writerow(["path", *[f"{kind}_{i + 1}" for i in range(k) for kind in ("label", "probability")], "error"])
        for r in results:
            cells = [c for label, p in zip(r.labels, r.probabilities) for c in (label, f"{p:.6f}")]
            writer.writerow([r.path, *cells, *[""] * (2 * k - len(cells)), r.error or ""])


def predictions_table(results: list[Prediction]) -> str:
    lines = []
    for r in results:
        if r.error:
            lines.append(f"{r.path}  error: {r.error}")
        else:
            lines.append(f"{r.path}  " + "  ".join(f"{label} {p:.4f}" for label, p in zip(r.labels, r.probabilities)))
    return "\n".join(lines).encode("utf-8", "backslashreplace").decode()  # an error may quote a non-UTF-8 name
