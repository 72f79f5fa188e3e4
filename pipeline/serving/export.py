"""Ship a run: export it as a model that needs only TensorFlow.

- `keras`: a `.keras` file built from Keras' own layers only, so `keras.models.load_model(path)`
  opens it in a Python that has never seen this package. Pixels 0..255 (RGB, uint8 or float) of
  any size in, probabilities out; resized inside exactly as extract does (area when both sides
  shrink, bilinear otherwise: classifier.resize_like_extract_layers), normalised inside.
- `savedmodel`: a TF SavedModel for TF Serving. `serving_default` takes a batch of encoded images
  (JPEG, PNG, BMP, GIF bytes) and returns `probabilities`, the top `class` and the `class_names`;
  `pixels` takes a uint8 batch. Both decode and resize exactly as extract does (area when an
  image shrinks, bilinear when it grows), inside the graph.
- `tflite`: a TFLite flat buffer taking (1, N, N, 3) float32 pixels 0..255 already resized to the
  model's size (the resize is the app's, by the rule in export.json); float32, or dynamic-range
  quantised with `quantize`. Checked with the TFLite interpreter against the Keras model.

Runs trained or extracted in bf16/mixed precision are exported in float32 by default (their
weights are float32 already), so they run anywhere; `precision="run"` keeps the run's precision in
the formats that can compute in it (keras, savedmodel: pipeline/serving/agreement.py says why the
others cannot). Every export is loaded back and measured against `predict` with the run on the
run's validation images (agreement.py); beside it: `labels.txt` and `export.json` (classes, input
contract, fingerprint, versions, the run's accuracy, that agreement, the checks made).
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
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
from pipeline.serving import agreement

FORMATS = ("keras", "savedmodel", "tflite", "onnx")
DETAILS = "export.json"
PRECISIONS = ("float32", "run")
RESIZE_RULE = "squashed to N x N: area interpolation when both sides shrink, bilinear otherwise"


@dataclass
class ExportSummary:
    path: Path
    format: str
    bytes: int
    seconds: float
    details: dict[str, Any]


def from_squashed(classifier: keras.Model, tta: str, size: int) -> keras.Model:
    """The classifier from N x N pixels already squashed (the form TFLite and ONNX take), with
    `tta`'s views averaged inside."""
    return with_averaged_views(without_resize(classifier), tta, size, resize=False)


def without_resize(model: keras.Model) -> keras.Model:
    """The classifier from images already at its size: the part after its resize."""
    normalise = next(layer for layer in model.layers if layer.name.startswith("normalise_"))
    return keras.Model(normalise.input, model.output, name="classifier_resized_input")


def export_run(run: str | Path, fmt: str, out: Path | None = None, quantize: bool = False,
               models: Path = Path("models"), data: Path | None = None, precision: str = "float32",
               check_images: int = agreement.DEFAULT_IMAGES, tta: str = "none",
               progress: bool = False) -> ExportSummary:
    if fmt not in FORMATS:
        raise PipelineError(f"unknown format {fmt!r}: choose from {', '.join(FORMATS)}")
    if quantize and fmt not in ("tflite", "onnx"):
        raise PipelineError("--quantize applies to --format tflite and onnx only")
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
        if fmt != "onnx":
            raise PipelineError(f"{opened.name} has a scikit-learn head, which exports to --format onnx only "
                                "(converted by skl2onnx); keras, savedmodel and tflite hold Keras layers")
        if quantize or tta != "none":
            raise PipelineError(f"{opened.name} has a scikit-learn head: its ONNX export is float32 with one view "
                                "(no --quantize, no --tta)")
    run_precision = run_precision_of(opened)
    agreement.check_precision(fmt, precision, run_precision)
    export_precision = "fp32" if precision == "float32" else run_precision
    run = opened.directory
    out = Path(out) if out is not None else run / "export"
    if out.resolve() == run.resolve():
        raise PipelineError(f"--out {out} is the run's own folder: exporting there would replace the run's files; "
                            f"choose another folder (default {run / 'export'})")
    outputs.check_output_folder(out, "--out", [("run", run), *_inputs_of(opened)])
    if fmt == "onnx":  # before the folder is made: a missing extra leaves nothing behind
        for module in ("onnx", "onnxruntime", "tf2onnx") + (() if opened.keras_form else ("skl2onnx",)):
            require_module(module, "--format onnx", "onnx")
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
    if fmt == "keras":
        path = out / "model.keras"
        with atomic.replacing(path, suffix=".keras") as temporary:
            model.save(temporary)
        checks = {}
    elif fmt == "savedmodel":
        path = out / "saved_model"
        _save_savedmodel(classifier, class_names, size, path, tta)
        checks = {}
    elif fmt == "onnx" and not opened.keras_form:  # the backbone's graph and the estimator's, joined
        path, checks = _onnx(opened, classifier, without_resize(classifier.features), size, out, False,
                             head=classifier.head)
    elif fmt == "onnx":
        path, checks = _onnx(opened, model, from_squashed(classifier, tta, size), size, out, quantize)
    else:
        path = out / ("model-quantized.tflite" if quantize else "model.tflite")
        flat = _tflite(from_squashed(classifier, tta, size), quantize)
        with atomic.replacing(path) as temporary:
            temporary.write_bytes(flat)
        checks = {"largest_difference_to_keras_float32": check_tflite(flat, model, size)}
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    size_bytes = sum(f.stat().st_size for f in files if f.is_file())
    checks["agreement_with_predict"] = (
        agreement.measure(opened, fmt, path, size, one_image_per_call=quantize and fmt == "tflite", limit=check_images,
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
    formats = earlier["formats"] if same_run and isinstance(earlier.get("formats"), dict) else {}
    formats[path.name] = details.pop("format_details")
    atomic.write_json(details_path, details | {"formats": formats})
    return ExportSummary(path, fmt, size_bytes, seconds, details | {"format": formats[path.name]})


def run_precision_of(opened: Run) -> str:
    """The precision the run computed in: its fine-tuning's, else its features'."""
    return opened.config.get("finetune", {}).get("precision") or opened.fingerprint.precision


def _details(opened: Run, fmt: str, path: Path, quantize: bool, size_bytes: int, checks: dict[str, Any],
             export_precision: str, run_precision: str, tta: str) -> dict[str, Any]:
    import sklearn

    run, config, class_names, fingerprint = opened.directory, opened.config, opened.class_names, opened.fingerprint
    metrics = opened.metrics
    size = fingerprint.image_size
    inputs = {
        "keras": f"float32 or uint8 RGB pixels 0..255, shape (batch, height, width, 3), any size; {RESIZE_RULE} "
                 f"with N = {size} inside the model (as extract does)",
        "savedmodel": "serving_default: a batch of encoded images (JPEG, PNG, BMP, GIF bytes; key 'images'); "
                      "pixels: uint8 RGB (batch, height, width, 3) (key 'pixels'). Decoded (grayscale and RGBA "
                      f"become RGB, first GIF frame) and {RESIZE_RULE} with N = {size}, inside the graph",
        "tflite": f"float32 RGB pixels 0..255, shape (1, {size}, {size}, 3), already {RESIZE_RULE} with N = {size}",
        "onnx": f"float32 RGB pixels 0..255, shape (batch, {size}, {size}, 3), already {RESIZE_RULE} with N = {size} "
                "(ONNX's Resize has no area mode; docs/commands.md gives the rule in NumPy)",
    }[fmt]
    outputs = {
        "savedmodel": "probabilities (batch, classes) float32; class (batch,) string, the most likely; "
                      "class_names (batch, classes) string, in the order of the probabilities",
    }.get(fmt, f"probabilities (batch, {len(class_names)}) float32, in the order of labels.txt")
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
                                + ("(transposes and flips as TensorFlow ops)" if fmt == "savedmodel" else
                                   "(transposes and flips in Keras' own layers)")
                                + ", as predict --tta does; one backbone pass per view"},
            "precision": ("float32 weights, dynamic-range int8 quantised" if quantize and fmt == "tflite" else
                          "static int8 (ONNX Runtime QDQ: uint8 activations, int8 weights per channel; the head "
                          "and the pixel-reading convolutions in float), float32 input and output"
                          if quantize else "float32" if export_precision == "fp32" else
                          f"{export_precision}, as the run (Keras dtype policy {keras_policy(export_precision)})"),
            "run_precision": run_precision,
            "note": ("the run computed in float32" if run_precision == "fp32" else
                     f"computes in {export_precision}, as the run did" if export_precision == run_precision else
                     f"exported in float32 from a run that computed in {run_precision}: agreement_with_predict "
                     "says how far it is from predict"
                     + ("; --precision run computes as the run did" if agreement.RUN_PRECISION[fmt] is None
                        else f"; {agreement.RUN_PRECISION[fmt]}")),
        } | checks,
    }


def _onnx(opened: Run, model: Any, resized: keras.Model, size: int, out: Path,
          quantize: bool, head: Any = None) -> tuple[Path, dict[str, Any]]:
    """model.onnx (float32), checked against the run's own model; with `quantize`, model-int8.onnx
    beside it, measured against float32 on the run's validation images. `head`: a head with no
    Keras form, whose own ONNX graph (Head.as_onnx) is joined after `resized` (pixels to features)."""
    from pipeline.serving import onnx_export

    path, int8 = out / "model.onnx", out / "model-int8.onnx"
    written = []
    try:
        graph = onnx_export.write_onnx(resized, size, path, head)
        written.append(path)
        checks: dict[str, Any] = {"onnx": graph,
                                  "largest_difference_to_predict": onnx_export.check_onnx(path, model, size)}
        if quantize:
            written.append(int8)
            calibration = onnx_export.quantize_int8(path, int8, run_images(opened, "train").files, size)
            validation = run_images(opened, "validation")
            checks["int8"] = onnx_export.int8_agreement(path, int8, validation.files, validation.labels, size) | {
                "calibration": calibration}
            path = int8
    except BaseException:  # nothing of a failed export is left in --out without its export.json
        for each in written:
            each.unlink(missing_ok=True)
        raise
    return path, checks


def run_images(opened: Run, split: str = "validation") -> Any:
    """The run's images of `split` (files and labels): validation measures an export, train
    calibrates an int8 one."""
    from pipeline.cache.reader import split_images

    store = opened.features() if not opened.fused else opened.fused_features()[0]
    return split_images(store)[split]


def validation_images(opened: Run) -> Any:
    """The run's validation images (the name of earlier releases)."""
    return run_images(opened, "validation")


# --- SavedModel ------------------------------------------------------------------------------------


class _Serving(tf.Module):
    def __init__(self, model: keras.Model, class_names: list[str], image_size: int, tta: str = "none") -> None:
        super().__init__()
        self.model = model
        self.class_names = tf.constant(class_names)
        self.image_size = image_size
        self.tta = tta

    def _outputs(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        # the test-time views as TensorFlow ops on the N x N batch, in views.py's order (a Keras
        # model nesting the classifier would leave its Dropout's seed state unreachable here)
        views = tf_views(self.tta)
        probabilities = tf.add_n([tf.cast(self.model(view(images), training=False), tf.float32)
                                  for view in views]) / len(views)
        batch = tf.shape(probabilities)[0]
        return {
            "probabilities": probabilities,
            "class": tf.gather(self.class_names, tf.argmax(probabilities, axis=1)),
            "class_names": tf.tile(self.class_names[None], [batch, 1]),
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def from_encoded(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        from pipeline.images.decode_tf import decode_bytes_and_resize

        size = self.image_size
        pixels = tf.map_fn(lambda data: decode_bytes_and_resize(data, size), images,
                           fn_output_signature=tf.TensorSpec((size, size, 3), tf.float32))
        return self._outputs(pixels)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="pixels")])
    def from_pixels(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        from pipeline.images.decode_tf import resize_like_extract

        return self._outputs(resize_like_extract(pixels, self.image_size))


def tf_views(tta: str) -> list[Any]:
    """The views of `tta` (views.view_steps) as TensorFlow ops on (batch, N, N, channels) tensors."""
    views = []
    for transpose, horizontal, vertical in view_steps(tta):
        def view(x: tf.Tensor, t: bool = transpose, h: bool = horizontal, v: bool = vertical) -> tf.Tensor:
            x = tf.transpose(x, (0, 2, 1, 3)) if t else x
            x = tf.reverse(x, [2]) if h else x
            return tf.reverse(x, [1]) if v else x
        views.append(view)
    return views


def _save_savedmodel(model: keras.Model, class_names: list[str], image_size: int, path: Path,
                     tta: str = "none") -> None:
    """tf.saved_model.save into a staging folder, renamed into place when complete."""
    serving = _Serving(model, class_names, image_size, tta)
    with atomic.replacing_directory(path) as staging, contextlib.redirect_stdout(io.StringIO()):
        try:
            tf.saved_model.save(serving, str(staging), signatures={
                "serving_default": serving.from_encoded.get_concrete_function(),
                "pixels": serving.from_pixels.get_concrete_function(),
            })
        except tf.errors.OpError as error:  # a full disk, a quota: TensorFlow's error, not an OSError
            raise PipelineError(f"could not write the SavedModel {path}: {atomic.one_line(error.message)[:300]}; "
                                "nothing half-written was left (free some space, or export elsewhere)") from None


# --- TFLite ----------------------------------------------------------------------------------------


def _tflite(resized: keras.Model, quantize: bool) -> bytes:
    """The flat buffer of the classifier from N x N pixels."""
    converter = tf.lite.TFLiteConverter.from_keras_model(resized)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # dynamic-range: int8 weights, float compute
    with contextlib.redirect_stdout(io.StringIO()):
        return converter.convert()


def tflite_interpreter(flat: bytes) -> Any:
    """TensorFlow's TFLite interpreter (deprecated in favour of ai_edge_litert, still in TF 2.21)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_content=flat)
    interpreter.allocate_tensors()
    return interpreter


def check_tflite(flat: bytes, model: keras.Model, image_size: int, images: int = 4) -> float:
    """Largest probability difference between the flat buffer and the Keras model on random images."""
    interpreter = tflite_interpreter(flat)
    given, taken = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    pixels = np.random.default_rng(0).uniform(0, 255, (images, image_size, image_size, 3)).astype(np.float32)
    largest = 0.0
    for image in pixels:
        interpreter.set_tensor(given["index"], image[None])
        interpreter.invoke()
        got = interpreter.get_tensor(taken["index"])
        expected = np.asarray(model(image[None], training=False))
        largest = max(largest, float(np.abs(got - expected).max()))
    return largest
