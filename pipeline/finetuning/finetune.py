"""Stage three: put a trained head back on its backbone, unfreeze the top block, train with
augmentation on the training split, and save a model that takes raw images.

Two sources of training examples, one procedure: raw images through the whole classifier (end to
end), or, with `--cached`, activations of the layer below the unfreeze point read from a feature
cache through the classifier's part above it (pipeline/runs/classifier.py, `top_model`, which shares
the classifier's layers); pipeline/finetuning/examples.py holds both. Either way the whole classifier is saved.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import keras

from pipeline import report, runs
from pipeline.backbone.blocks import choose_unfreeze, layer_below, unfreeze
from pipeline.backbone.registry import get_backbone
from pipeline.cache.reader import split_images
from pipeline.cache.store import SPLITS
from pipeline.errors import PipelineError, Rules, check_parameters
from pipeline.finetuning import recipe
from pipeline.finetuning.examples import (
    Augmentation,
    CachedActivationExamples,
    ImageExamples,
    TrainingData,
    cached_activations,
)
from pipeline.heads.fitting import (
    EpochTimer,
    KeepBest,
    RateLogger,
    epoch_estimate,
    fit,
    fit_verbosity,
    history_rows,
    training_callbacks,
)
from pipeline.heads.ordinal import check_loss, describe_order
from pipeline.images.views import TTA
from pipeline.runs import Run, RunSummary
from pipeline.runs.classifier import TRAINING_POLICY, top_model


@dataclass
class FinetuneOptions:
    source: str = "best"  # a run directory, or "best": the head run with the highest validation accuracy
    models: Path = Path("models")
    name: str | None = None
    unfreeze: str | None = None  # default: the backbone's top block (the registry's default_unfreeze)
    epochs: int = 3
    lr: float = 1e-4
    momentum: float = 0.9
    # Gradients are clipped to this norm (0: off). A logistic-regression head standardises
    # features whose training variance was tiny (scales down to 1e-6 on ELPV), so its effective
    # weights reach the thousands and unclipped steps blew the model up (epoch-1 loss 1.41
    # against 0.29 clipped, from the same head).
    clipnorm: float = 1.0
    batch_size: int = 16
    patience: int = 3
    augmentation: Augmentation | None = None  # default: Augmentation.default(cached), as the command line
    precision: str | None = None  # default: as the cache (bf16 caches train in mixed bfloat16)
    seed: int = 0
    progress: bool = True
    cached: bool = False  # train on cached activations of the layer below the unfreeze point
    cache_root: Path | None = None  # where to look for them (default: beside the head's cache)
    data: Path | None = None  # with source "best": choose among the head runs of this data folder
    # the recipe (pipeline/finetuning/recipe.py)
    optimizer: str = "sgd"  # sgd (with momentum) or adamw
    weight_decay: float = 0.0
    schedule: str = "plateau"  # plateau: halve on a validation-loss plateau; cosine: warm-up, then cosine to 0
    warmup_epochs: float = 0.0  # with cosine: a linear warm-up over this many epochs
    label_smoothing: float = 0.0
    loss: str | None = None  # crossentropy or ordinal (pipeline/heads/ordinal.py); default: the head run's
    lr_decay: float = 1.0  # each block below the top unfrozen one learns at this factor of the one above
    head_epochs: int = 0  # of `epochs`: first train the head alone (the backbone frozen), then unfreeze
    tta: str = "none"  # none, flip, dihedral: views averaged when the run is scored (views.py)

    RULES: ClassVar[Rules] = {
        "epochs": (lambda v: v >= 1, "a positive integer"),
        "lr": (lambda v: 0 < v < float("inf"), "a positive learning rate"),
        "momentum": (lambda v: 0 <= v < 1, "from 0 up to, not including, 1"),
        "clipnorm": (lambda v: 0 <= v < float("inf"), "a positive norm, or 0 for no clipping"),
        "batch_size": (lambda v: v >= 1, "a positive integer"),
        "patience": (lambda v: v >= 1, "a positive integer"),
        "weight_decay": (lambda v: 0 <= v < 1, "from 0 up to, not including, 1"),
        "warmup_epochs": (lambda v: 0 <= v < float("inf"), "0 or more epochs"),
        "label_smoothing": (lambda v: 0 <= v < 1, "from 0 up to, not including, 1"),
        "lr_decay": (lambda v: 0 < v <= 1, "above 0, at most 1 (1: one rate for every block)"),
        "head_epochs": (lambda v: v >= 0, "0 or more epochs"),
    }

    def __post_init__(self) -> None:
        check_parameters(vars(self), self.RULES)
        choices = {"optimizer": recipe.OPTIMIZERS, "schedule": recipe.SCHEDULES, "tta": TTA}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise PipelineError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: choose from "
                                    f"{', '.join(allowed)}")
        if self.head_epochs >= self.epochs:
            raise PipelineError(f"--head-epochs {self.head_epochs}: fewer than --epochs ({self.epochs}), which "
                                "counts them (the rest train with the backbone unfrozen)")
        if self.warmup_epochs and self.schedule != "cosine":
            raise PipelineError("--warmup-epochs applies to --schedule cosine")
        if self.warmup_epochs >= self.epochs - self.head_epochs:
            raise PipelineError(f"--warmup-epochs {self.warmup_epochs:g}: fewer than the epochs with the backbone "
                                f"unfrozen ({self.epochs - self.head_epochs})")
        if self.loss is not None:
            check_loss(self.loss)
        if self.loss == "ordinal" and self.label_smoothing:
            raise PipelineError("--label-smoothing applies to --loss crossentropy (the ordinal loss's targets are "
                                "the cuts, not the classes)")
        if self.cached and self.tta != "none":
            raise PipelineError("--tta averages views of images: fine-tune without --cached to use it")
        if self.augmentation is None:
            self.augmentation = Augmentation.default(self.cached)
        a = self.augmentation
        if self.cached and (any((a.rotation, a.zoom, a.translation, a.contrast, a.brightness, a.saturation))
                            or a.flip == "dihedral"):
            raise PipelineError("--cached augments by flipping the cached maps only: rotation, zoom, translation, "
                                "contrast, brightness, saturation and dihedral transposes need images (drop them, "
                                "or fine-tune without --cached)")


def run_finetuning(options: FinetuneOptions) -> RunSummary:
    """Fine-tune in its phases, each a function below: prepare (the head run, its cache, the
    classifier, what it trains on, the test split scored before), head_only (--head-epochs: the
    backbone still frozen), unfrozen (the rest, from the unfreeze point up), record (every split
    scored, the run written whole)."""
    runs.check_writable(options.models)  # before the work, not after
    setup = prepare(options)
    training = Training(setup, options)
    training.head_only()
    training.unfrozen()
    return record(setup, training, options)


@dataclass
class Setup:
    """What fine-tuning starts from: the head run, its cache, the classifier and its backbone, the
    unfreeze point, the examples and the model they train, the loss, the test split scored before."""

    head_run: Run
    store: Any
    precision: str
    loss_name: str
    model: Any
    backbone: Any
    unfreeze_point: str
    name: str
    data: TrainingData
    test_before: dict[str, Any]
    per_image: float  # seconds a test image took to score: the epoch estimate's rate

    @property
    def target(self) -> Any:
        """The model trained: the classifier, or its part above the cached layer."""
        return self.data.model


def prepare(options: FinetuneOptions) -> Setup:
    head_run = Run.open(options.source, options.models, kind="head", data=options.data)
    if head_run.task != "classes" or head_run.threshold is not None:
        what = {"soft": "soft targets", "multilabel": "several labels an image"}.get(head_run.task,
                                                                                 "a decision threshold")
        raise PipelineError(f"{head_run.name} was trained on {what}: fine-tuning trains one class an image with the "
                            "most probable class said; start from a head run of classes (--label-column)")
    store = head_run.features()
    # a cache re-split since the head was trained would put its training images into "test"
    head_run.check_same_splits(store.split_indexes(), store.directory)
    fingerprint, view = store.fingerprint, head_run.view
    precision = options.precision or TRAINING_POLICY[fingerprint.precision]
    loss_name = options.loss or head_run.loss
    check_loss(loss_name, len(store.class_names))
    if loss_name == "ordinal" and options.label_smoothing:
        raise PipelineError(f"--label-smoothing applies to --loss crossentropy ({head_run.name} was trained with "
                            "the ordinal loss, which fine-tuning takes: give --loss crossentropy to change it)")
    keras.utils.set_random_seed(options.seed)
    model, backbone = head_run.trainable_classifier(precision)
    unfreeze_point = choose_unfreeze(backbone, options.unfreeze, get_backbone(fingerprint.backbone).default_unfreeze,
                                     view.layers)
    suffix = "-cached" if options.cached else ""
    name = runs.check_run_name(options.name or f"{head_run.directory.name}-finetuned-{unfreeze_point}{suffix}")
    below = layer_below(backbone, unfreeze_point) if options.cached else None
    data: TrainingData
    if below is not None:
        activations = cached_activations(store, below, options.cache_root)
        data = CachedActivationExamples(activations, below, top_model(model, backbone, below, view),
                                        options.batch_size, options.augmentation, options.seed)
    else:
        data = ImageExamples(split_images(store), model, fingerprint.image_size, options.batch_size,
                             options.augmentation, options.seed)
    _say(options, f"scoring the test split before fine-tuning ({len(data.records['test'])} images)")
    scoring = time.perf_counter()
    before = data.predict("test", options.tta)
    test_before = report.split_metrics(data.records["test"].labels, before, store.class_names)
    per_image = (time.perf_counter() - scoring) / max(1, len(data.records["test"]))
    if loss_name == "ordinal":
        _say(options, f"ordinal loss: {describe_order(store.class_names)}")
    return Setup(head_run, store, precision, loss_name, model, backbone, unfreeze_point, name, data, test_before,
                 per_image)


def _say(options: FinetuneOptions, message: str) -> None:
    """One line on stderr per step that runs long without Keras' progress output."""
    if options.progress:
        print(message, file=sys.stderr, flush=True)


class Training:
    """The two training phases over one model, one optimizer recipe and one record of epochs: the
    head alone (--head-epochs, the backbone frozen as built), then the backbone unfrozen from the
    unfreeze point up. Keras needs a compile after trainable flags change, so each phase compiles
    a fresh optimizer."""

    def __init__(self, setup: Setup, options: FinetuneOptions) -> None:
        self.setup, self.options = setup, options
        data, spec = setup.data, get_backbone(setup.store.fingerprint.backbone)
        self.blocks = spec.blocks
        self.steps_per_epoch = recipe.steps(len(data.records["train"]), options.batch_size)
        self.loss = recipe.loss(len(setup.store.class_names), options.label_smoothing, setup.loss_name)
        self.trained_layers: list[str] = []
        factors: dict[str, float] = {}
        if not options.head_epochs:  # one phase: unfrozen from the start (the head's layers train already)
            factors = self._unfreeze()
        self._compile(options.epochs, factors, "plateau" if options.head_epochs else options.schedule,
                      options.warmup_epochs)
        self.train, self.validation = data.training_batches(), data.batches("validation")
        _say(options, f"scoring the validation split before fine-tuning ({len(data.records['validation'])} images)")
        self.initial_loss, self.initial_accuracy = setup.target.evaluate(self.validation, verbose=0)
        _say(options, epoch_estimate(setup.per_image, len(data.records["train"]), len(data.records["validation"]),
                                     options.epochs))
        self.keep_best = KeepBest(float(self.initial_accuracy), float(self.initial_loss))
        self.timer = EpochTimer()
        self.verbose = fit_verbosity(options.progress)
        self.rows: list[dict[str, float]] = []
        self.seconds = 0.0

    def _unfreeze(self) -> dict[str, float]:
        setup = self.setup
        self.trained_layers = unfreeze(setup.backbone, setup.unfreeze_point, setup.head_run.view.layers)
        return recipe.block_rate_factors(setup.backbone, self.blocks, self.trained_layers, self.options.lr_decay)

    def _compile(self, epochs: int, factors: dict[str, float], schedule: str, warmup: float) -> None:
        o = self.options
        self.setup.target.compile(
            optimizer=recipe.optimizer(o.optimizer, o.lr, o.momentum, o.clipnorm, o.weight_decay, schedule, warmup,
                                       epochs, self.steps_per_epoch, factors),
            loss=self.loss, metrics=["accuracy"])

    def _callbacks(self, schedule: str) -> list[Any]:
        patience = self.options.patience
        plateau = (max(1, patience // 2), 1e-7) if schedule == "plateau" else None
        return [self.timer, *training_callbacks(self.keep_best, patience, plateau,
                                                before_plateau=[RateLogger()])]

    def head_only(self) -> None:
        """Phase one (--head-epochs): the head alone; then unfreeze and compile for phase two."""
        o = self.options
        if not o.head_epochs:
            return
        started = time.perf_counter()
        history = fit(self.setup.target, self.train, validation_data=self.validation, epochs=o.head_epochs,
                      callbacks=self._callbacks("plateau"), shuffle=False, verbose=self.verbose)
        self.rows = history_rows(history)
        self._compile(o.epochs - o.head_epochs, self._unfreeze(), o.schedule, o.warmup_epochs)
        self.seconds += time.perf_counter() - started

    def unfrozen(self) -> None:
        """Phase two: the backbone unfrozen from the unfreeze point up, to --epochs in all."""
        o = self.options
        started = time.perf_counter()
        history = fit(self.setup.target, self.train, validation_data=self.validation, initial_epoch=o.head_epochs,
                      epochs=o.epochs, callbacks=self._callbacks(o.schedule), shuffle=False, verbose=self.verbose)
        self.rows += [row | {"epoch": row["epoch"] + o.head_epochs} for row in history_rows(history)]
        self.seconds += time.perf_counter() - started


def record(setup: Setup, training: Training, options: FinetuneOptions) -> RunSummary:
    """Every split scored (validation and test with the test-time views), and the run written whole."""
    data, store, head_run, name = setup.data, setup.store, setup.head_run, setup.name
    rows, seconds, keep_best, timer = training.rows, training.seconds, training.keep_best, training.timer
    _say(options, f"scoring every split{'' if options.tta == 'none' else f' (test-time views: {options.tta})'}")
    # the views are averaged for validation and test; the train split (its score a diagnostic, never a
    # choice) is scored once, as eight views of every training image would cost eight scoring passes
    probabilities = {split: data.predict(split, "none" if split == "train" else options.tta) for split in SPLITS}
    train_images = len(data.records["train"])
    config = head_run.config
    run_config = {
        "from": str(head_run.directory.resolve()),
        "head": config["head"],
        "features": config["features"],
        "view": config["view"],
        "finetune": {
            "unfreeze": setup.unfreeze_point, "trained_layers": training.trained_layers, "epochs": options.epochs,
            "epochs_run": len(rows), "kept_epoch": keep_best.best_epoch,
            "validation_before": {"accuracy": float(training.initial_accuracy), "loss": float(training.initial_loss)},
            "optimizer": options.optimizer, "lr": options.lr, "momentum": options.momentum,
            "weight_decay": options.weight_decay, "clipnorm": options.clipnorm, "schedule": options.schedule,
            "warmup_epochs": options.warmup_epochs, "label_smoothing": options.label_smoothing,
            "loss": setup.loss_name, "lr_decay": options.lr_decay, "head_epochs": options.head_epochs,
            "tta": options.tta, "tta_splits": [] if options.tta == "none" else ["validation", "test"],
            "batch_size": options.batch_size, "patience": options.patience, "precision": setup.precision,
            "augmentation": vars(options.augmentation) | data.augmentation_note(),
            # every BatchNormalization layer, in unfrozen blocks too: frozen, so it runs in inference
            # mode on its ImageNet statistics (batches of 16 are too small to estimate new ones)
            "batch_norm": "frozen, inference mode (also in unfrozen blocks)",
            "trained_on": data.describe(),
        },
        # scored end to end from pixels by the model fine-tuning starts from; the head run's own
        # figures (from its cached features) differ by the features' rounding and precision
        "test_before_finetune": setup.test_before,
        "head_run_accuracy": {split: head_run.metrics.get(split, {}).get("accuracy")
                              for split in ("validation", "test")},
        "seed": options.seed,
        "seconds": round(seconds, 3),
        "epoch_seconds": [round(t, 3) for t in timer.seconds],
        "seconds_per_epoch": round(timer.steady, 3) if timer.steady else None,  # after the first (tracing)
        "images_per_second": round(train_images * len(rows) / seconds, 2) if seconds else None,
    }
    with runs.create(options.models, name, "finetune") as run:
        # the whole classifier (its layers above the cached layer were trained), without its optimizer:
        # it loads in a Keras that has never seen this package
        uncompiled(setup.model).save(run.directory / runs.MODEL_FILE)
        run_config = run.write_config(run_config, store.class_names, store.split_indexes())
        # epoch 0: the model before fine-tuning, on validation (the kept epoch may be it)
        start = {"epoch": 0, "val_loss": float(training.initial_loss), "val_accuracy": float(training.initial_accuracy)}
        run.write_history([start, *rows], "epochs")
        views = "" if options.tta == "none" else f"; scored with test-time views: {options.tta}"
        title = (f"{name} (fine-tuned from {setup.unfreeze_point}; augmentation: "
                 f"{options.augmentation.describe()}{views})")
        run.score(lambda split: probabilities[split], data.records, store.class_names, title,
                  ordered=setup.loss_name == "ordinal")
        run.add_metrics({"test_before_finetune": setup.test_before})
    return RunSummary(Path(options.models) / name, run.metrics, seconds, run.report, True, run_config)


def uncompiled(model: keras.Model) -> keras.Model:
    """The same model and weights, never compiled: saved without an optimizer (the recipe's holds
    per-variable rates in a class of this package)."""
    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy
