"""The one exception type for problems a user can cause and fix, and the one check of parameter
ranges that raises it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
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


def command() -> str:
    """How the user started the pipeline, for hints: `run_pipeline.py` from a clone, else the
    console command that pip installs."""
    import sys

    return "run_pipeline.py" if sys.argv and Path(sys.argv[0]).name == "run_pipeline.py" else "bottleneck-pipeline"


_COMMAND_LINE = {"on": False}  # set by the command line: advice is then spoken in flags


def speak_as_command_line(on: bool = True) -> None:
    """Advice in flags (`--image-size 128`, the command line's) or keywords (`image_size=128`)."""
    _COMMAND_LINE["on"] = on


def spoken_by_command_line() -> bool:
    return _COMMAND_LINE["on"]


def option(name: str, value: object = None) -> str:
    """An option as the caller writes it: `--image-size 128` on the command line, `image_size=128`
    in Python (a flag without a value: `--stream`, `stream=True`)."""
    if _COMMAND_LINE["on"]:
        return f"--{name.replace('_', '-')}" + ("" if value is None else f" {value}")
    return f"{name}={True if value is None else value!r}"


def from_a_clone() -> bool:
    """Started from a clone (run_pipeline.py, where `make setup` exists), not a pip install."""
    return command() == "run_pipeline.py" and (Path(__file__).resolve().parent.parent / "Makefile").is_file()


def install_hint(extra: str) -> str:
    """How to install an extra: pip's words, and `make setup` only where the user has it."""
    text = f"pip install 'bottleneck-pipeline[{extra}]'"
    return text + " (make setup installs it)" if from_a_clone() else text


def require_module(module: str, what: str, extra: str) -> None:
    """A one-line error where an optional dependency is missing, naming the extra that brings it."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise PipelineError(f"{what} needs {module}: {install_hint(extra)}")

