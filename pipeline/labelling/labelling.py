"""A labelling: the labels and splits of a cache's images, kept apart from their features.

The cache holds what the backbone saw (features, content id, path). Labels, splits and groups
are a table joined to it on the path (or the content id where the table gives one), so changing
them never touches the backbone:

- the *default* labelling is the one the cache carries: the class folders' names and the splits
  extract gave them (an unlabelled cache, from a flat folder or a table of paths, has none);
- a *labels table* (`LabelSpec`) relabels the images it names, over the default: a full table
  relabels every image, an audit's suspects.csv only those it lists; several tables relabel in
  turn. A row with an empty label makes its image unlabelled (not trained on, not scored; still
  predicted and audited);
- soft targets (`--target-column`, the probability of class "1" of a binary task, or
  `--target-columns`, one probability column a class) and multi-label tables (`--label-separator`,
  `--label-columns`) replace the default entirely: the images the tables do not name are unlabelled.

Splits: a split column's value where the table gives one; else, without a group column, the split
the cache gave the image (folder layouts); else the stable rule computed from the content id (so a
renamed file keeps its split), stratified by class, or from the group where a group column is
given (a group's images never straddle two splits).

A run records its labelling (labelling.csv, every labelled image with its id, split, group and
label, target or 0/1 a label; its digest in config.json), so evaluate and finetune read the labels
the run was trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic, tables
from pipeline.cache.store import SPLITS, UNLABELLED, FeatureStore, SplitIndex
from pipeline.data.dataset import SPLIT_FOLDERS, SplitConfig, assign_splits, split_position
from pipeline.data.table import Table
from pipeline.errors import PipelineError

MISSING = ("error", "skip")
SOFT_CLASSES = ["0", "1"]  # a soft target is the probability of class "1"
LABELLING_FILE = "labelling.csv"  # a run's copy of its labelling
EXAMPLES = 3  # paths named in a message


@dataclass(frozen=True)
class LabelSpec:
    """Where a stage's labels come from: a table (a CSV, TSV or Parquet path, or a dataframe) and
    which of its columns say what. Without a table, the cache's own labels (its class folders).

    `path`: the column of image paths (relative to the table's folder or the data folder, or
    absolute); `label`: one class per row (default: the column `label` where the table has one);
    `target`: a soft target instead, the probability of class "1"; `split`: train / validation
    (val) / test per row; `group`: images of one group are kept in one split; `missing`: what to
    do with table rows that name no image of the cache ("error", or "skip" them)."""

    table: Any = None
    path: str = "path"
    label: str | None = None
    target: str | None = None
    split: str | None = None
    group: str | None = None
    missing: str = "error"
    separator: str | None = None  # multi-label: the label column holds several labels, split by this
    columns: tuple[str, ...] | None = None  # multi-label: one 0/1 column per label
    metrics_by: str | None = None  # a column whose values the run's metrics are also broken down by
    target_columns: tuple[str, ...] | None = None  # soft targets: one probability column a class, summing to 1

    def __post_init__(self) -> None:
        if self.missing not in MISSING:
            raise PipelineError(f"--missing {self.missing!r}: choose {' or '.join(MISSING)}")
        for name in ("columns", "target_columns"):  # "a,b,c" or a list
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, tuple(c.strip() for c in value.split(",") if c.strip()))
            elif value is not None:
                object.__setattr__(self, name, tuple(value))
        kinds = [flag for flag, value in (("--label-column", self.label), ("--target-column", self.target),
                                          ("--label-columns", self.columns), ("--target-columns", self.target_columns))
                 if value is not None]
        if len(kinds) > 1:
            raise PipelineError(f"{' and '.join(kinds)}: give one (a class per image, a soft target, or 0/1 columns "
                                "of labels)")
        for flag, columns in (("--label-columns", self.columns), ("--target-columns", self.target_columns)):
            if columns is not None and (len(columns) < 2 or len(set(columns)) != len(columns)):
                raise PipelineError(f"{flag} {','.join(columns)}: name two or more distinct columns, one a "
                                    + ("label (0/1)" if flag == "--label-columns" else "class (its probability)"))
        if self.separator is not None and (not isinstance(self.separator, str) or not self.separator
                                           or self.separator.strip() != self.separator):
            raise PipelineError(f"--label-separator {self.separator!r}: a character (or string) between labels, e.g. ;")
        if self.separator is not None and (self.target is not None or self.columns is not None):
            raise PipelineError("--label-separator splits the labels of --label-column: drop --target-column and "
                                "--label-columns")
        named = {"--label-column": self.label, "--target-column": self.target, "--split-column": self.split,
                 "--group-column": self.group, "--label-separator": self.separator,
                 "--label-columns": ",".join(self.columns) if self.columns else None,
                 "--metrics-by": self.metrics_by,
                 "--target-columns": ",".join(self.target_columns) if self.target_columns else None}
        if self.table is None:
            given = [flag for flag, value in named.items() if value is not None]
            if given or self.missing != "error":
                raise PipelineError(f"{given[0] if given else '--missing'} reads a labels table: add --labels TABLE")
        for flag, value in {**named, "--path-column": self.path, "--label-separator": None}.items():
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise PipelineError(f"{flag} takes a column name, not {value!r}")

    @property
    def given(self) -> bool:
        return self.table is not None

    @property
    def tables(self) -> tuple[Any, ...]:
        """The tables, in order: each relabels the images it names (a later one over an earlier)."""
        if self.table is None:
            return ()
        return tuple(self.table) if isinstance(self.table, list | tuple) else (self.table,)

    @property
    def multilabel(self) -> bool:
        return self.separator is not None or self.columns is not None

    @property
    def soft(self) -> bool:
        return self.target is not None or self.target_columns is not None

    def describe(self) -> dict[str, Any]:
        """What a run records of where its labels came from."""
        names = ["a dataframe" if not isinstance(t, str | Path) else str(Path(t).resolve()) for t in self.tables]
        return {"table": None if not names else names[0] if len(names) == 1 else names,
                "path_column": self.path, "label_column": self.label,
                "target_column": self.target, "split_column": self.split, "group_column": self.group,
                "missing": self.missing, "label_separator": self.separator,
                "label_columns": list(self.columns) if self.columns else None, "metrics_by": self.metrics_by,
                "target_columns": list(self.target_columns) if self.target_columns else None}


@dataclass
class Labelling:
    """The labels of one cache's rows (in the cache's row order, pipeline/cache/store.CacheRows):
    class index or UNLABELLED, split and group; `targets` where the task is "soft" (class
    probabilities) or "multilabel" (0/1 a label, `labels` then holding each image's first label)."""

    store: FeatureStore
    class_names: list[str]
    task: str  # "classes", "soft" or "multilabel"
    labels: np.ndarray
    splits: list[str | None]
    groups: list[str | None]
    targets: np.ndarray | None = None  # (rows, classes): probabilities (soft) or 0/1 (multilabel)
    source: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    by: list[str | None] | None = None  # --metrics-by: each row's value (metrics per value)

    def metric_groups(self) -> dict[str, str] | None:
        """path -> the --metrics-by value of each labelled image with one (None without --metrics-by)."""
        if self.by is None:
            return None
        paths = self.store.rows_index().paths
        return {paths[i]: self.by[i] for i in np.flatnonzero(self.labels != UNLABELLED) if self.by[i] is not None}

    @property
    def soft(self) -> bool:
        return self.task == "soft"

    def split_indexes(self) -> dict[str, SplitIndex]:
        rows = self.store.rows_index()
        indexes = {}
        chosen_split = np.asarray(self.splits, dtype=object)
        for split in SPLITS:
            chosen = np.flatnonzero((self.labels != UNLABELLED) & (chosen_split == split))
            indexes[split] = SplitIndex(self.labels[chosen], [rows.paths[i] for i in chosen], rows.locations[chosen],
                                        [rows.sha256[i] for i in chosen],
                                        None if self.targets is None else self.targets[chosen])
        return indexes

    def apply(self) -> FeatureStore:
        """The cache seen through this labelling (its shards untouched)."""
        return self.store.relabelled(self.class_names, self.split_indexes(), self)

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    def canonical_rows(self) -> list[list[str]]:
        """Every labelled image as labelling.csv keeps it, sorted by path."""
        rows = self.store.rows_index()
        out = []
        for i in np.flatnonzero(self.labels != UNLABELLED):
            if self.multilabel:
                values = [str(int(v)) for v in self.targets[i]]
            elif self.soft and len(self.class_names) > 2:
                values = [f"{v:.9g}" for v in self.targets[i]]
            else:
                values = [f"{self.targets[i, 1]:.9g}" if self.soft else self.class_names[self.labels[i]]]
            by = [] if self.by is None else [self.by[i] or ""]
            out.append([rows.paths[i], rows.sha256[i], self.splits[i] or "", self.groups[i] or "", *by, *values])
        return sorted(out)

    def header(self) -> list[str]:
        """path, id, split, group, then the label (`label`), the soft target (`target`), or one 0/1
        column per label (multi-label)."""
        columns = self.multilabel or (self.soft and len(self.class_names) > 2)  # one column a class or label
        return ["path", "id", "split", "group", *([] if self.by is None else ["metrics_by"]),
                *(self.class_names if columns else ["target" if self.soft else "label"])]

    def digest(self) -> str:
        """sha256 of the labelling as labelling.csv keeps it: two runs with the same digest were
        trained, validated and tested on the same labels."""
        digest = hashlib.sha256("\x1f".join(self.header()).encode())
        for row in self.canonical_rows():
            digest.update(("\x1e" + "\x1f".join(row)).encode())
        return digest.hexdigest()

    def write(self, directory: Path) -> None:
        """labelling.csv in `directory` (a run): read back by `recorded_labelling`."""
        with atomic.replacing(Path(directory) / LABELLING_FILE) as temporary, \
                open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = tables.writer(handle)
            writer.writerow(self.header())
            writer.writerows(self.canonical_rows())

    def record(self) -> dict[str, Any]:
        """What config.json keeps of the labelling."""
        return {"digest": self.digest(), "task": self.task, "classes": self.class_names, "counts": self.counts,
                **({"file": LABELLING_FILE} if self.source.get("table") else {}), "source": self.source}


# --- building a labelling ---------------------------------------------------------------------------


def label_cache(store: FeatureStore, spec: LabelSpec | None, over_default: bool = True) -> FeatureStore:
    """`store` seen through the labels `spec` names (the store itself where no table is given)."""
    if spec is None or not spec.given:
        return store
    return labelling_from_table(store, spec, over_default).apply()


def labelling_from_table(store: FeatureStore, spec: LabelSpec, over_default: bool = True) -> Labelling:
    """The labelling of `store` that `spec`'s table gives, over the cache's own labels where
    `over_default` (a run's recorded labelling is complete: it is read with over_default=False)."""
    rows = store.rows_index()
    soft, multilabel = spec.soft, spec.multilabel
    by: list[str | None] | None = None if spec.metrics_by is None else [None] * len(rows)
    base = over_default and not soft and not multilabel and bool(store.class_names)
    values: list[Any] = [store.class_names[label] if base and label != UNLABELLED else None for label in rows.labels]
    splits: list[str | None] = [split if base and label != UNLABELLED else None
                                for split, label in zip(rows.splits, rows.labels)]
    groups: list[str | None] = [None] * len(rows)
    named: set[int] = set()  # rows some table names
    missing: list[str] = []  # the first few rows that name no image (a million-row table keeps a count)
    missing_count = 0
    seen_label = separated = False
    for table in (Table(source) for source in spec.tables):  # each relabels what it names, in order
        path_column, id_column, label_columns = _columns(table, spec)
        resolver = _PathResolver(store, table)
        set_by: dict[int, tuple[Any, int]] = {}  # row -> (label value, table row)
        skipped = missing_count
        columns = list(dict.fromkeys(c for c in (path_column, id_column, *label_columns, spec.split, spec.group,
                                                 spec.metrics_by) if c is not None))
        at = {c: k for k, c in enumerate(columns)}
        for number, cells in table.rows(columns):
            name = cells[at[path_column]] if path_column else None
            digest = cells[at[id_column]] if id_column else None
            targets = resolver.rows(name, digest)
            if not targets:
                if name is not None or digest is not None:
                    missing_count += 1
                    if len(missing) < EXAMPLES:
                        missing.append(str(name if name is not None else digest))
                continue
            if spec.columns is not None:
                value = _flags(tuple(cells[at[c]] for c in label_columns), table, number, label_columns)
            elif spec.target_columns is not None:
                value = _distribution(tuple(cells[at[c]] for c in label_columns), table, number, label_columns)
            elif soft:
                value = _probability(cells[at[label_columns[0]]], table, number, label_columns[0])
            else:
                value = _class_name(cells[at[label_columns[0]]], table, number, label_columns[0])
                if spec.separator is not None and value is not None:
                    separated = separated or spec.separator in value
                    value = tuple(sorted({part.strip() for part in value.split(spec.separator) if part.strip()}))
            seen_label = seen_label or value is not None
            split = _split_value(cells[at[spec.split]], table, number, spec.split) if spec.split else None
            group = _text(cells[at[spec.group]]) if spec.group else None
            for row in targets:
                earlier = set_by.get(row)
                if earlier is not None and earlier[0] != value:
                    raise PipelineError(f"{table} gives {rows.paths[row]} two labels ({earlier[0]!r} on row "
                                        f"{earlier[1]}, {value!r} on row {number}): keep one row per image")
                set_by[row] = (value, number)
                values[row] = value
                if split is not None:
                    splits[row] = split
                elif not base or rows.labels[row] == UNLABELLED or spec.group is not None:
                    splits[row] = None  # the stable rule (by group where groups are given)
                if spec.group:
                    groups[row] = group
                if by is not None:
                    by[row] = _text(cells[at[spec.metrics_by]])
        if missing_count > skipped and spec.missing == "error":
            raise PipelineError(f"{missing_count - skipped} row(s) of {table} name no image of the cache "
                                f"{store.directory} (e.g. {', '.join(missing[:EXAMPLES])}): paths are relative to the "
                                f"table's folder or the data folder {store.data_root}, or absolute; extract those "
                                "images first, fix the paths, or pass --missing skip")
        if not set_by:
            raise PipelineError(f"no row of {table} names an image of the cache {store.directory} (e.g. "
                                f"{', '.join(missing[:EXAMPLES]) or 'the table is empty'}): paths are relative to the "
                                f"table's folder or the data folder {store.data_root}, or absolute")
        named |= set(set_by)
    if not seen_label and not base:  # over the cache's labels, empty cells only unlabel the images named
        raise PipelineError(f"column {label_columns[0]!r} of {table} is empty: every row's label is missing")
    if spec.separator is not None and not separated:
        raise PipelineError(f"the label separator {spec.separator!r} never occurs in column {label_columns[0]!r} of "
                            f"{table}: one label per image is --label-column alone")
    targets_matrix = None
    if spec.target_columns is not None:  # a probability column a class
        class_names = list(spec.target_columns)
        targets_matrix = np.array([v if v is not None else (0.0,) * len(class_names) for v in values], np.float64)
        labels = np.array([UNLABELLED if v is None else int(np.argmax(v)) for v in values], np.int32)
    elif soft:
        class_names = list(SOFT_CLASSES)
        probability = np.array([np.nan if v is None else v for v in values], np.float64)
        labels = np.where(np.isnan(probability), UNLABELLED, (probability >= 0.5).astype(np.int32)).astype(np.int32)
        targets_matrix = np.stack([1 - probability, probability], axis=1)
        targets_matrix[np.isnan(probability)] = 0.0
    elif multilabel:
        class_names = list(spec.columns) if spec.columns is not None else \
            sorted({name for v in values if v is not None for name in v})
        reserved = sorted(set(class_names) & {"path", "id", "split", "group"})
        if reserved:
            raise PipelineError(f"{reserved[0]!r} is a label of {table}, and a name labelling.csv keeps for itself: "
                                "rename the label")
        index = {n: k for k, n in enumerate(class_names)}
        targets_matrix = np.zeros((len(values), len(class_names)), np.float64)
        for row, value in enumerate(values):
            for name in value or ():
                targets_matrix[row, index[name]] = 1.0
        labelled = np.array([v is not None for v in values])
        # for the stable split's stratification: the first label of each image's set
        labels = np.where(labelled, targets_matrix.argmax(axis=1), UNLABELLED).astype(np.int32)
        for k, name in enumerate(class_names):
            present = int(targets_matrix[labelled, k].sum())
            if present == 0 or present == int(labelled.sum()):
                raise PipelineError(f"label {name!r} is on {'no' if present == 0 else 'every'} labelled image of "
                                    f"{table}: a label needs images with it and without it")
    else:
        class_names = sorted({n for n in values if n is not None})
        index = {n: k for k, n in enumerate(class_names)}
        labels = np.array([UNLABELLED if n is None else index[n] for n in values], np.int32)
    if len(class_names) < 2:
        raise PipelineError(f"{table} labels its images with one class only ({class_names[0]!r}): a classifier needs "
                            "at least two")
    notes: list[str] = []
    final_splits = _complete_splits(labels, splits, groups, rows.sha256, table, spec)
    source = spec.describe()
    if missing:
        notes.append(f"{missing_count} row(s) of {table} name no image of the cache and were skipped (--missing skip), "
                     f"e.g. {', '.join(missing[:EXAMPLES])}")
    counts = _counts(labels, final_splits) | {"from_table": len(named), "missing_skipped": missing_count}
    if base:
        counts["from_cache"] = int(np.sum(labels != UNLABELLED)) - sum(1 for r in named if labels[r] != UNLABELLED)
    task = "soft" if soft else "multilabel" if multilabel else "classes"
    labelling = Labelling(store, class_names, task, labels, final_splits, groups, targets_matrix, source, counts,
                          notes, by)
    return labelling


def _columns(table: Table, spec: LabelSpec) -> tuple[str | None, str | None, list[str]]:
    """The table's path column (None where it gives ids only), id column and label column(s),
    each checked to be there (one line naming the columns there are)."""
    path_column = table.require(spec.path, "--path-column") if spec.path in table.columns or "id" not in \
        table.columns else None
    id_column = "id" if "id" in table.columns else None
    if spec.columns is not None or spec.target_columns is not None:
        flag = "--label-columns" if spec.columns is not None else "--target-columns"
        label_columns = [table.require(column, flag) for column in (spec.columns or spec.target_columns)]
    else:
        label_column = spec.target or spec.label or ("label" if "label" in table.columns else None)
        if label_column is None:
            shown = ", ".join(table.columns[:20])
            raise PipelineError(f"{table} has no column 'label' (its columns: {shown}): name the column of classes "
                                "with --label-column, of soft targets with --target-column, or 0/1 columns of labels "
                                "with --label-columns")
        label_columns = [table.require(label_column, "--target-column" if spec.soft else "--label-column")]
    for column, flag in ((spec.split, "--split-column"), (spec.group, "--group-column"),
                         (spec.metrics_by, "--metrics-by")):
        if column is not None:
            table.require(column, flag)
    return path_column, id_column, label_columns


def recorded_labelling(run_directory: Path, store: FeatureStore, recorded: Mapping[str, Any]) -> FeatureStore:
    """`store` seen through the labelling a run recorded (labelling.csv), checked against its
    digest: the labels, targets and splits the run was trained, validated and tested on."""
    path = Path(run_directory) / LABELLING_FILE
    if not path.is_file():
        raise PipelineError(f"{path} is missing: the run was trained on a labels table and keeps its copy there; "
                            "restore it, or train the run again")
    task = recorded.get("task")
    by = "metrics_by" if recorded.get("source", {}).get("metrics_by") else None
    classes = tuple(recorded.get("classes", ()))
    if task == "multilabel":
        spec = LabelSpec(path, path="path", columns=classes, split="split", group="group", metrics_by=by)
    elif task == "soft" and len(classes) > 2:
        spec = LabelSpec(path, path="path", target_columns=classes, split="split", group="group", metrics_by=by)
    else:
        soft = task == "soft"
        spec = LabelSpec(path, path="path", label=None if soft else "label", target="target" if soft else None,
                         split="split", group="group", metrics_by=by)
    labelling = labelling_from_table(store, spec, over_default=False)
    if labelling.digest() != recorded.get("digest"):
        raise PipelineError(f"{path} does not hold the labels the run was trained on (its digest differs from "
                            "config.json's): restore it, or train the run again")
    return labelling.apply()


# --- the parts --------------------------------------------------------------------------------------


class _PathResolver:
    """Table cells to cache rows: a path as the cache keeps it (relative to the data folder), a
    path relative to the table's folder or absolute under the data folder; an id (content sha256)
    where the path names nothing."""

    def __init__(self, store: FeatureStore, table: Table) -> None:
        rows = store.rows_index()
        self.by_path: dict[str, list[int]] = {}
        for i, name in enumerate(rows.paths):
            self.by_path.setdefault(name, []).append(i)
        self.by_id: dict[str, list[int]] = {}
        for i, digest in enumerate(rows.sha256):
            self.by_id.setdefault(digest, []).append(i)
        self.root = Path(store.data_root).resolve() if store.data_root else None
        self.folder = table.folder

    def rows(self, name: Any, digest: Any) -> list[int]:
        if name is not None:
            found = self._by_name(str(name))
            if found:
                return found
        if digest is not None:
            return self.by_id.get(str(digest).lower(), [])
        return []

    def _by_name(self, name: str) -> list[int]:
        name = name.replace("\\", "/") if "\\" in name and "/" not in name else name
        found = self.by_path.get(name.removeprefix("./"))
        if found or self.root is None:
            return found or []
        candidates = [Path(name)] if Path(name).is_absolute() else \
            ([self.folder / name] if self.folder is not None else [])
        for candidate in candidates:
            with contextlib.suppress(ValueError, OSError):
                relative = Path(_normal(candidate)).relative_to(self.root).as_posix()
                if relative in self.by_path:
                    return self.by_path[relative]
        return []


def _normal(path: Path) -> str:
    import os

    return os.path.normpath(str(path))


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _class_name(value: Any, table: Table, number: int, column: str) -> str | None:
    """A class name from a cell: text as given, whole numbers without ".0"; no control characters."""
    name = _text(value)
    if name is None:
        return None
    if any(unicodedata.category(c) == "Cc" for c in name) or "".join(name.splitlines()) != name:
        raise PipelineError(f"{table} row {number}: the label {name[:40]!r} in column {column!r} holds a line break or "
                            "a control character: class names are written one per line")
    return name


def _flags(cells: tuple[Any, ...], table: Table, number: int, columns: Sequence[str]) -> tuple[str, ...] | None:
    """The labels of one row of 0/1 columns; None (unlabelled) where every cell is empty."""
    if all(cell is None for cell in cells):
        return None
    chosen = []
    for cell, column in zip(cells, columns):
        text = "" if cell is None else str(cell).strip().lower()
        if text in ("1", "1.0", "true", "yes"):
            chosen.append(column)
        elif text not in ("0", "0.0", "false", "no"):
            raise PipelineError(f"{table} row {number}: {cell!r} in column {column!r} is not 0 or 1: a label column "
                                "says whether the image has that label")
    return tuple(chosen)


def _distribution(cells: tuple[Any, ...], table: Table, number: int,
                  columns: Sequence[str]) -> tuple[float, ...] | None:
    """One row of per-class probabilities: each in [0, 1], summing to 1 (within 1e-3, then
    normalised); None (unlabelled) where every cell is empty."""
    if all(cell is None for cell in cells):
        return None
    if any(cell is None for cell in cells):
        empty = columns[[cell is None for cell in cells].index(True)]
        raise PipelineError(f"{table} row {number}: column {empty!r} is empty and others are not: give every class's "
                            "probability, or none (unlabelled)")
    values = [_probability(cell, table, number, column) for cell, column in zip(cells, columns)]
    total = sum(values)
    if abs(total - 1.0) > 1e-3:
        raise PipelineError(f"{table} row {number}: the probabilities of {', '.join(columns)} sum to {total:.4g}, not "
                            "1: soft targets are a distribution over the classes")
    return tuple(v / total for v in values)


def _probability(value: Any, table: Table, number: int, column: str) -> float | None:
    if value is None:
        return None
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise PipelineError(f"{table} row {number}: {value!r} in column {column!r} is not a number: a soft target is "
                            "a probability from 0 to 1") from None
    if not 0.0 <= p <= 1.0:  # NaN fails too
        raise PipelineError(f"{table} row {number}: {value!r} in column {column!r} is outside [0, 1]: a soft target is "
                            "a probability from 0 to 1")
    return p


def _split_value(value: Any, table: Table, number: int, column: str) -> str | None:
    text = _text(value)
    if text is None:
        return None
    split = SPLIT_FOLDERS.get(text.lower())
    if split is None:
        raise PipelineError(f"{table} row {number}: split {text!r} in column {column!r} is not one of train, "
                            "validation (or val), test: fix it, or leave the cell empty for the stable rule")
    return split


def _complete_splits(labels: np.ndarray, splits: Sequence[str | None], groups: Sequence[str | None],
                     ids: Sequence[str], table: Table, spec: LabelSpec) -> list[str | None]:
    """Every labelled image's split: as given, else by the stable rule (content id or group)."""
    final = list(splits)
    config = SplitConfig()
    labelled = labels != UNLABELLED
    if spec.group is not None:
        by_group: dict[str, str] = {}
        for i in np.flatnonzero(labelled):
            group = groups[i]
            if group is not None and final[i] is not None:
                earlier = by_group.setdefault(group, final[i])
                if earlier != final[i]:
                    raise PipelineError(f"group {group!r} (column {spec.group!r} of {table}) has images in {earlier} "
                                        f"and in {final[i]}: a group's images are kept in one split; fix the split "
                                        "column")
        for i in np.flatnonzero(labelled):
            if final[i] is None:
                key = groups[i] if groups[i] is not None else ids[i]
                final[i] = by_group.get(key) or _by_position(split_position(key, config.seed), config)
                if groups[i] is not None:
                    by_group[groups[i]] = final[i]
    else:
        for label in np.unique(labels[labelled]):
            members = np.flatnonzero(labels == label)
            open_ = [i for i in members if final[i] is None]
            if not open_:
                continue
            kept = [final[i] for i in members]
            chosen = assign_splits([ids[i] for i in members], config, kept)
            for i, split in zip(members, chosen):
                final[i] = split
    present = {final[i] for i in np.flatnonzero(labelled)}
    for split in ("train", "validation"):
        if split not in present:
            why = "the groups fall" if spec.group is not None else "the labelled images fall"
            raise PipelineError(f"the {split} split is empty: {why} in other splits; label more images or groups, "
                                f"or give a split column (--split-column)")
    return [s if ok else None for s, ok in zip(final, labelled)]


def _by_position(position: float, config: SplitConfig) -> str:
    test_cut = config.test_fraction
    return "test" if position < test_cut else "validation" if position < test_cut + config.validation_fraction \
        else "train"


def _counts(labels: np.ndarray, splits: Sequence[str | None]) -> dict[str, int]:
    labelled = labels != UNLABELLED
    counts = {split: int(sum(1 for s, ok in zip(splits, labelled) if ok and s == split)) for split in SPLITS}
    return counts | {"unlabelled": int(np.sum(~labelled))}
