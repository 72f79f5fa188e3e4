"""Ship a run: export it as a model that needs only TensorFlow (keras, savedmodel, tflite) or
ONNX Runtime (onnx). What each format is, how it is written and loaded back, lives in its own
module under pipeline/serving/formats/; this module does what every format shares: the options
checked, the output folder, the run's model built at the export's precision, the agreement check,
labels.txt and export.json.

Runs trained or extracted in bf16/mixed precision are exported in float32 by default (their
weights are float32 already), so they run anywhere; `precision="run"` keeps the run's precision in
the formats that can compute in it (keras, savedmodel: each format's RUN_PRECISION says why the
others cannot). Every export is loaded back and measured against `predict` with the run on the
run's validation images (agreement.py); beside it: `labels.txt` and `export.json` (classes, input
contract, fingerprint, versions, the run's accuracy, that agreement, the checks made).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from pipeline import atomic, outputs, runs
from pipeline.backbone.precision import keras_policy
from pipeline.errors import PipelineError, require_module
from pipeline.images.views import view_steps, with_averaged_views
from pipeline.runs import Run
from pipeline.serving import agreement, formats
from pipeline.serving.formats import NAMES as FORMATS
from pipeline.serving.formats import PRECISIONS, RESIZE_RULE

DETAILS = "export.json"


@dataclass
class ExportSummary:
    path: Path
    format: str
    bytes: int
    seconds: float
    details: dict[str, Any]


def export_run(run: str | Path, fmt: str, out: Path | None = None, quantize: bool = False,
               models: Path = Path("models"), data: Path | None = None, precision: str = "float32",
               check_images: int = agreement.DEFAULT_IMAGES, tta: str = "none",
               progress: bool = False) -> ExportSummary:
    if fmt not in FORMATS:
        raise PipelineError(f"unknown format {fmt!r}: choose from {', '.join(FORMATS)}")
    module = formats.of(fmt)
    if quantize and not module.QUANTIZE:
        raise PipelineError("--quantize applies to --format "
                            f"{' and '.join(name for name in FORMATS if formats.of(name).QUANTIZE)} only")
    if precision not in PRECISIONS:
        raise PipelineError(f"unknown --precision {precision!r}: float32 (any machine) or run (the run's own)")
    if isinstance(check_images, bool) or not isinstance(check_images, int) or check_images < 0:
        raise PipelineError(f"--check-images {check_images!r}: a whole number of images, 0 or more (0: not measured)")
    view_steps(tta)  # an unknown name is refused before any work
    if tta != "none" and quantize:
        raise PipelineError("--tta with --quantize: the views' fixed flips would be quantised with the weights "
                            "(int8 pixels); export the views in float32, or quantise without --tta")
    opened = Run.open(run, models, data=data)
    if not opened.keras_form:
        if not module.SCIKIT_LEARN_HEADS:
            raise PipelineError(f"{opened.name} has a scikit-learn head, which exports to --format onnx only "
                                "(converted by skl2onnx); keras, savedmodel and tflite hold Keras layers")
        if quantize or tta != "none":
            raise PipelineError(f"{opened.name} has a scikit-learn head: its ONNX export is float32 with one view "
                                "(no --quantize, no --tta)")
    run_precision = opened.precision
    if precision == "run" and run_precision != "fp32" and module.RUN_PRECISION is not None:
        raise PipelineError(f"--precision run: the run computed in {run_precision} and {module.RUN_PRECISION}; "
                            "export in float32 (the default: its agreement with predict is measured and recorded), "
                            "or choose --format keras or savedmodel")
    export_precision = "fp32" if precision == "float32" else run_precision
    run = opened.directory
    out = Path(out) if out is not None else run / "export"
    if out.resolve() == run.resolve():
        raise PipelineError(f"--out {out} is the run's own folder: exporting there would replace the run's files; "
                            f"choose another folder (default {run / 'export'})")
    outputs.check_output_folder(out, "--out", [("run", run), *_inputs_of(opened)])
    if hasattr(module, "required_modules"):  # before the folder is made: a missing extra leaves nothing behind
        for name in module.required_modules(opened.keras_form):
            require_module(name, f"--format {fmt}", fmt)
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PipelineError(atomic.os_error_message(error, "cannot export into")) from None
    atomic.remove_dead_temporaries(out)
    try:
        return _export_into(opened, fmt, out, quantize, precision, check_images, tta, run_precision,
                            export_precision, progress)
    except BaseException:
        if made:  # a folder this call made and left empty goes too
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _inputs_of(opened: Run) -> list[tuple[str, Path]]:
    """The caches and image folders a run was trained from, as its config records them."""
    records = [opened.config.get("features", {})]
    records += [part.get("features", {}) for part in opened.config.get("fusion", []) if isinstance(part, dict)]
    found = []
    for record in records:
        if isinstance(record, dict):
            found += [(name, Path(record[key])) for key, name in (("directory", "feature cache"),
                                                                  ("data", "image folder"))
                      if isinstance(record.get(key), str) and record[key]]
    return found


def _export_into(opened: Run, fmt: str, out: Path, quantize: bool, precision: str, check_images: int, tta: str,
                 run_precision: str, export_precision: str, progress: bool = False) -> ExportSummary:
    import sys

    class_names, fingerprint = opened.class_names, opened.fingerprint
    started = time.perf_counter()
    classifier = opened.classifier(export_precision)  # checks the model's outputs against labels.txt
    if progress:
        checked = (f"then checked against predict on up to {check_images} validation images"
                   if check_images else "not checked against predict (check_images 0)")
        print(f"export: building the {fmt} model ({'converted, ' if fmt in ('tflite', 'onnx') else ''}{checked})",
              file=sys.stderr, flush=True)
    size = fingerprint.image_size
    # the served model (pixels of any size in): with --tta, averaging the views in Keras' own
    # layers (pipeline/images/views.py); the SavedModel applies them as TensorFlow ops
    model = with_averaged_views(classifier, tta, size)
    module = formats.of(fmt)
    path, checks = module.save(formats.Job(opened, classifier, model, size, out, quantize, tta))
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    size_bytes = sum(f.stat().st_size for f in files if f.is_file())
    checks["agreement_with_predict"] = (
        agreement.measure(opened, module.loader(path, one_image_per_call=quantize and fmt == "tflite"), size,
                          limit=check_images,
                          reference=classifier if export_precision == run_precision else None, tta=tta,
                          progress=progress)
        if check_images
        else {"measured": False, "why": "--check-images 0"})
    seconds = time.perf_counter() - started
    details = _details(opened, fmt, path, quantize, size_bytes, checks, export_precision, run_precision, tta)
    if opened.thresholds is None:
        runs.write_labels(out, class_names)
    else:  # multi-label: each label with its decision threshold, tab-separated
        runs.write_labels(out, [f"{name}\t{t:.6g}" for name, t in zip(class_names, opened.thresholds)])
    details_path = out / DETAILS
    try:
        earlier = atomic.read_json(details_path) if details_path.is_file() else {}
    except (OSError, ValueError):
        earlier = {}
    # Formats exported earlier into this folder are listed beside the new one only where they are
    # of this run with these classes: another run's export is not this run's.
    same_run = isinstance(earlier, dict) and earlier.get("run") == details["run"] \
        and earlier.get("classes") == details["classes"]
    listed = earlier["formats"] if same_run and isinstance(earlier.get("formats"), dict) else {}
    listed[path.name] = details.pop("format_details")
    atomic.write_json(details_path, details | {"formats": listed})
    return ExportSummary(path, fmt, size_bytes, seconds, details | {"format": listed[path.name]})


def _details(opened: Run, fmt: str, path: Path, quantize: bool, size_bytes: int, checks: dict[str, Any],
             export_precision: str, run_precision: str, tta: str) -> dict[str, Any]:
    import sklearn

    run, config, class_names, fingerprint = opened.directory, opened.config, opened.class_names, opened.fingerprint
    metrics = opened.metrics
    size = fingerprint.image_size
    module = formats.of(fmt)
    inputs = module.describe_input(size)
    outputs = formats.attribute(module, "OUTPUT").format(classes=len(class_names))
    return {
        "run": str(Path(run).resolve()),
        "kind": config.get("kind"),
        "backbones": [part.fingerprint.backbone for part in opened.parts],  # several: fused features, one input
        "classes": class_names,
        "task": opened.task,  # classes (softmax), soft (softmax, trained on targets) or multilabel (sigmoids)
        **({"thresholds": dict(zip(class_names, opened.thresholds)),
            "decision": "multi-label: an image has every label whose probability is at or above its threshold "
                        "(chosen on validation); the outputs are one sigmoid probability a label"}
           if opened.thresholds is not None else {}),
        **({"threshold": opened.threshold,
            "decision": f"the image is {class_names[1]} where the probability of {class_names[1]} is at or above "
                        f"the threshold (train-head --threshold), else {class_names[0]}"}
           if opened.threshold is not None else {}),
        "labels_file": runs.LABELS_FILE,
        "image_size": size,
        "resize": RESIZE_RULE,
        "channels": "RGB",
        "preprocessing": " + ".join(part.fingerprint.preprocessing for part in opened.parts) + " (inside the model)",
        # every cache the head reads, in input order (one, or several for fused features)
        "parts": [{"fingerprint": part.fingerprint.as_dict(), "fingerprint_digest": part.record["fingerprint_digest"],
                   "view": part.view.as_dict()} for part in opened.parts],
        "accuracy": {split: metrics.get(split, {}).get("accuracy") for split in ("validation", "test")},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
                     "scikit-learn": sklearn.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "format_details": {
            "format": fmt,
            "file": path.name,
            "bytes": size_bytes,
            "input": inputs,
            "output": outputs,
            "test_time_views": {"views": tta, "count": len(view_steps(tta)),
                                "how": "none: one pass" if tta == "none" else
                                "the probabilities averaged over the views of the N x N image, inside the model "
                                + formats.attribute(module, "VIEWS_HOW")
                                + ", as predict --tta does; one backbone pass per view"},
            "precision": (module.QUANTIZED_PRECISION if quantize else "float32" if export_precision == "fp32" else
                          f"{export_precision}, as the run (Keras dtype policy {keras_policy(export_precision)})"),
            "run_precision": run_precision,
            "note": ("the run computed in float32" if run_precision == "fp32" else
                     f"computes in {export_precision}, as the run did" if export_precision == run_precision else
                     f"exported in float32 from a run that computed in {run_precision}: agreement_with_predict "
                     "says how far it is from predict"
                     + ("; --precision run computes as the run did" if module.RUN_PRECISION is None
                        else f"; {module.RUN_PRECISION}")),
        } | checks,
    }
