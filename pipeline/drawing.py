"""Pictures with matplotlib, one at a time: pyplot keeps global state (the current figure, mathtext's
parser) that is not safe across threads, so two `train_head` calls in threads of one process once
failed with a mathtext ParseException. Every function that draws is `serialised`."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
_DRAWING = threading.RLock()


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def serialised(function: F) -> F:
    """`function`, run while no other thread of this process draws."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _DRAWING:
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
