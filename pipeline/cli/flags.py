"""A command's flags, built from its stage function's declarations (pipeline/options.py): the name,
the default and the type from the signature, the help, choices, reading rule and section from the
parameter's Option. Nothing here restates a flag; the few the command line alone has (--json, a
command's own output) are declared here once, as options of the same kind.
"""

from __future__ import annotations

import argparse
import inspect
import keyword
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.arguments import kind_text
from pipeline.options import Declared, Option, declarations

JSON = Option("print the summary as JSON")  # every command that prints a summary
JSON_PLAIN = Option()  # runs, caches, evaluate, finetune, export, inspect: without a help line (as before)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def cache_list(value: str) -> list[Path]:
    """--features A or A,B (fused); an empty name between commas is refused."""
    if "," not in value or Path(value).exists():
        return [Path(value)]
    parts = value.split(",")
    if any(not name.strip() for name in parts):
        raise argparse.ArgumentTypeError(f"{value!r}: name caches separated by commas, e.g. CACHE_A,CACHE_B")
    return [Path(name.strip()) for name in parts]


READERS: dict[str, Callable[[str], Any] | None] = {
    "positive": positive_int, "non_negative": non_negative_int, "finite": finite_float,
    "positive_float": positive_float, "names": names, "caches": cache_list, "path": Path, "text": None,
}
BY_KIND: dict[str, Callable[[str], Any] | None] = {  # a type's reader where the Option names no rule
    "int": int, "float": finite_float, "PathLike": Path, "str": None, "Any": None,
}


def destination(declared: Declared) -> str:
    """The parsed name: the keyword's own, except for a main input the command line names otherwise
    (evaluate's run is --model), which the command passes by position."""
    option = declared.option or Option()
    if option.flag and declared.positional and not option.negated:
        name = option.flag.lstrip("-").replace("-", "_")
        return declared.name if keyword.iskeyword(name) else name  # finetune --from: run
    return ("no_" if option.negated else "") + declared.name


def _reader(declared: Declared) -> Callable[[str], Any] | None:
    option = declared.option or Option()
    if option.rule is not None:
        return READERS[option.rule]
    kinds = [kind for kind in kind_text(declared.annotation).split(" | ") if kind != "None"]
    return BY_KIND.get(kinds[0]) if len(kinds) == 1 else None


def add_declared(parser: argparse.ArgumentParser, function: Callable[..., Any]) -> None:
    """Every keyword of `function` that the command line has, as a flag of `parser`, in signature order."""
    sections: dict[str, Any] = {}
    for declared in declarations(function):
        option = declared.option or Option()
        if not option.command_line:
            continue
        target = parser if option.group is None else sections.setdefault(
            option.group, parser.add_argument_group(option.group))
        add_option(target, declared)


def add_option(target: Any, declared: Declared) -> None:
    """One declared keyword as one argparse argument of `target` (a parser or a section of one)."""
    option = declared.option or Option()
    default = None if declared.default is inspect.Parameter.empty else declared.default
    extra: dict[str, Any] = {}
    if option.metavar:
        extra["metavar"] = option.metavar
    if option.positional:
        target.add_argument(declared.name, type=_reader(declared), nargs="+", help=option.help, **extra)
        return
    flag = option.flag or "--" + declared.name.replace("_", "-")
    kinds = kind_text(declared.annotation).split(" | ")
    if kinds[0] == "bool":  # a switch: on when given (a True default is switched off: --no-progress)
        target.add_argument(flag, dest=destination(declared), action="store_true",
                            default=False if option.negated else default, help=option.help)
        return
    if option.repeat:
        extra["action"] = "append"
    if option.choices is not None:
        extra["choices"] = tuple(option.choices)
    if option.required:
        extra["required"] = True
    else:
        extra["default"] = default
    reader = _reader(declared)
    if reader is not None:
        extra["type"] = reader
    target.add_argument(flag, dest=destination(declared), help=option.help, **extra)


def add_flag(target: Any, name: str, option: Option) -> None:
    """A switch of the command line alone (--json), declared once above."""
    target.add_argument("--" + name.replace("_", "-"), action="store_true", help=option.help)


def stage_keywords(args: argparse.Namespace, function: Callable[..., Any], *positional: str) -> dict[str, Any]:
    """The parsed flags that `function` takes as keyword arguments, under their keyword names
    (--no-progress is progress=False). `positional`: what the command passes by position."""
    values = {}
    for declared in declarations(function):
        if declared.name in positional:
            continue
        name = destination(declared)
        if hasattr(args, name):
            value = getattr(args, name)
            values[declared.name] = not value if (declared.option and declared.option.negated) else value
    return values
