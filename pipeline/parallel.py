"""Worker processes that end with the process that started them.

joblib's loky workers outlive a killed parent: reparented, they idle for minutes (about 230 MB
after a killed audit). Each worker the pipeline starts watches its parent and exits once it is
gone (its parent PID changes when it is reparented), so a kill leaves nothing running.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

WATCH_SECONDS = 0.5


def die_with_parent() -> None:
    """A worker's initializer: a daemon thread that ends the worker when its parent has died."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


def parallel(n_jobs: int, **options: Any) -> Any:
    """joblib.Parallel on loky workers that die with this process."""
    from joblib import Parallel, parallel_config

    with parallel_config(backend="loky", initializer=die_with_parent):
        return Parallel(n_jobs=n_jobs, **options)
