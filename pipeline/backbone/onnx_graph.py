"""Keras to ONNX, and ONNX Runtime sessions: what the int8 backbone (extract --precision int8) and
the ONNX export share. A TensorFlow function is frozen (variables and captured constants into the
graph) and converted by tf2onnx, the converter Keras' own ONNX export calls; the batch dimension
is named `batch`."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline import atomic
from pipeline.errors import PipelineError

OPSET = 17  # ONNX Runtime, OpenVINO and TensorRT all read it; tf2onnx's well-tested range


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def frozen_to_onnx(serve: Any, input_name: str, path: Path) -> None:
    """The tf.function `serve` (one input signature, its input named `input_name`) as an ONNX graph
    at `path`, written whole; its outputs keep the function's order."""
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    with quiet_loggers("tensorflow", "tf2onnx"):  # TF1-API deprecation notes from the conversion
        frozen = convert_variables_to_constants_v2(serve.get_concrete_function())
    with atomic.replacing(path, suffix=".onnx") as temporary, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), quiet_loggers("tensorflow", "tf2onnx"):
        tf2onnx.convert.from_graph_def(frozen.graph.as_graph_def(), input_names=[f"{input_name}:0"],
                                       output_names=[t.name for t in frozen.outputs], opset=OPSET,
                                       output_path=str(temporary))
        named_batch_dimension(temporary)


def named_batch_dimension(path: Path) -> None:
    """The graph's first (batch) dimension named `batch` on its inputs and outputs, where tf2onnx
    leaves a generated name (`unk__651`)."""
    import onnx

    try:
        graph = onnx.load(str(path))
    except Exception:  # noqa: BLE001 - a graph onnx cannot read is refused by the check after this, in one line
        return
    for value in (*graph.graph.input, *graph.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    onnx.save(graph, str(path))


def session(path: Path, threads: int | None = None, what: str = "the exported graph",
            after: str = "nothing was exported; report it with the run's backbone") -> Any:
    """An ONNX Runtime session on `path` (CPU; `threads` for its operators, default the
    runtime's); a graph the runtime refuses is one line."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - ONNX Runtime raises its own types (Fail, InvalidGraph, ...)
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise PipelineError(f"ONNX Runtime refuses {what} {path.name} ({first}): {after}") from None
