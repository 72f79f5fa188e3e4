"""Every option of every stage, declared once: in the stage function's own signature (pipeline/api.py).

A keyword argument's name, type and default are the parameter's; its help, choices (the library's
own constants), command-line reading rule, metavar, section of --help and command-line name are an
`Option` in its annotation, `Annotated[int, Option("...", rule="positive")]`, the way scikit-learn
declares `_parameter_constraints` beside the parameters. Options several commands share are declared
here once, as annotated types (`Cache`, `Models`, `Progress`, ...), as git declares its OPT__*
options once for every builtin. A group of keywords several stages take together is a TypedDict the
stages take as `**table: Unpack[LabelsTable]` (PEP 692): its members are those stages' keywords,
spelled out in their signatures (`signature_of`), checked and made flags like any other.

From these declarations:
- the command line builds every command's flags (pipeline/cli/flags.py): `--name-with-dashes`
  for `name_with_dashes`, with the signature's default, the Option's help, choices and rule;
- the Python API checks its arguments against the same annotations (pipeline/arguments.py);
- docs/flags.md is generated from the command line they built (`make docs`).

So a new option of a stage is one keyword argument in its function, and appears in all three.
This module imports nothing heavy: the command line's --help reads it before any backend is chosen.
"""

from __future__ import annotations

import functools
import inspect
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypedDict

PathLike = str | os.PathLike  # a str or os.PathLike path (arguments.py: not bytes, not empty)

# How the command line reads a flag's text (pipeline/cli/flags.py READERS); None: as the type says.
RULES = ("positive", "non_negative", "finite", "positive_float", "names", "caches", "path", "text")


@dataclass(frozen=True)
class Option:
    """What a keyword argument is on the command line and in the help (its name, type and default
    are the parameter's own)."""

    help: str | None = None
    choices: Sequence[str] | None = None  # the library's own constants
    rule: str | None = None  # one of RULES: how the command line reads the text
    metavar: str | None = None
    flag: str | None = None  # the command line's name where it is not --<name with dashes>
    group: str | None = None  # the section of --help it is listed in
    repeat: bool = False  # given again, appended (--labels A --labels B)
    required: bool = False  # the command line needs it (the API takes it positionally)
    positional: bool = False  # a positional argument of the command line, one or more (predict's images)
    negated: bool = False  # a True default switched off by the flag: progress=True is --no-progress
    command_line: bool = True  # False: a keyword of Python only
    default: Any = None  # a keyword group's member's default (a TypedDict holds no values); a parameter's is its own

    def __post_init__(self) -> None:
        if self.rule is not None and self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}: one of {RULES}")


def option_of(annotation: Any) -> Option | None:
    """The Option in an evaluated annotation (Annotated[..., Option]), or None."""
    for extra in getattr(annotation, "__metadata__", ()):
        if isinstance(extra, Option):
            return extra
    return None


@dataclass(frozen=True)
class Declared:
    """One keyword argument of a stage function: its name, default, evaluated type and Option."""

    name: str
    default: Any
    annotation: Any
    option: Option | None
    positional: bool  # the API takes it by position too


def keyword_group(annotation: Any, namespace: Mapping[str, Any]) -> list[Declared] | None:
    """The members of a keyword group, `**table: Unpack[LabelsTable]` (the annotation as written, or
    evaluated), as keywords with their defaults; None where the annotation names no group."""
    if isinstance(annotation, str):
        if not annotation.startswith("Unpack["):
            return None
        annotation = eval(annotation, dict(namespace))  # noqa: S307 - our own source's annotations
    if typing.get_origin(annotation) is not typing.Unpack:
        return None
    (group,) = typing.get_args(annotation)
    return list(group_members(group))


@functools.cache
def group_members(group: type) -> tuple[Declared, ...]:
    """A keyword group's (a TypedDict's) members, each with its Option and the default it holds."""
    members = []
    for name, hint in typing.get_type_hints(group, include_extras=True).items():
        option = option_of(hint)
        members.append(Declared(name, None if option is None else option.default, hint, option, False))
    return tuple(members)


def signature_of(function: Any) -> inspect.Signature:
    """`function`'s signature with its keyword group spelled out: the members of `**table:
    Unpack[LabelsTable]` as keyword-only parameters with their defaults, where the group stood (what
    `help()` and `inspect.signature` show of a stage: pipeline/arguments.checked sets it)."""
    function = inspect.unwrap(function)
    signature = inspect.signature(function)
    parameters = []
    for parameter in signature.parameters.values():
        members = None
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            members = keyword_group(parameter.annotation, function.__globals__)
        if members is None:
            parameters.append(parameter)
            continue
        parameters += [inspect.Parameter(member.name, inspect.Parameter.KEYWORD_ONLY, default=member.default,
                                         annotation=member.annotation) for member in members]
    return signature.replace(parameters=parameters)


def declarations(function: Any) -> list[Declared]:
    """The keyword arguments of `function` (a stage of pipeline/api.py), a keyword group's members
    included, their annotations evaluated in the function's own module (the annotations are strings
    there: `from __future__ import annotations`), in signature order."""
    globals_ = inspect.unwrap(function).__globals__
    found = []
    for name, parameter in signature_of(function).parameters.items():
        annotation = parameter.annotation
        if isinstance(annotation, str):
            annotation = eval(annotation, globals_)  # noqa: S307 - our own source's annotations
        found.append(Declared(name, parameter.default, annotation, option_of(annotation),
                              parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return found


def with_defaults(group: type, given: Mapping[str, Any]) -> dict[str, Any]:
    """A keyword group's values as a stage received them (`table`), its defaults filled in."""
    return {member.name: given.get(member.name, member.default) for member in group_members(group)}


def defined(where: str) -> tuple[str, ...]:
    """The choices the library defines at `where`, "module:NAME" below pipeline/ ("heads.svm:KERNELS";
    NAME may be "Class.CONSTANT", or a registry whose keys are the choices). Read when a signature's
    annotations are evaluated (the command line built, an API call checked), not when pipeline is
    imported; every module named this way imports no Keras, so --help chooses no backend."""
    import importlib

    module, name = where.split(":")
    value: Any = importlib.import_module(f"pipeline.{module}")
    for part in name.split("."):
        value = getattr(value, part)
    return tuple(value)


# --- shared by several commands (each declared here once) -------------------------------------------

LABELS_GROUP = "labels from a table (default: the cache's class folders)"
TABLE_GROUP = "images from a table instead of a folder scan (extracted unlabelled)"
BACKEND_HELP = "the Keras backend (default: KERAS_BACKEND if set, else tensorflow)"


def backend_option(note: str = "") -> Option:
    return Option(BACKEND_HELP + note, choices=defined("backend:BACKENDS"))


def path_column(table: str, group: str, default: str | None = None) -> Option:
    return Option(f"{table}'s column of image paths (default: path)", metavar="COL", flag="--path-column", group=group,
                  default=default)


def missing_rows(table: str, group: str, default: str | None = None) -> Option:
    return Option(f"rows of {table} that name no image: error (default) or skip them",
                  choices=defined("labelling.labelling:MISSING"), group=group, default=default)


Cache = Annotated[PathLike, Option("cache root (default features/)", rule="path")]
Progress = Annotated[bool, Option("no progress bar", flag="--no-progress", negated=True)]
ProgressOutput = Annotated[bool, Option("no progress output", flag="--no-progress", negated=True)]
Backend = Annotated[str | None, backend_option()]
Layers = Annotated[Sequence[str] | None, Option("cached layer(s) to use, concatenated (default: all the cache "
                                                  "holds)", rule="names", metavar="NAME[,NAME...]")]
Seed = Annotated[int, Option()]
WhereBestLooks = Annotated[PathLike, Option("where --model best looks", rule="path")]
AmongRunsOf = Annotated[PathLike | None, Option("--model best: among the runs of this image folder", rule="path")]
MemoryBudget = Annotated[int | None, Option("the features are held in memory up to this size (default: a quarter "
                                              "of memory)", rule="positive", metavar="MB")]


# The labels-table flags, the same for every command that reads labels (docs/formats.md: The labelling table)
Labels = Annotated[Any, Option(
    "a CSV, TSV or Parquet table of images and labels, joined to the cache by path (relative to the table's folder "
    "or the data folder, or absolute) or by an id column (content sha256); it relabels the images it names (an "
    "audit's suspects.csv too), others keep the cache's labels; a row with an empty label makes its image "
    "unlabelled. Given again, each table relabels over the ones before (labels.csv, then suggestions.csv filled "
    "in)", metavar="TABLE", repeat=True, group=LABELS_GROUP)]
LabelColumn = Annotated[str | None, Option("the table's column of classes, one a row (default: label)",
                                             metavar="COL", flag="--label-column", group=LABELS_GROUP)]
TargetColumn = Annotated[str | None, Option(
    "a soft target instead: the probability (0..1) of class 1 of a binary task, e.g. ELPV's defect probability "
    "(logreg and dense heads; images the table does not name are unlabelled)", metavar="COL", flag="--target-column",
    group=LABELS_GROUP)]
TargetColumns = Annotated[Any, Option(command_line=False)]  # Python only: one probability column a class
LabelSeparator = Annotated[str | None, Option(
    "multi-label: the label column holds several labels an image, split by SEP (e.g. ;)", metavar="SEP",
    group=LABELS_GROUP)]
LabelColumns = Annotated[Any, Option(
    "multi-label: one 0/1 column a label (logreg and dense heads: one sigmoid a label, each label's threshold "
    "chosen on validation)", metavar="A,B,...", rule="text", group=LABELS_GROUP)]
SplitColumn = Annotated[str | None, Option(
    "train, validation (val) or test per row (default: the cache's split, else a stable rule from the content id, "
    "stratified by class)", metavar="COL", group=LABELS_GROUP)]
GroupColumn = Annotated[str | None, Option(
    "images of one group (a patient, a module, a cell type) are kept in one split", metavar="COL",
    flag="--group-column", group=LABELS_GROUP)]
LabelsPath = Annotated[str, path_column("--labels", LABELS_GROUP, default="path")]
LabelsMissing = Annotated[str, missing_rows("--labels", LABELS_GROUP, default="error")]


class LabelsTable(TypedDict, total=False):
    """The labels-table keywords, declared once for every stage that reads labels (train_head,
    evaluate, embeddings, audit), which takes them as `**table: Unpack[LabelsTable]` and reads them
    with `with_defaults(LabelsTable, table)`; a new one is a member here (and its use in LabelSpec)."""

    labels: Labels
    label: LabelColumn
    target: TargetColumn
    label_separator: LabelSeparator
    label_columns: LabelColumns
    split_column: SplitColumn
    group: GroupColumn
    path: LabelsPath
    missing: LabelsMissing
    target_columns: TargetColumns


# --- help and choices read from the library's own registries, when a declaration is evaluated ----------



def _backbones() -> Any:
    from pipeline.backbone.registry import BACKBONES

    return BACKBONES


def backbone_help() -> str:
    return f"{' or '.join(_backbones())} (default vgg16)"


def image_size_help() -> str:
    return ("square input size (default: " + ", ".join(
        f"{spec.default_image_size} for {name}" for name, spec in _backbones().items()) + "). For images much smaller "
        "than that, extract notes it before the backbone pass with the backbone's measured advice (28 px images: "
        "vgg16 --image-size 64 --layer block4_pool --pooling avg; efficientnet_lite0 --image-size 128)")


def layer_help() -> str:
    return ("feature layer(s), comma-separated (default: the backbone's own: " + "; ".join(
        f"{','.join(spec.default_layers)} for {name}" for name, spec in _backbones().items())
        + "); `inspect --backbone NAME` lists them")


def weights_help() -> str:
    return ("imagenet (default: each backbone's first entry), a source or tag ("
            + "; ".join(entry.describe() for spec in _backbones().values() for entry in spec.weights)
            + "), none (random, for tests) or a file")


def unfreeze_help() -> str:
    return ("train from this block or layer index on (default: the top block, " + ", ".join(
        f"{spec.default_unfreeze} for {name}" for name, spec in _backbones().items()) + "); see `inspect`")


def heads_help() -> str:
    from pipeline.heads import HEADS

    return (f"one of {', '.join(sorted(HEADS))}, or auto: logreg (default), dense, svm (support-vector machine, RBF or "
            "linear), knn (cosine nearest neighbours, the few-shot baseline) or sklearn (any scikit-learn classifier: "
            "--estimator, --params); auto fits every --candidates head and keeps the best on validation")


def flip_help() -> str:
    from pipeline.finetuning.examples import Augmentation

    return (f"default {Augmentation().flip} (horizontal_and_vertical for data with no up, such as solar cells); with "
            "--cached none (flipping cached maps measured harmful for flattened heads: see README)")
