"""One finished run, opened: `Run.open(path or "best")` reads the run once and checks it (through
pipeline/runs/record.py), and gives the run's kind, fingerprint, feature view, class names, split
record and metrics, and:

- `features()`: the feature cache it was trained on (or another of the same fingerprint);
- `head()`: the fitted head of a head run;
- `classifier(precision)`: the run as one Keras model from pixels to probabilities: the only
  place that turns a run into a model and the only place that tells a head run from a
  fine-tuned one (`trainable_classifier` gives a head run's with its backbone, to fine-tune);
- `check_same_splits()`: refuses a cache that moved images between splits since the run was made.

`RunResult` is what a stage returns: the Run, with the stage's summary.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline.cache.fingerprint import Fingerprint
from pipeline.cache.reader import open_cache
from pipeline.cache.store import FeatureStore, SplitIndex
from pipeline.errors import PipelineError
from pipeline.runs.files import LABELS_FILE, MODEL_FILE, read_split_record
from pipeline.runs.listing import resolve
from pipeline.runs.record import RunRecord
from pipeline.runs.scoring import RunSummary


class Run(RunRecord):
    """A finished run directory, read once and checked (see the module docstring)."""

    @classmethod
    def open(cls, run: str | Path, models: Path = Path("models"), kind: str | None = None,
             data: Path | None = None) -> Run:
        """The run directory `run`, or `best` (the best run under `models`, of `kind` and of the
        data folder `data` if given)."""
        opened = cls.read(resolve(run, models, kind, data))
        if kind is not None and opened.kind != kind:
            raise PipelineError(f"{opened.directory} is a {opened.kind} run: this command needs a {kind} run")
        return opened

    @cached_property
    def split_record(self) -> dict[str, str]:
        """path -> split as the run saw them."""
        return {path: split for path, split, _ in read_split_record(self.directory)}

    @cached_property
    def trained_contents(self) -> dict[str, str]:
        """sha256 -> path of every image the run trained on."""
        return {digest: path for path, split, digest in read_split_record(self.directory) if split == "train"}

    # --- what the run was trained on ----------------------------------------------------------------

    def features(self, features: Path | None = None, cache_root: Path = Path("features"),
                 labels: Any = None) -> FeatureStore:
        """The feature cache the run was trained on (or `features`, which must have the same
        fingerprint and classes), seen through the labels it was trained on; with `labels` (a
        pipeline.labelling.LabelSpec), through that table instead (its classes must be the run's)."""
        self._one_backbone()
        return self._cache(self.config["features"], self.fingerprint, features, cache_root, labels)

    def fused_features(self, features: Path | None = None, cache_root: Path = Path("features")) -> list[FeatureStore]:
        """The caches a fused run was trained on, in input order."""
        if features is not None:
            raise PipelineError(f"{self.name} fuses the features of {self.backbones}: it reads the caches it was "
                                "trained on (drop --features)")
        return [self._cache(record, fingerprint, None, cache_root) for fingerprint, _, record in self.parts]

    def cached_splits(self, features: Path | None = None, cache_root: Path = Path("features"),
                      memory_budget: int | None = None, labels: Any = None) -> tuple[FeatureStore, dict[str, Any]]:
        """(its cache, the head's inputs of every split) of a head run, one cache or several fused,
        checked against the splits the run was trained with; `labels` as in features(). A
        fine-tuned run is refused: its backbone moved, so the cache holds no features of it."""
        from pipeline.cache.reader import load_head_inputs

        if self.kind != "head":
            raise PipelineError(f"{self.directory} is a {self.kind} run: its backbone was trained, so the cached "
                                "features are not its own; re-scoring from the cache is for head runs (its reports "
                                "are in it; --tta scores it from its images)")
        stores = self.caches(features, cache_root, labels)
        splits = load_head_inputs(stores, [part.view for part in self.parts], memory_budget)
        self.check_same_splits(stores[0].split_indexes(), stores[0].directory)
        return stores[0], splits

    def caches(self, features: Path | None = None, cache_root: Path = Path("features"),
               labels: Any = None) -> list[FeatureStore]:
        """The caches the run's head reads, one a part, in its input order (one, or several fused),
        each checked against what the run recorded; `features` and `labels` as in features() (a
        fused run reads the caches and labels it was trained on)."""
        if not self.fused:
            return [self.features(features, cache_root, labels)]
        if labels is not None:
            raise PipelineError(f"{self.name} fuses features: it is read with the labels it was trained on "
                                "(drop --labels)")
        return self.fused_features(features, cache_root)

    def split_images(self, split: str = "validation") -> Any:
        """The run's images of `split` (their files and labels) from the cache it was trained on
        (the first of a fused run's: every part holds the same images): validation measures an
        export, train calibrates an int8 one."""
        return self.images(checked=False)[split]

    def images(self, checked: bool = True) -> dict[str, Any]:
        """The run's images of every split (files and labels) from the cache it was trained on,
        `checked` against the splits the run was trained with (to score the run from them)."""
        store, found = self._images_of_cache
        if checked:
            self.check_same_splits(store.split_indexes(), store.directory)
        return found

    @cached_property
    def _images_of_cache(self) -> tuple[FeatureStore, dict[str, Any]]:
        """(the cache, its images of every split), looked up once a Run: an int8 export asks for the
        training images, then the validation images twice (its own check and the agreement check)."""
        from pipeline.cache.reader import split_images

        store = self.caches()[0]
        return store, split_images(store)

    def _one_backbone(self) -> None:
        if self.fused:
            raise PipelineError(f"{self.name} fuses the features of {self.backbones}: fine-tuning trains one backbone "
                                "under its head, so it starts from a head run of one backbone (--from RUN); fused "
                                "runs support runs, evaluate, predict and export")

    def _cache(self, recorded: dict[str, Any], f: Fingerprint, features: Path | None, cache_root: Path,
               labels: Any = None) -> FeatureStore:
        store = open_cache(features or Path(recorded["directory"]), cache_root)
        if store.fingerprint.digest() != recorded["fingerprint_digest"]:
            raise PipelineError(
                f"{store.directory} holds features of another fingerprint than run {self.name} was trained on "
                f"({f.backbone} {f.image_size} px, {f.precision}): use that cache, or train a new head")
        labelling = self.config.get("labelling")
        if labels is not None and labels.given:  # another labels table: the run scored against it
            from pipeline.labelling import label_cache

            store = label_cache(store, labels)
        elif isinstance(labelling, dict) and labelling.get("file"):  # trained on a labels table: its copy
            from pipeline.labelling import recorded_labelling

            store = recorded_labelling(self.directory, store, labelling)
        if store.class_names != self.trained_class_names:
            raise PipelineError(f"{store.directory} now has classes {store.class_names}"
                                + (" (by the labels table)" if labels is not None else "")
                                + f", run {self.name} was trained on {self.trained_class_names}: train a new head")
        return store

    def check_same_splits(self, current: Mapping[str, SplitIndex], cache: Path) -> None:
        """Refuse to score the run on a cache that moved images between splits since it was
        trained (a re-split would put training images into "test"), or that holds an image the
        run trained on under a new name in validation or test (a renamed or copied file: known by
        its content hash; copies the run already saw there are its own data's)."""
        recorded = self.split_record
        trained = self.trained_contents
        for split in ("validation", "test"):
            index = current.get(split)
            for path, digest in zip(index.paths if index else [], index.sha256 if index else []):
                if digest in trained and trained[digest] != path and recorded.get(path) != split:
                    raise PipelineError(
                        f"{cache} holds {path} in the {split} split, with the same content as {trained[digest]}, which "
                        f"run {self.name} was trained on: its scores would count an image it was trained on; remove "
                        "the copy (or train a new head on this cache)")
        moved = [(path, recorded[path], split) for split, index in current.items() for path in index.paths
                 if path in recorded and recorded[path] != split]
        if moved:
            path, was, now = moved[0]
            raise PipelineError(
                f"{cache} assigns {len(moved)} images to other splits than run {self.name} was trained with "
                f"(e.g. {path}: {was} then, {now} now), so its scores would count images it was trained on: "
                "extract again with the split settings the run used, or train a new head on this cache")

    # --- the run as a model ------------------------------------------------------------------------

    def head(self) -> Any:
        """The fitted head of a head run (checked against its sidecar)."""
        from pipeline.heads import Head

        if self.kind != "head":
            raise PipelineError(f"{self.directory} is a {self.kind} run: it has no separate head (its backbone was "
                                "trained with it; its reports are in it, and evaluate --tta scores it from its "
                                "images)")
        head = Head.load(self.directory)
        recorded = head.input_parts_
        if recorded is not None:
            listed = [{"fingerprint_digest": part.record.get("fingerprint_digest"), "view": part.view.as_dict()}
                      for part in self.parts]
            if listed != recorded:
                raise PipelineError(
                    f"{self.directory / 'config.json'} lists the head's {len(listed)} input part(s) otherwise than "
                    f"the head was trained on ({len(recorded)}, in the order of head.json's input_parts): its "
                    "features would be fed to the wrong weights; restore config.json, or train the head again")
        return head

    def unknowns(self) -> Any:
        """What a training image's distance looks like in this run's feature space (runs/novelty.py),
        or None: a fine-tuned run (its features moved), or a run made before it was recorded."""
        recorded = self.config.get("unknown")
        if self.kind != "head" or not isinstance(recorded, dict):
            return None
        from pipeline.runs import novelty

        return novelty.load(self.directory, recorded)

    def classifier(self, precision: str | None = None, resize: bool = True, with_features: bool = False) -> Any:
        """The run as one Keras model, pixels 0..255 -> probabilities: a head run's backbone
        rebuilt with its head on top (at `precision`, default the features'), a fine-tuned run's
        saved model (in float32 when `precision` is fp32; TensorFlow's Keras only, said in one line
        elsewhere). `resize=False`: images arrive already squashed to the run's size. `with_features`:
        each output row is the probabilities followed by the head's input vector (head runs; a
        fine-tuned run's features moved with its backbone, so it gives the probabilities alone)."""
        from pipeline import backend
        from pipeline.runs import classifier

        if self.kind == "finetune":
            backend.require_tensorflow("a fine-tuned run (its model.keras resizes by area, which only TensorFlow's "
                                       "Keras has)")
            model = classifier.load_finetuned(self.directory / MODEL_FILE, float32=precision == "fp32")
            model = model if resize else classifier.without_resize(model)
            with_features = False
        else:
            parts = [classifier.ClassifierPart(fingerprint, classifier.weights_for(fingerprint, _weights_path(record)),
                                               view) for fingerprint, view, record in self.parts]
            model, _ = classifier.build_fused_classifier(parts, self.head(), precision, resize, with_features)
        outputs = model.output_shape[-1]
        if outputs != len(self.class_names) and not with_features:
            raise PipelineError(f"{self.directory / LABELS_FILE} lists {len(self.class_names)} classes, the "
                                f"model has {outputs} outputs: restore labels.txt, or train the run again")
        return model

    def trainable_classifier(self, precision: str) -> tuple[Any, Any]:
        """(classifier, its backbone) of a head run, to fine-tune: the backbone's layers are the
        classifier's, so unfreezing them trains the classifier."""
        from pipeline.runs import classifier

        if self.kind != "head":
            raise PipelineError(f"{self.directory} is a {self.kind} run: fine-tune starts from a head run")
        self._one_backbone()
        head = self.head()
        if not head.KERAS_FORM:
            head.as_keras()  # says, in one line, which heads fine-tuning starts from
        weights = classifier.weights_for(self.fingerprint, _weights_path(self.config["features"]))
        return classifier.build_classifier(self.fingerprint, weights, self.view, head, precision)


def _weights_path(features: dict[str, Any]) -> str | None:
    return features.get("weights", {}).get("path")


class RunResult(Run):
    """What a stage that makes or scores a run returns (train_head, finetune, evaluate): the run as it
    now stands, with the stage's own figures: `summary` (a RunSummary: the metrics it measured, its
    seconds, its report's text, where it wrote them) and, from train_head(head="auto"), `comparison`
    (every candidate's figures, pipeline/training/auto.py; None otherwise). A RunResult is a Run:
    it is passed on to predict, finetune or export as it is."""

    summary: RunSummary
    comparison: Any = None

    @classmethod
    def of(cls, directory: Path, summary: RunSummary, comparison: Any = None) -> RunResult:
        result = cls.read(directory)
        assert isinstance(result, RunResult)
        result.summary = summary
        result.comparison = comparison
        return result
