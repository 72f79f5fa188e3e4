"""The Python API's arguments checked from the functions' own signatures: a wrong type is a
PipelineError of one line naming the flag, as the command line says it, never a raw TypeError from
deep inside.

`checked` wraps a public function of pipeline/api.py. Each parameter's annotation is its
declaration (pipeline/options.py; an Annotated type's Option is the command line's business):
`int` (a whole number, not a bool), `float` (a finite number), `str`, `bool`,
`PathLike` (a str or os.PathLike path, not bytes, not empty), `Sequence[str]` (a list of names; one
name alone is taken as a list of one), `X | None` (also None), and for the main inputs, which take
several kinds of things, `Any` with a rule named in INPUTS. Values in range are the options' own
business (ExtractOptions, TrainOptions, ...), which already say so in one line.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pipeline.errors import PipelineError

F = TypeVar("F", bound=Callable[..., Any])


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_path(value: Any) -> bool:
    if isinstance(value, bytes) or not isinstance(value, str | os.PathLike):
        return False
    text = os.fspath(value)
    return isinstance(text, str) and text != "" and "\0" not in text


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_float(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


BASIC = {  # annotation -> (test, what it must be)
    "int": (_is_int, "a whole number"),
    "float": (_is_float, "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "True or False"),
    "PathLike": (_is_path, "a path (a str or pathlib.Path)"),
}


def _is_source(value: Any) -> bool:
    """A cache or run as the API takes it: a path or name, or an object standing for a directory
    (a FeatureStore, a Run)."""
    return _is_path(value) or _is_path(getattr(value, "directory", None))


def _is_sources(value: Any) -> bool:
    if value is None or _is_source(value):
        return True
    return isinstance(value, list | tuple) and len(value) > 0 and all(_is_source(v) for v in value)


def _is_dataframe(value: Any) -> bool:
    from pipeline.data.table import is_dataframe

    return is_dataframe(value) and not isinstance(value, bytes | dict)


def _is_table(value: Any) -> bool:
    """A table as the API takes it: a path to a CSV, TSV or Parquet file, or a dataframe."""
    return _is_path(value) or _is_dataframe(value)


INPUTS: dict[str, tuple[Callable[[Any], bool], str]] = {  # main inputs annotated Any, by parameter name
    "features": (_is_sources, "a cache (what extract returned, its directory or its name), a non-empty list of "
                              "them, or None for the latest"),
    "run": (_is_source, "a run (what train_head returned, its directory, or \"best\")"),
    "data": (lambda v: v is None or _is_table(v),
             "an image folder, or a table of image paths (a CSV, TSV or Parquet file, or a dataframe)"),
    "labels": (lambda v: v is None or _is_table(v) or (isinstance(v, list | tuple) and len(v) > 0
                                                      and all(_is_table(t) for t in v)),
               "a labels table (a CSV, TSV or Parquet file, or a dataframe), or a list of them"),
    # extract's table of images, or predict's images (which image_targets checks further)
    "images": (lambda v: v is None or _is_table(v) or (not isinstance(v, bytes | dict) and hasattr(v, "__iter__")),
               "a table of image paths, or paths of images"),
}


def _check(name: str, annotation: str, value: Any, function: str) -> Any:
    """`value`, checked against its annotation; a single name is made a list where a list of names is
    expected."""
    kinds = [part.strip() for part in annotation.split("|")]
    if "None" in kinds and value is None:
        return value
    kinds = [kind for kind in kinds if kind != "None"]
    if kinds == ["Any"]:
        rule = INPUTS.get(name)
        if rule is not None and not rule[0](value):
            raise PipelineError(f"{function}(): {name} {_shown(value)} is not {rule[1]}")
        return value
    if kinds == ["Sequence[str]"]:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) for v in value):
            raise PipelineError(f"{flag(name)} {_shown(value)}: a list of names (strings)")
        return value
    tests = [BASIC[kind] for kind in kinds if kind in BASIC]
    if len(tests) != len(kinds):  # an annotation this module does not know: left to the function
        return value
    if not any(test(value) for test, _ in tests):
        what = " or ".join(rule for _, rule in tests) + (", or None" if "None" in annotation else "")
        raise PipelineError(f"{flag(name)} {_shown(value)}: must be {what}")
    return value


def kind_text(annotation: Any) -> str:
    """An evaluated annotation as the kinds `_check` knows, "int | None", "PathLike", "Sequence[str]":
    Annotated's extras dropped; `str | os.PathLike` is PathLike; anything else is "?" (left to the
    function)."""
    import collections.abc
    import types
    import typing

    if annotation is inspect.Parameter.empty:
        return "?"
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = annotation.__origin__
    if isinstance(annotation, str):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
    else:
        members = (annotation,)
    names = []
    for member in members:
        if typing.get_origin(member) is typing.Annotated:
            member = member.__origin__
        if member is os.PathLike or typing.get_origin(member) is os.PathLike:
            names = [name for name in names if name != "str"] + ["PathLike"]
        elif member is type(None):
            names.append("None")
        elif member is Any:
            names.append("Any")
        elif member in (int, float, str, bool):
            if not (member is str and "PathLike" in names):
                names.append(member.__name__)
        elif typing.get_origin(member) is collections.abc.Sequence and typing.get_args(member) == (str,):
            names.append("Sequence[str]")
        else:
            names.append("?")
    return " | ".join(names)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def checked(function: F) -> F:
    """`function` with its arguments checked against its signature's annotations first. Its keyword
    group (`**table: Unpack[LabelsTable]`) is spelled out in the signature it shows and binds: a
    keyword that is none of its members is refused like any unknown keyword."""
    from pipeline.options import declarations, signature_of

    signature = signature_of(function)
    kinds: dict[str, str] = {}

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as error:
            raise PipelineError(f"{function.__name__}(): {error}") from None
        if not kinds:  # evaluated on the first call: the annotations name what the module imports later
            kinds.update({declared.name: kind_text(declared.annotation) for declared in declarations(function)})
        for name, value in list(bound.arguments.items()):
            if "?" not in kinds[name].split(" | "):
                bound.arguments[name] = _check(name, kinds[name], value, function.__name__)
        return function(*bound.args, **bound.kwargs)

    wrapper.__signature__ = signature  # type: ignore[attr-defined] - help() and inspect.signature show every keyword
    return wrapper  # type: ignore[return-value]


def image_targets(images: Any) -> Iterable[Any]:
    """predict's images: one path, or an iterable of paths (a list, a generator), each checked as
    it is reached."""
    if _is_path(images):
        return [images]
    if images is None or isinstance(images, bytes | dict) or not isinstance(images, Iterable):
        raise PipelineError(f"predict(): images {_shown(images)} is not a path or an iterable of paths")
    return images


def check_image_target(target: Any) -> None:
    if not _is_path(target):
        raise PipelineError(f"predict(): {_shown(target)} among the images is not a path (a str or pathlib.Path)")
