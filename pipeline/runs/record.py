"""The one reader of a run's files: config.json (with its `format_version`), labels.txt and
metrics.json parsed and checked into a `RunRecord`. `Run` (pipeline/runs/run.py) is a record
with behaviour; listing (pipeline/runs/listing.py) reads every run through it too.

Older formats have one policy: a run is read at the format it was written in or refused in one
line that says to train it again (runs made before `format_version` existed are refused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from pipeline.backbone.pooling import POOLINGS
from pipeline.cache.fingerprint import Fingerprint
from pipeline.cache.reader import FeatureView
from pipeline.errors import PipelineError
from pipeline.runs.files import CONFIG, LABELS_FILE, check_split_record, read_config, read_labels, read_metrics

FORMAT_VERSION = 1  # config.json's "format_version"
KINDS = ("head", "finetune")
WAY_OUT = "train the run again"


class Part(NamedTuple):
    """One feature cache a head reads: its fingerprint, the head's view of it, and what the run
    recorded of it (directory, fingerprint digest, weights, classes)."""

    fingerprint: Fingerprint
    view: FeatureView
    record: dict[str, Any]


def _part(features: dict[str, Any], view: dict[str, Any]) -> Part:
    return Part(Fingerprint.from_dict(features["fingerprint"]), FeatureView(tuple(view["layers"]), view["pooling"]),
                features)


class RunRecord:
    """A finished run's files, read once and checked. `parts` is the one form of "which caches feed
    this head", in the head's input order: one, or several for fused features; `fingerprint` and
    `view` are the first part's (the only one of a run that is not fused)."""

    def __init__(self, directory: Path, config: dict[str, Any], class_names: list[str],
                 metrics: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.config = config
        self.class_names = class_names
        self.metrics = metrics
        self.format_version: int = config["format_version"]
        self.kind: str = config["kind"]
        features = config["features"]
        self.trained_class_names: list[str] = list(features["class_names"])
        fusion = config.get("fusion")
        if fusion is None:
            self.parts = [_part(features, config["view"])]
        else:
            if not isinstance(fusion, list) or len(fusion) < 2:
                raise ValueError("fusion (a list of two or more parts)")
            self.parts = [_part(part["features"], part["view"]) for part in fusion]
            if self.parts[0].record.get("fingerprint_digest") != features.get("fingerprint_digest"):
                raise ValueError("fusion (its first part is not the run's features)")
        self.fingerprint, self.view = self.parts[0].fingerprint, self.parts[0].view
        _check_shape(self)

    @classmethod
    def read(cls, directory: Path) -> RunRecord:
        """The run in `directory`, or PipelineError in one line saying what is wrong and what to do."""
        directory = Path(directory)
        config = read_config(directory)
        version = config.get("format_version")
        if version is None:
            raise PipelineError(f"{directory} was written by an early version of this pipeline (no run format "
                                f"version; this one reads format {FORMAT_VERSION}): {WAY_OUT}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise PipelineError(f"{directory / CONFIG} is damaged (format_version {version!r}): {WAY_OUT}")
        if version > FORMAT_VERSION:
            raise PipelineError(f"{directory} was written by a newer version of this pipeline (run format {version}, "
                                f"this one reads up to {FORMAT_VERSION}): upgrade it, or train the run again")
        try:
            record = cls(directory, config, read_labels(directory), read_metrics(directory))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise PipelineError(f"{directory / CONFIG} is damaged (missing or wrong {error}): {WAY_OUT}") from None
        check_split_record(directory)
        if record.class_names != record.trained_class_names:
            raise PipelineError(
                f"{directory / LABELS_FILE} lists {len(record.class_names)} classes, the run was trained on "
                f"{len(record.trained_class_names)} ({', '.join(record.trained_class_names[:5])}...): restore "
                "labels.txt, or train the run again")
        return record

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def fused(self) -> bool:
        """Whether the head reads the features of several backbones side by side."""
        return len(self.parts) > 1

    @property
    def keras_form(self) -> bool:
        """Whether the run is one Keras model end to end: every run but one whose head has no Keras
        form (the sklearn head: predicted in NumPy after the backbone, exported to ONNX only)."""
        if self.kind != "head":
            return True
        from pipeline.heads import HEADS

        head = HEADS.get(str(self.config["head"].get("kind")))
        return head is None or head.KERAS_FORM

    @property
    def backbones(self) -> str:
        return "+".join(part.fingerprint.backbone for part in self.parts)

    @property
    def loss(self) -> str:
        """What the run was trained with: crossentropy, or ordinal (its sorted classes as ordered
        levels): a fine-tuned run's own loss, else its head's."""
        if self.kind == "finetune":
            return str(self.config["finetune"].get("loss", "crossentropy"))
        return str(self.config["head"].get("params", {}).get("loss", "crossentropy"))

    @property
    def precision(self) -> str:
        """The precision the run computed in: its fine-tuning's, else its features'."""
        return self.config.get("finetune", {}).get("precision") or self.fingerprint.precision

    @property
    def task(self) -> str:
        """What the run's labels are: "classes" (one an image), "soft" (targets) or "multilabel"."""
        labelling = self.config.get("labelling")
        return str(labelling.get("task", "classes")) if isinstance(labelling, dict) else "classes"

    @property
    def thresholds(self) -> list[float] | None:
        """A multi-label run's decision threshold of each label (chosen on validation), else None."""
        if self.task != "multilabel":
            return None
        return [float(t) for t in self.config["head"]["thresholds"]]

    @property
    def threshold(self) -> float | None:
        """A binary run's decision threshold on the probability of its second class (train-head
        --threshold), else None: the most probable class."""
        value = self.config.get("head", {}).get("threshold") if self.kind == "head" else None
        return None if value is None else float(value)

    @property
    def ordered(self) -> bool:
        """Whether the run's classes are ordered levels (scored with the order's figures too)."""
        return self.loss == "ordinal"


def _check_shape(run: RunRecord) -> None:
    """Types a run's config must have; a KeyError/TypeError/ValueError names what is wrong."""
    if run.kind not in KINDS:
        raise ValueError(f"kind {run.kind!r}")
    for part in run.parts:
        if not part.view.layers or not all(isinstance(name, str) for name in part.view.layers):
            raise ValueError("view.layers")
        unknown = [name for name in part.view.layers if name not in part.fingerprint.layers]
        if unknown:  # the head reads layers its cache holds, and no others
            raise ValueError(f"view.layers: {unknown[0]!r} is not a layer of its cache "
                             f"({', '.join(part.fingerprint.layers)})")
        if part.view.pooling not in POOLINGS:
            raise ValueError(f"view.pooling {part.view.pooling!r}")
        if not isinstance(part.record["fingerprint_digest"], str):
            raise TypeError("features.fingerprint_digest")
        if not isinstance(part.fingerprint.image_size, int) or not 0 < part.fingerprint.image_size <= 2048:
            raise ValueError(f"image_size {part.fingerprint.image_size!r}")
