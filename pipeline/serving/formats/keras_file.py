"""--format keras: a `.keras` file built from Keras' own layers only, so `keras.models.load_model(path)`
opens it in a Python that has never seen this package. Pixels 0..255 (RGB, uint8 or float) of any
size in, probabilities out; resized inside exactly as extract does (area when both sides shrink,
bilinear otherwise: images/keras_resize.py), normalised inside. The model keeps the
run's dtype policies, so `--precision run` computes as the run did."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic
from pipeline.serving.formats import RESIZE_RULE, Job

FILE = "model.keras"
QUANTIZE = False
SCIKIT_LEARN_HEADS = False
RUN_PRECISION = None  # Keras restores the run's dtype policies on load


def describe_input(size: int) -> str:
    return (f"float32 or uint8 RGB pixels 0..255, shape (batch, height, width, 3), any size; {RESIZE_RULE} with "
            f"N = {size} inside the model (as extract does)")


def save(job: Job) -> tuple[Path, dict[str, Any]]:
    path = job.out / FILE
    with atomic.replacing(path, suffix=".keras") as temporary:
        job.served.save(temporary)
    return path, {}


def loader(path: Path, one_image_per_call: bool = False) -> Callable[[np.ndarray, list[str]], np.ndarray]:
    """(pixels N x N, their files) -> probabilities, from the file as written (the model's own resize is
    the identity at N x N)."""
    from pipeline.artefacts import load_keras_model

    model = load_keras_model(path, "export again")
    return lambda pixels, files: model.predict_on_batch(pixels)
