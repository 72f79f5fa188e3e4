"""One module per export format, as Keras keeps keras/src/export/: each says how a run is written in
it (`save`), how the written file is loaded back for the agreement check (`loader`: pixels and
files in, probabilities out), what it takes (`describe_input`) and gives (OUTPUT), whether it can
be quantised (QUANTIZE, with QUANTIZED_PRECISION saying how) or hold a head with no Keras form
(SCIKIT_LEARN_HEADS), and why it cannot compute in a run's bf16 (RUN_PRECISION; None where it
can). pipeline/serving/export.py chooses the module by name and does the rest once for all of
them (the folder, the agreement check, labels.txt, export.json): a fifth format is a fifth module
and a line in MODULES.

This file imports no TensorFlow: the command line takes NAMES for --format's choices.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

MODULES = {"keras": "keras_file", "savedmodel": "saved_model", "tflite": "tflite", "onnx": "onnx"}
NAMES = tuple(MODULES)
PRECISIONS = ("float32", "run")  # --precision: float32 runs anywhere; run: the run's own (bf16), where a format can
RESIZE_RULE = "squashed to N x N: area interpolation when both sides shrink, bilinear otherwise"
OUTPUT = "probabilities (batch, {classes}) float32, in the order of labels.txt"  # unless a format says otherwise
VIEWS_HOW = "(transposes and flips in Keras' own layers)"  # unless a format says otherwise


@dataclass(frozen=True)
class Job:
    """What a format's `save` is given: the opened run (pipeline.runs.Run), its model (pixels of any
    size to probabilities, at the export's precision), that model with the test-time views of
    `tta` averaged inside (`served`), the run's image size, the folder, and --quantize."""

    run: Any
    classifier: Any
    served: Any
    size: int
    out: Path
    quantize: bool
    tta: str


def of(name: str) -> ModuleType:
    """The module of format `name` (one of NAMES; export_run refuses others first)."""
    return importlib.import_module(f"pipeline.serving.formats.{MODULES[name]}")


def attribute(module: ModuleType, name: str) -> Any:
    """A format's attribute, or the default above where the format has none of its own."""
    return getattr(module, name, globals().get(name))
