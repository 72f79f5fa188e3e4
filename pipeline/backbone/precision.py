"""Numeric precision of the backbone: what the hardware offers and the Keras dtype policy for it.
Imports no Keras until a policy is set: the command line's choices read PRECISIONS."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline import backend
from pipeline.errors import PipelineError

PRECISIONS = ("fp32", "bf16", "mixed", "int8")  # int8: extract only, by ONNX Runtime (int8.py)
TRAINING_PRECISIONS = ("fp32", "mixed-bf16", "mixed-fp16")  # what finetune trains in (--precision)


def gpu_available() -> bool:
    """Whether the backend Keras runs on sees a GPU."""
    return backend.gpu_available()


def cpu_has_bf16() -> bool:
    """True where the CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


GpuAnswer = bool | Callable[[], bool] | None  # where the backbone runs: said, asked when it matters, or this process


def _on_gpu(gpu: GpuAnswer) -> bool:
    return gpu_available() if gpu is None else gpu() if callable(gpu) else gpu


def default_precision(gpu: GpuAnswer = None) -> str:
    """The fastest choice that keeps features usable: mixed float16 on a GPU, bfloat16 on a CPU
    with bf16 hardware (about 7x faster than float32 for VGG16 on AMX), float32 otherwise.
    `gpu`: whether the backbone runs on GPUs (default: whether this process sees one)."""
    if _on_gpu(gpu):
        return "mixed"
    if cpu_has_bf16():
        return "bf16"
    return "fp32"


def resolve_precision(requested: str | None, gpu: GpuAnswer = None) -> str:
    """Turn the user's choice into the name recorded in the fingerprint.

    `mixed` means float16 compute on a GPU and bfloat16 compute on a CPU (float32 weights in both),
    so it resolves to `mixed-fp16` or `mixed-bf16`: the two give different features. `gpu` says
    where the backbone runs when that is not this process (the Ray engine's actors); a function
    is asked only where the answer decides (the default and `mixed`): asking a Ray cluster starts it.
    """
    precision = requested or default_precision(gpu)
    if precision not in PRECISIONS:
        raise PipelineError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "mixed":
        return "mixed-fp16" if _on_gpu(gpu) else "mixed-bf16"
    return precision


_POLICIES = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "mixed-fp16": "mixed_float16",
    "mixed-bf16": "mixed_bfloat16",
    "int8": "float32",  # the float model an int8 cache's quantised backbone came from (predict, export, finetune)
}


def keras_policy(precision: str) -> str:
    return _POLICIES[precision]


@contextlib.contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
    """Build layers under the policy of `precision`, restoring the global policy afterwards."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(keras_policy(precision))
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
