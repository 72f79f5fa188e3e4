"""Trusting saved artefacts: a file's checksum, sidecar records of checksums, and loading what a
run or a weights folder holds without ever running code from it.

- `file_sha256`: the one definition of a file's hash (images, weights, run files);
- `checked_file`: a file that must exist and match the checksum recorded for it;
- `read_json_object`: a JSON file that must hold an object, or one line naming it;
- `load_arrays`: an .npz of plain numeric arrays (never a pickle);
- `load_keras_model`: a .keras file in Keras' safe mode (a Lambda layer is refused, not run).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import one_line, read_json
from pipeline.errors import PipelineError


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def checked_file(path: Path, recorded_sha256: str | None, record: str, way_out: str) -> Path:
    """`path`, which must exist and, where a checksum was recorded (in `record`), match it."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} is missing: {way_out}")
    if recorded_sha256 is not None and file_sha256(path) != recorded_sha256:
        raise PipelineError(f"{path} does not match the checksum in {record} (damaged?): {way_out}")
    return path


def read_json_object(path: Path, way_out: str, missing: str | None = None) -> dict[str, Any]:
    """A JSON file holding an object; one line naming the file when it is missing or is not one."""
    path = Path(path)
    try:
        value = read_json(path)
    except FileNotFoundError:
        raise PipelineError(missing or f"{path} is missing: {way_out}") from None
    except (OSError, ValueError) as error:
        raise PipelineError(f"{path} is damaged ({one_line(error)}): {way_out}") from None
    if not isinstance(value, dict):
        raise PipelineError(f"{path} is damaged (not a JSON object): {way_out}")
    return value


def load_arrays(path: Path, names: Sequence[str], way_out: str) -> dict[str, np.ndarray]:
    """The named arrays of an .npz file, read with allow_pickle=False: plain numbers only."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in names}
    except (OSError, ValueError, KeyError) as error:
        raise PipelineError(f"{path} is damaged ({one_line(error)}): {way_out}") from None


def load_keras_model(path: Path, way_out: str) -> Any:
    """A .keras file in Keras' safe mode: a Lambda layer or any other serialised Python code is
    refused, not run. Every failure is one line naming the file."""
    import keras

    import pipeline.keras_layers  # noqa: F401 - registers this package's one layer (an exported kNN head)

    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises ValueError, TypeError, OSError, zipfile errors...
        reason = one_line(error)
        if "safe_mode" in reason or "Lambda" in reason:
            reason = "it holds Python code (a Lambda layer or a custom function), which is never run here"
        raise PipelineError(f"cannot load {path}: {reason[:300]}: {way_out}") from None
