"""--format tflite: a TFLite flat buffer taking (1, N, N, 3) float32 pixels 0..255 already resized
to the model's size (the resize is the app's, by the rule in export.json); float32, or
dynamic-range quantised with --quantize. Checked with the TFLite interpreter against the Keras
model as it is written. A quantised model is fed one image a call (dynamic-range quantisation
computes its scales per call)."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from pipeline import atomic
from pipeline.runs import classifier
from pipeline.serving.formats import RESIZE_RULE, Job

QUANTIZE = True
QUANTIZED_PRECISION = "float32 weights, dynamic-range int8 quantised"
SCIKIT_LEARN_HEADS = False
RUN_PRECISION = "TFLite has no bfloat16 arithmetic: its kernels are float32 (or int8 with --quantize)"


def describe_input(size: int) -> str:
    return f"float32 RGB pixels 0..255, shape (1, {size}, {size}, 3), already {RESIZE_RULE} with N = {size}"


def convert(resized: Any, quantize: bool) -> bytes:
    """The flat buffer of the classifier from N x N pixels."""
    converter = tf.lite.TFLiteConverter.from_keras_model(resized)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # dynamic-range: int8 weights, float compute
    with contextlib.redirect_stdout(io.StringIO()):
        return converter.convert()


def interpreter(flat: bytes) -> Any:
    """TensorFlow's TFLite interpreter (deprecated in favour of ai_edge_litert, still in TF 2.21)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = tf.lite.Interpreter(model_content=flat)
    found.allocate_tensors()
    return found


def check(flat: bytes, model: Any, image_size: int, images: int = 4) -> float:
    """Largest probability difference between the flat buffer and the Keras model on random images."""
    running = interpreter(flat)
    given, taken = running.get_input_details()[0], running.get_output_details()[0]
    pixels = np.random.default_rng(0).uniform(0, 255, (images, image_size, image_size, 3)).astype(np.float32)
    largest = 0.0
    for image in pixels:
        running.set_tensor(given["index"], image[None])
        running.invoke()
        got = running.get_tensor(taken["index"])
        expected = np.asarray(model(image[None], training=False))
        largest = max(largest, float(np.abs(got - expected).max()))
    return largest


def save(job: Job) -> tuple[Path, dict[str, Any]]:
    path = job.out / ("model-quantized.tflite" if job.quantize else "model.tflite")
    flat = convert(classifier.from_squashed(job.classifier, job.tta, job.size), job.quantize)
    with atomic.replacing(path) as temporary:
        temporary.write_bytes(flat)
    return path, {"largest_difference_to_keras_float32": check(flat, job.served, job.size)}


def loader(path: Path, one_image_per_call: bool = False) -> Callable[[np.ndarray, list[str]], np.ndarray]:
    """Always one image a call: the flat buffer's input is (1, N, N, 3)."""
    running = interpreter(path.read_bytes())
    given, taken = running.get_input_details()[0], running.get_output_details()[0]

    def one_by_one(pixels: np.ndarray, files: list[str]) -> np.ndarray:
        rows = []
        for image in pixels:
            running.set_tensor(given["index"], image[None])
            running.invoke()
            rows.append(running.get_tensor(taken["index"])[0].copy())
        return np.stack(rows)

    return one_by_one
