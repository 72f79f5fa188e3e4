"""--format onnx: a run as ONNX, for ONNX Runtime, OpenVINO, TensorRT or Triton: one graph from float32 RGB pixels
(0..255) of the model's N x N to class probabilities, converted by tf2onnx (the converter of
Keras' own ONNX export on the TensorFlow backend) from the frozen serving function. The graph
takes images already squashed to N x N by extract's rule, which ONNX cannot hold exactly for
every input size (its Resize has no area mode): docs/commands.md gives the rule in NumPy.

Checked at export: ONNX Runtime's probabilities against the run's own model (what `predict`
computes) on images of several sizes, refused in one line past 1e-4. `--quantize`: the graph
statically quantised (int8 weights per channel and uint8 activations, ranges calibrated on the
run's training images: pipeline/backbone/int8.py's format), its agreement with float32 and both
graphs' speed on the run's validation images measured, printed and recorded; refused past the
documented thresholds, or where int8 is not faster than float32 on this machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backbone.onnx_graph import (
    OPSET,
    frozen_to_onnx,
    session,
)
from pipeline.errors import PipelineError
from pipeline.serving.formats import RESIZE_RULE, Job

QUANTIZE = True
QUANTIZED_PRECISION = ("static int8 (ONNX Runtime QDQ: uint8 activations, int8 weights per channel; the head and the "
                       "pixel-reading convolutions in float), float32 input and output")
SCIKIT_LEARN_HEADS = True  # the estimator's own graph (skl2onnx) joined after the backbone's
RUN_PRECISION = ("ONNX Runtime's CPU kernels have no bfloat16 convolutions: the graph is float32 (or int8 with "
                 "--quantize)")
MODULES = ("onnx", "onnxruntime", "tf2onnx")  # what writing it needs (the `onnx` extra), checked before any work
TOLERANCE = 1e-4  # largest probability difference to the run's own model, float32
INT8_MAX_ACCURACY_DROP = 0.02  # int8 refused when validation accuracy falls by more than 2 points
# ... or when it agrees with float32 on fewer than 99% of the top classes (on ELPV an int8 model that
# agreed on 98.05% of the validation images agreed on 94% of the test images: bench/RESULTS.md)
INT8_MIN_AGREEMENT = 0.99
INT8_MIN_SPEEDUP = 1.0  # ... or when it is not faster than the float32 graph on this machine
# The backbone's convolutions only: quantising the head too (its standardisation and matrix product)
# took a VGG16 logistic-regression run on ELPV from 75.4% to 51.6% validation accuracy
QUANTISED_OPERATORS = ("Conv",)
CHECK_SHAPES = ((37, 61), (300, 200), (16, 16))  # larger, smaller and mixed against any N


def squash(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 (height, width, 3) -> float32 (1, size, size, 3), 0..255, by extract's rule (the
    TensorFlow-free resize of pipeline/images/decode_pillow.py; docs/commands.md gives the same in a
    few lines of NumPy). Not rounded: the resize's values are fractional, as predict's are."""
    from pipeline.images.decode_pillow import resize

    return resize(pixels, size)[None]


def write_onnx(resized: Any, size: int, path: Path, head: Any = None) -> dict[str, Any]:
    """The classifier (already without its resize) as ONNX at `path`; returns what export.json
    records of the graph. `head`: a head with no Keras form (the sklearn head), `resized` then
    ending at its feature vector: the head's own graph (`head.as_onnx`, skl2onnx) is joined after.

    Keras' own `Model.export(format="onnx")` (tf2onnx on the TensorFlow backend) leaves the
    constants of the Normalization layers (the backbone's and the head's standardisation) as
    graph inputs that a runtime would have to feed; so the serving function is frozen first
    (variables and captured constants into the graph) and converted by tf2onnx, the converter
    Keras calls, directly."""
    import onnx
    import tensorflow as tf

    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name="pixels"),)

    @tf.function(input_signature=spec)
    def serve(pixels: Any) -> Any:
        return tf.cast(resized(pixels, training=False), tf.float32)

    frozen_to_onnx(serve, "pixels", path)
    if head is not None:
        try:
            join_head(path, head)
        except BaseException:
            path.unlink(missing_ok=True)  # never a graph that stops at the feature vector
            raise
    try:
        graph = onnx.load(str(path))
        onnx.checker.check_model(graph)
    except Exception as error:  # noqa: BLE001 - onnx raises several types for a damaged graph
        path.unlink(missing_ok=True)
        raise PipelineError(f"the ONNX conversion wrote a damaged graph ({str(error).splitlines()[0][:200]}): "
                            "nothing was exported") from None
    return {"opset": {entry.domain or "ai.onnx": int(entry.version) for entry in graph.opset_import},
            "input": graph.graph.input[0].name, "output": graph.graph.output[0].name,
            "producer": f"{graph.producer_name} {graph.producer_version}",
            "made_by": "the frozen serving function converted by tf2onnx (Keras' own export leaves the "
                       "Normalization layers' constants as graph inputs)"
                       + ("" if head is None else f"; the head, {type(head.model_).__name__}, converted by "
                          "skl2onnx and joined after the feature vector (onnx.compose.merge_models)")}


def join_head(path: Path, head: Any) -> None:
    """The graph at `path` (pixels to feature vectors) followed by the head's graph (feature
    vectors to `probabilities`), as one graph written back to `path`."""
    import onnx
    from onnx import compose

    features = onnx.load(str(path))
    estimator = compose.add_prefix(head.as_onnx(OPSET), "head_", rename_outputs=False)
    estimator.ir_version = features.ir_version
    versions: dict[str, int] = {}  # one version per domain, the higher (tf2onnx names ai.onnx.ml too)
    for entry in (*features.opset_import, *estimator.opset_import):
        versions[entry.domain] = max(versions.get(entry.domain, 0), int(entry.version))
    for graph in (features, estimator):
        del graph.opset_import[:]
        graph.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in versions.items())
    joined = compose.merge_models(features, estimator, io_map=[(features.graph.output[0].name, "head_features")],
                                  outputs=["probabilities"])
    onnx.save(joined, str(path))


def run_session(runtime: Any, pixels: np.ndarray) -> np.ndarray:
    name = runtime.get_inputs()[0].name
    return np.asarray(runtime.run(None, {name: pixels})[0], np.float64)


def check_onnx(path: Path, model: Any, size: int) -> float:
    """Largest probability difference between ONNX Runtime (images squashed by the NumPy rule) and
    the run's own model (images of any size, resized inside as extract does); refused past
    TOLERANCE."""
    runtime = session(path)
    rng = np.random.default_rng(0)
    largest = 0.0
    for height, width in (*CHECK_SHAPES, (size, size)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        squashed = squash(image, size)
        expected = np.asarray(model(image[None].astype(np.float32), training=False), np.float64)
        largest = max(largest, float(np.abs(run_session(runtime, squashed) - expected).max()))
    if largest > TOLERANCE:
        path.unlink(missing_ok=True)
        raise PipelineError(f"the ONNX export disagrees with the run's model by {largest:.2e} in probability (more "
                            f"than {TOLERANCE:g}): nothing was exported; report it with the run's backbone")
    return largest


def quantize_int8(source: Path, target: Path, training_files: list[str], size: int) -> dict[str, Any]:
    """`source` statically quantised into `target` (QDQ, uint8 activations and int8 weights per channel:
    pipeline/backbone/int8.py's format), its activation ranges calibrated on up to
    CALIBRATION_IMAGES of the run's training images (evenly spaced), squashed as predict does."""
    from PIL import Image

    from pipeline.backbone.int8 import CALIBRATION_IMAGES, MIN_CALIBRATION, quantise

    if len(training_files) < MIN_CALIBRATION:
        raise PipelineError(f"--quantize calibrates on the run's training images and it has {len(training_files)}: "
                            f"it needs at least {MIN_CALIBRATION}")
    step = max(1, len(training_files) // CALIBRATION_IMAGES)
    chosen = training_files[::step][:CALIBRATION_IMAGES]

    def batches() -> Any:
        for start in range(0, len(chosen), 16):
            pixels = []
            for file in chosen[start:start + 16]:
                try:
                    with Image.open(file) as image:
                        pixels.append(squash(np.asarray(image.convert("RGB")), size)[0])
                except (OSError, ValueError):
                    continue  # a training image gone since: calibrated on the others
            if pixels:
                yield np.stack(pixels)

    used = quantise(source, target, batches(), operators=QUANTISED_OPERATORS)
    return {"method": "static: QDQ, uint8 activations and int8 weights per channel (U8S8), moving-average min-max "
                      "ranges; the "
                      "convolutions only (the head and the pixel-reading convolutions in float)",
            "calibration_images": used, "calibrated_on": "the run's training images, evenly spaced"}


def int8_agreement(fp32: Path, int8: Path, images: Any, labels: np.ndarray, size: int,
                   limit: int = 256) -> dict[str, Any]:
    """int8 against float32 on up to `limit` validation images (batches of 16: static ranges do
    not depend on the batch): both accuracies, top-class agreement, the largest probability
    difference, and both graphs' images/s on this machine; refused past the thresholds, or where
    int8 is not faster than float32 here (INT8_MIN_SPEEDUP)."""
    from PIL import Image

    chosen = np.arange(len(labels))[:limit]
    if not len(chosen):
        raise PipelineError("--quantize measures int8 against float32 on the run's validation images, and it has none")
    full, small = session(fp32), session(int8)
    pixels = []
    for i in chosen:
        with Image.open(images[i]) as image:
            pixels.append(squash(np.asarray(image.convert("RGB")), size)[0])
    pixels = np.stack(pixels).astype(np.float32)
    seconds = {"float32": 0.0, "int8": 0.0}
    outputs: dict[str, list[np.ndarray]] = {"float32": [], "int8": []}
    run_session(full, pixels[:16])  # warm-up: each session plans its kernels on the first call
    run_session(small, pixels[:16])
    for start in range(0, len(pixels), 16):
        batch = pixels[start:start + 16]
        for name, runtime in (("float32", full), ("int8", small)):
            started = time.perf_counter()
            outputs[name].append(run_session(runtime, batch))
            seconds[name] += time.perf_counter() - started
    p32, p8, truth = np.concatenate(outputs["float32"]), np.concatenate(outputs["int8"]), labels[chosen]
    rates = {name: round(len(pixels) / max(value, 1e-9), 2) for name, value in seconds.items()}
    found = {"images": len(chosen), "accuracy_float32": float(np.mean(p32.argmax(1) == truth)),
             "accuracy_int8": float(np.mean(p8.argmax(1) == truth)),
             "top_class_agreement": float(np.mean(p32.argmax(1) == p8.argmax(1))),
             "largest_probability_difference": float(np.abs(p32 - p8).max()),
             "images_per_second": rates, "speedup": round(rates["int8"] / max(rates["float32"], 1e-9), 2),
             "measured": "batches of 16 validation images, ONNX Runtime on this machine's CPU, after one warm-up call",
             "thresholds": {"accuracy_drop_at_most": INT8_MAX_ACCURACY_DROP,
                            "agreement_at_least": INT8_MIN_AGREEMENT, "speedup_at_least": INT8_MIN_SPEEDUP}}
    drop = found["accuracy_float32"] - found["accuracy_int8"]
    if drop > INT8_MAX_ACCURACY_DROP or found["top_class_agreement"] < INT8_MIN_AGREEMENT:
        int8.unlink(missing_ok=True)
        raise PipelineError(f"int8 loses too much on the validation images: accuracy {found['accuracy_float32']:.2%} "
                            f"-> {found['accuracy_int8']:.2%}, top class agreeing on "
                            f"{found['top_class_agreement']:.1%}: not exported (export float32 instead)")
    if found["speedup"] < INT8_MIN_SPEEDUP:
        int8.unlink(missing_ok=True)
        raise PipelineError(f"int8 is not faster than float32 on this machine ({rates['int8']} against "
                            f"{rates['float32']} images/s on the validation images): not exported (export float32 "
                            "instead; int8 pays on CPUs with VNNI or AMX)")
    return found


def describe_input(size: int) -> str:
    return (f"float32 RGB pixels 0..255, shape (batch, {size}, {size}, 3), already {RESIZE_RULE} with N = {size} "
            "(ONNX's Resize has no area mode; docs/commands.md gives the rule in NumPy)")


def required_modules(keras_form: bool) -> tuple[str, ...]:
    """The modules writing the graph needs: a head with no Keras form is converted by skl2onnx too."""
    return MODULES + (() if keras_form else ("skl2onnx",))


def save(job: Job) -> tuple[Path, dict[str, Any]]:
    """model.onnx (float32), checked against the run's own model; with --quantize, model-int8.onnx
    beside it, measured against float32 on the run's validation images. A head with no Keras form:
    its own ONNX graph (Head.as_onnx) joined after the backbone's (pixels to features)."""
    from pipeline.runs import classifier

    head = None if job.run.keras_form else job.classifier.head
    if head is None:
        model, resized = job.served, classifier.from_squashed(job.classifier, job.tta, job.size)
    else:
        model, resized = job.classifier, classifier.without_resize(job.classifier.features)
    path, int8 = job.out / "model.onnx", job.out / "model-int8.onnx"
    written = []
    try:
        graph = write_onnx(resized, job.size, path, head)
        written.append(path)
        checks: dict[str, Any] = {"onnx": graph, "largest_difference_to_predict": check_onnx(path, model, job.size)}
        if job.quantize:
            written.append(int8)
            calibration = quantize_int8(path, int8, job.run.split_images("train").files, job.size)
            validation = job.run.split_images("validation")
            checks["int8"] = int8_agreement(path, int8, validation.files, validation.labels, job.size) | {
                "calibration": calibration}
            path = int8
    except BaseException:  # nothing of a failed export is left in --out without its export.json
        for each in written:
            each.unlink(missing_ok=True)
        raise
    return path, checks


def loader(path: Path, one_image_per_call: bool = False) -> Any:
    """(pixels N x N, their files) -> probabilities by ONNX Runtime; the static int8 graph takes
    batches (its ranges are fixed at calibration)."""
    runtime = session(path)
    if one_image_per_call:
        return lambda pixels, files: np.concatenate([run_session(runtime, image[None]) for image in pixels])
    return lambda pixels, files: run_session(runtime, pixels)
