"""What every benchmark prints: the machine it ran on, and Markdown tables for RESULTS.md."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> str:
    """The GPUs the backend Keras runs on sees, by name, or "none"."""
    from pipeline import backend

    if backend.is_tensorflow():
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
        return ", ".join(names) or "none"
    import jax

    return ", ".join(d.device_kind for d in jax.devices() if d.platform == "gpu") or "none"


def machine_line() -> str:
    from pipeline import backend

    library, version = backend.identity()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"machine: {cpu_model()}, {cores} cores, GPU: {gpu_names()}, backend {library} {version}, "
            f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
