"""The one exception type for problems a user can cause and fix, and the one check of parameter
ranges that raises it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Rules = Mapping[str, tuple[Callable[[Any], bool], str]]  # parameter -> (is the value valid?, what it must be)


class PipelineError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback.

    The message says what is wrong and what to do about it.
    """


def check_parameters(values: Mapping[str, Any], rules: Rules) -> None:
    """Refuse the first value outside its rule, named as its command-line flag (the Python API and
    the command line say the same): `--dropout 1.5: must be a rate from 0 up to, not including, 1`."""
    for name, (valid, rule) in rules.items():
        if not valid(values[name]):
            raise PipelineError(f"--{name.replace('_', '-')} {values[name]}: must be {rule}")


def require_module(module: str, what: str, extra: str) -> None:
    """A one-line error where an optional dependency is missing, naming the extra that brings it."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise PipelineError(f"{what} needs {module}: pip install 'bottleneck-pipeline[{extra}]' (make setup installs "
                            "it)")

