"""The Keras backend a command computes on: TensorFlow or JAX, chosen once, before Keras is first
imported (Keras reads KERAS_BACKEND at import and cannot switch afterwards).

The command line owns the choice (`--backend`, default: KERAS_BACKEND when set, else
tensorflow); library users set KERAS_BACKEND themselves or call `select` before importing
anything that imports Keras. Nothing here imports TensorFlow or JAX unless asked about them:
on the JAX backend no module of the pipeline imports TensorFlow at all.

- `select(name)`: the choice, checked against a Keras that is already imported;
- `current()`: the backend Keras runs on (or will, once imported);
- `gpu_available()`: whether the backend sees a GPU;
- `exact_float32(precision)`: fp32 means fp32: no TF32 matmuls or convolutions on GPUs;
- `identity()`: the library and major.minor version that computed the features (fingerprint).
"""

from __future__ import annotations

import os
import sys

from pipeline.errors import PipelineError

BACKENDS = ("tensorflow", "jax")
DEFAULT = "tensorflow"


def requested(name: str | None) -> str:
    """The backend a command asked for: `name`, else KERAS_BACKEND, else tensorflow."""
    choice = (name or os.environ.get("KERAS_BACKEND") or DEFAULT).strip().lower()
    if choice not in BACKENDS:
        raise PipelineError(f"unknown backend {choice!r} (from --backend or KERAS_BACKEND): choose "
                            f"{' or '.join(BACKENDS)}")
    return choice


def select(name: str | None) -> str:
    """Make `name` (or the default) the backend of this process. Must come before Keras is
    imported; asking for another backend than an already-imported Keras runs on is refused."""
    choice = requested(name)
    if "keras" in sys.modules:
        active = sys.modules["keras"].backend.backend()
        if active != choice:
            raise PipelineError(f"Keras is already running on {active} in this process: choose the backend before "
                                f"importing Keras (KERAS_BACKEND={choice})")
        return choice
    if choice == "jax":
        try:
            import jax  # noqa: F401 - checked here for a one-line error instead of Keras' traceback
        except ImportError:
            raise PipelineError("--backend jax needs JAX: pip install 'jax[cpu]' (or 'jax[cuda12]'/'jax[cuda13]' "
                                "on a GPU machine); see README, Backends") from None
    os.environ["KERAS_BACKEND"] = choice
    return choice


def current() -> str:
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    return requested(None)


def is_tensorflow() -> bool:
    return current() == "tensorflow"


def require_tensorflow(what: str) -> None:
    """One line for a command that only TensorFlow can do."""
    if not is_tensorflow():
        raise PipelineError(f"{what} needs the tensorflow backend (this command runs on {current()}): rerun with "
                            "--backend tensorflow")


def gpu_available() -> bool:
    if is_tensorflow():
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    import jax

    return jax.default_backend() == "gpu"


def exact_float32(precision: str) -> None:
    """fp32 computes in float32: GPUs otherwise run float32 matmuls and convolutions in TF32
    (10-bit mantissas) by default, on both backends. Reduced precisions are left alone."""
    if precision != "fp32":
        return
    if is_tensorflow():
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)
    else:
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")


def identity() -> tuple[str, str]:
    """(backend, major.minor of the library that computes): part of the cache's fingerprint."""
    if is_tensorflow():
        import tensorflow as tf

        return "tensorflow", ".".join(tf.__version__.split(".")[:2])
    import jax

    return "jax", ".".join(jax.__version__.split(".")[:2])
