"""The stages as Python functions: the front door (`import pipeline`) and what the command line calls.

Each function takes its main input positionally and the command's flags as keyword arguments
with the same names in snake_case and the same defaults (`--image-size` is `image_size`,
`--no-progress` is `progress=False`); the command line passes its parsed flags straight through,
so both are checked by the same code: the options' own constructors (ExtractOptions,
TrainOptions, FinetuneOptions, Augmentation) and the stage functions behind them.

    cache = extract("data/elpv", backbone="efficientnet_lite0")
    run = train_head(cache, head="logreg")
    predict(run, ["data/elpv/defective/cell0001.png"])

Errors a user can cause are `PipelineError` with a one-line message.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import backend as backends
from pipeline import summaries
from pipeline.arguments import check_image_target, checked, image_targets
from pipeline.chatter import kept_off
from pipeline.errors import PipelineError, spoken_by_command_line
from pipeline.images.formats import MEGAPIXEL

if TYPE_CHECKING:
    from pipeline.cache.store import FeatureStore
    from pipeline.runs import Run
    from pipeline.serving.export import ExportSummary
    from pipeline.serving.predict import Prediction

PathLike = str | os.PathLike


def _say(progress: bool, text: Any) -> None:
    """Print a stage's summary from Python, as the command line does (which prints its own, or JSON)."""
    if progress and not spoken_by_command_line():
        print(text(), flush=True)


def _run_path(run: Any) -> Any:
    """A Run stands for its directory; "best" and paths pass as they are."""
    directory = getattr(run, "directory", None)
    return directory if directory is not None else run


def _max_pixels(max_megapixels: float) -> int:
    if not max_megapixels > 0:
        raise PipelineError(f"--max-megapixels must be positive, not {max_megapixels}")
    return int(max_megapixels * MEGAPIXEL)


@checked
@kept_off
def extract(data: Any = None, *, images: Any = None, path: str = "path", missing: str = "error",
            backbone: str = "vgg16", image_size: int | None = None, pooling: str | None = None,
            layer: Sequence[str] | None = None, precision: str | None = None, weights: str = "imagenet",
            preprocessing: str | None = None, batch_size: int = 32, shard_size: int = 1024,
            cache: PathLike = "features", val_fraction: float | None = None, test_fraction: float | None = None,
            split_seed: int = 0, rehash: bool = False, strict: bool = False, max_megapixels: float = 128,
            engine: str = "local", ray_address: str | None = None, workers: int | None = None,
            backend: str | None = None, progress: bool = True) -> FeatureStore:
    """Stage one: bring the feature cache of the image folder `data` up to date (every new or
    changed image through the frozen backbone once) and return it, opened: a FeatureStore with its
    `path`, `fingerprint`, `class_names` and the run's `summary` (images, new, reused, skipped,
    seconds, notes). A folder without class folders is extracted unlabelled. `images`: a table of
    image paths instead (a CSV, TSV or Parquet file, or a dataframe; its column `path`), relative to
    `data` where given, else to the table's folder; also accepted as `data` itself. `missing`:
    "skip" goes on past paths that are not image files."""
    from pipeline.labelling import is_dataframe

    if images is None and data is not None and (is_dataframe(data) or Path(data).is_file()):
        images, data = data, None  # extract(table) as extract(images=table)
    backends.select(backend)
    from pipeline.cache.store import FeatureStore
    from pipeline.data.dataset import SplitConfig
    from pipeline.extraction.extract import ExtractOptions, extract_features

    summary = extract_features(ExtractOptions(
        data=None if data is None else Path(data), images=images, path_column=path, missing=missing,
        backbone=backbone, image_size=image_size, pooling=pooling,
        layers=None if layer is None else list(layer), precision=precision, weights=weights,
        preprocessing=preprocessing, batch_size=batch_size, shard_size=shard_size, cache_root=Path(cache),
        splits=SplitConfig.from_flags(val_fraction, test_fraction, split_seed), rehash=rehash, strict=strict,
        max_pixels=_max_pixels(max_megapixels), progress=progress, engine=engine, ray_address=ray_address,
        workers=workers,
    ))
    store = FeatureStore(summary.cache_dir)
    store.summary = summary
    _say(progress, lambda: summaries.extract_text(summary))
    return store


@checked
@kept_off
def train_head(features: Any = None, *, head: str = "logreg", cache: PathLike = "features",
               models: PathLike = "models", name: str | None = None, layer: Sequence[str] | None = None,
               pooling: str | None = None, seed: int = 0, class_weight: str | None = None,
               units: int | None = None, dropout: float | None = None, batch_norm: bool | None = None,
               optimizer: str | None = None, lr: float | None = None, epochs: int | None = None,
               batch_size: int | None = None, patience: int | None = None, loss: str | None = None,
               c_grid: str | None = None, c_search: str | None = None, max_iter: int | None = None,
               n_jobs: int | None = None, kernel: str | None = None, gamma_grid: str | None = None,
               rbf_limit: int | None = None, k_grid: str | None = None, weighting: str | None = None,
               estimator: str | None = None, estimator_params: Mapping[str, Any] | str | None = None,
               trust_module: str | None = None, candidates: Sequence[str] | None = None,
               memory_budget: int | None = None, stream: bool = False, exclude: PathLike | None = None,
               labels: Any = None, label: str | None = None, target: str | None = None,
               split_column: str | None = None, group: str | None = None, path: str = "path",
               missing: str = "error", label_separator: str | None = None, label_columns: Any = None,
               target_columns: Any = None,
               metrics_by: str | None = None, threshold: Any = None, assert_accuracy_at_least: float | None = None,
               backend: str | None = None, progress: bool = True) -> Run:
    """Stage two: fit a head on cached features and return the finished Run. `features`: a cache
    (what `extract` returned, its directory, or its name under `cache`; default the latest), or a
    list of caches of the same images to fuse. Head parameters left at None take the head's
    defaults; `memory_budget` is in MB. `exclude`: a file of images to leave out of training (an
    audit's suspects.csv, or paths or ids one a line; validation and test keep theirs). With
    `assert_accuracy_at_least`, a run whose validation accuracy is below it is kept but
    PipelineError says so (the CI gate). `head="auto"`: every head of `candidates` (default
    logreg, svm, knn, dense) fitted, each kept as a run; the one with the highest validation
    accuracy is returned, with `comparison` (every candidate's figures, and the table's path).
    `labels`: a labels table (CSV, TSV, Parquet or a dataframe) joined to the cache by `path` (or
    its `id` column): `label` its column of classes (default "label"), or `target` a soft target
    (the probability of class "1"); `split_column`, `group` and `missing` as label_spec says.
    `threshold`: a binary task's decision on the probability of its second class, "validation"
    (the one of the highest validation accuracy) or a probability; recorded, used by predict."""
    backends.select(backend)
    from pipeline.heads import head_parameters
    from pipeline.runs import Run
    from pipeline.training.train import TrainOptions
    from pipeline.training.train import train_head as fit_head

    given = {"class_weight": class_weight, "units": units, "dropout": dropout, "batch_norm": batch_norm,
             "optimizer": optimizer, "lr": lr, "epochs": epochs, "batch_size": batch_size, "patience": patience,
             "loss": loss, "c_grid": c_grid, "c_search": c_search, "max_iter": max_iter, "n_jobs": n_jobs,
             "kernel": kernel, "gamma_grid": gamma_grid, "rbf_limit": rbf_limit, "k_grid": k_grid,
             "weighting": weighting, "estimator": estimator, "estimator_params": estimator_params,
             "trust_module": trust_module}
    assert set(given) == set(head_parameters()), "every head parameter is a keyword of train_head"
    if assert_accuracy_at_least is not None and not 0 <= assert_accuracy_at_least <= 1:
        raise PipelineError(f"--assert-accuracy-at-least {assert_accuracy_at_least}: an accuracy from 0 to 1")
    if isinstance(features, str) and "," in features and not Path(features).exists():
        features = [part.strip() for part in features.split(",")]  # A,B as on the command line
    head_params = {key: value for key, value in given.items() if value is not None}
    spec = label_spec(labels, label, target, split_column, group, path, missing, label_separator, label_columns,
                      metrics_by, target_columns)

    def fit(kind: str, params: dict[str, Any], run_name: str | None) -> Any:
        return fit_head(TrainOptions(
            head=kind, features=features, cache_root=Path(cache), models=Path(models), name=run_name,
            layers=None if layer is None else list(layer), pooling=pooling, seed=seed, head_params=params,
            memory_budget=None if memory_budget is None else int(memory_budget) << 20, stream=stream,
            exclude=None if exclude is None else Path(exclude), progress=progress,
            labels=spec, threshold=threshold,
        ))

    comparison = None
    if head == "auto":  # every candidate a run; the best on validation chosen
        from pipeline.training.auto import check_candidates, compare_heads, comparison_text

        task = "classes" if spec is None else "soft" if spec.soft else "multilabel" if spec.multilabel else "classes"
        kinds = check_candidates(candidates, head_params, task)
        comparison = compare_heads(fit, kinds, head_params, Path(models), name, progress)
        summary = comparison.chosen
        _say(progress, lambda: comparison_text(comparison))
    else:
        if candidates is not None:
            raise PipelineError("--candidates applies to --head auto only")
        summary = fit(head, head_params, name)
    run = Run.open(summary.directory)
    run.summary = summary
    run.comparison = comparison  # --head auto: every candidate's figures (None otherwise)
    if comparison is None:
        headline = (f"trained {summary.config['head']['kind']} head: {summary.seconds:.1f} s fitting "
                    f"({summary.config['read']})")
        _say(progress, lambda: summaries.run_text(summary, headline))
    check_accuracy_at_least(run, assert_accuracy_at_least)
    return run


def label_spec(labels: Any, label: str | None, target: str | None, split_column: str | None, group: str | None,
               path: str, missing: str, label_separator: str | None = None, label_columns: Any = None,
               metrics_by: str | None = None, target_columns: Any = None) -> Any:
    """Where a stage's labels come from (pipeline/labelling/labelling.LabelSpec): the table `labels`
    and its columns (multi-label: `label_separator` between the labels of the label column, or
    `label_columns`, one 0/1 column a label, a list or "a,b,c"); `target_columns`: soft targets as
    one probability column a class (summing to 1); `metrics_by`: a column whose
    values the run's metrics are also given per (e.g. ELPV's cell type); None: the cache's own labels."""
    from pipeline.labelling import LabelSpec

    for flag, value in (("--label-columns", label_columns), ("--target-columns", target_columns)):
        if value is not None and not isinstance(value, str | list | tuple):
            raise PipelineError(f"{flag} {value!r}: column names, a list or 'a,b,c'")
    spec = LabelSpec(labels, path, label, target, split_column, group, missing, label_separator, label_columns,
                     metrics_by, target_columns)
    return spec if spec.given else None


def check_accuracy_at_least(run: Run, threshold: float | None) -> None:
    """PipelineError where the run's validation accuracy is below `threshold` (None: no gate)."""
    if threshold is None:
        return
    accuracy = run.metrics["validation"]["accuracy"]
    if accuracy < threshold:
        raise PipelineError(f"validation accuracy {accuracy:.4f} is below --assert-accuracy-at-least {threshold} "
                            f"(the run is kept: {run.directory})")


@checked
@kept_off
def evaluate(run: Any, *, split: str = "test", features: PathLike | None = None, tta: str = "none",
             labels: Any = None, label: str | None = None, target: str | None = None,
             split_column: str | None = None, group: str | None = None, path: str = "path", missing: str = "error",
             label_separator: str | None = None, label_columns: Any = None, target_columns: Any = None,
             backend: str | None = None) -> Run:
    """Score a head run again from its cache (or `features`, a cache of the same fingerprint):
    metrics.json and the reports of `split`. With `tta` (flip, dihedral): any run scored from its
    images, end to end, averaging the test-time views, into RUN/tta-<views>/ (the run's own
    metrics stay). `labels`...: score against a labels table instead of the labels the run was
    trained on (see train_head). Returns the run as it now stands."""
    backends.select(backend)
    from pipeline.runs import Run
    from pipeline.training.train import evaluate_run, evaluate_with_views

    spec = label_spec(labels, label, target, split_column, group, path, missing, label_separator, label_columns,
                      target_columns=target_columns)
    if tta != "none" and spec is not None:
        raise PipelineError("--tta scores a run with the labels it was trained on: drop --labels, or --tta")
    if tta != "none":  # written beside the run's own figures, into RUN/tta-<views>/
        summary = evaluate_with_views(Path(_run_path(run)), tta, split)
        scored = Run.open(summary.directory.parent)
    else:
        summary = evaluate_run(Path(_run_path(run)), split, None if features is None else Path(features),
                               labels=spec)
        scored = Run.open(summary.directory)
    scored.summary = summary
    return scored


@checked
@kept_off
def finetune(run: Any = "best", *, models: PathLike = "models", data: PathLike | None = None,
             name: str | None = None, unfreeze: str | None = None, epochs: int = 3, lr: float = 1e-4,
             momentum: float = 0.9, clipnorm: float = 1.0, batch_size: int = 16, patience: int = 3,
             precision: str | None = None, augment: str = "default", flip: str | None = None,
             rotation: float = 0.0, zoom: float = 0.0, translation: float = 0.0, contrast: float = 0.0,
             brightness: float = 0.0, saturation: float = 0.0,
             cached: bool = False, cache: PathLike | None = None, seed: int = 0, optimizer: str = "sgd",
             weight_decay: float = 0.0, schedule: str = "plateau", warmup_epochs: float = 0.0,
             label_smoothing: float = 0.0, loss: str | None = None, lr_decay: float = 1.0, head_epochs: int = 0,
             tta: str = "none", backend: str | None = None, progress: bool = True) -> Run:
    """Stage three: put a head run (a Run, its directory, or "best") back on its backbone, unfreeze
    from `unfreeze` (default the top block), train end to end with augmentation, and return the
    fine-tuned Run. `augment="none"` switches every augmentation off; `flip`, `rotation`, `zoom`,
    `translation`, `contrast`, `brightness` and `saturation` choose it (Augmentation). The recipe: `optimizer` sgd
    or adamw, `schedule` plateau or cosine (with `warmup_epochs`), `lr_decay` per block below the
    top one, `label_smoothing`, `head_epochs` of the head alone first; `loss` crossentropy or
    ordinal (default: the head run's); `tta` none, flip or dihedral views averaged when the run is
    scored (pipeline/finetuning/recipe.py, views.py, pipeline/heads/ordinal.py)."""
    backends.select(backend)
    backends.require_tensorflow("finetune (its image pipeline is tf.data)")
    from pipeline.finetuning.examples import Augmentation
    from pipeline.finetuning.finetune import FinetuneOptions
    from pipeline.finetuning.finetune import finetune as tune
    from pipeline.runs import Run

    if augment not in ("default", "none"):
        raise PipelineError(f"--augment {augment!r}: choose default or none")
    augmentation = Augmentation.off() if augment == "none" else Augmentation(
        flip or Augmentation.default(cached).flip, rotation, zoom, translation, contrast, brightness, saturation)
    summary = tune(FinetuneOptions(
        source=_run_path(run), models=Path(models), name=name, unfreeze=unfreeze, epochs=epochs, lr=lr,
        momentum=momentum, clipnorm=clipnorm, batch_size=batch_size, patience=patience, augmentation=augmentation,
        precision=precision, seed=seed, progress=progress, cached=cached,
        cache_root=None if cache is None else Path(cache), data=None if data is None else Path(data),
        optimizer=optimizer, weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing, loss=loss, lr_decay=lr_decay, head_epochs=head_epochs, tta=tta,
    ))
    tuned = Run.open(summary.directory)
    tuned.summary = summary
    return tuned


@checked
@kept_off
def predict(run: Any, images: Any, *, top: int = 3, models: PathLike = "models",
            data: PathLike | None = None, output: PathLike | None = None, max_megapixels: float = 128,
            tta: str = "none", unknown: str = "flag",
            backend: str | None = None) -> list[Prediction] | Iterator[Prediction]:
    """The `top` labels of every image (files, or folders searched for images) with any run (a Run,
    its directory, or "best"): one Prediction per image, in order, with `labels`, `probabilities`
    and, for a file that is not a readable image, `error`. `images`: one path, a list (or tuple)
    of paths, answered with a list; or any other iterable of paths (a generator), answered with a
    generator that yields each Prediction in order as its chunk of 256 paths is done, in flat
    memory. `output`: also write FILE.csv or .json (a stream is then collected to write it). A head
    run also answers `unknown_score` (the cosine distance of the image's features to the nearest
    training image) and `unknown` (beyond the run's recorded threshold, which flags 5% of its
    validation images); `unknown="reject"` gives an unknown image no labels."""
    backends.select(backend)
    from pipeline.serving.predict import Predictor, check_output, image_files, predict_stream, write_predictions

    if top < 1:
        raise PipelineError(f"--top must be a positive integer, not {top}")
    if output is not None:
        check_output(Path(output))  # before the work, not after
    targets = image_targets(images)
    predictor = Predictor(_run_path(run), Path(models), None if data is None else Path(data),
                          _max_pixels(max_megapixels), tta, unknown)
    if not isinstance(targets, list | tuple):  # a stream: answered as one
        streamed = predict_stream(predictor, (_checked_path(t) for t in targets), top)
        if output is None:
            return streamed
        results = list(streamed)
        write_predictions(results, Path(output))
        return results
    paths = [_checked_path(t) for t in targets]
    files = image_files(paths)
    if not files:
        raise PipelineError(f"no images found in {', '.join(map(str, paths)) or 'an empty list'}")
    results = predictor(files, top)
    if output is not None:
        write_predictions(results, Path(output))
    return results


def _checked_path(target: Any) -> Path:
    check_image_target(target)
    return Path(target)


@checked
@kept_off
def export(run: Any, format: str = "savedmodel", out: PathLike | None = None, *,  # noqa: A002 - the flag's name
           quantize: bool = False, precision: str = "float32", check_images: int = 500, tta: str = "none",
           models: PathLike = "models", data: PathLike | None = None, backend: str | None = None,
           progress: bool = True) -> ExportSummary:
    """Write a run (a Run, its directory, or "best") as a model that needs no pipeline: `format`
    keras, savedmodel, tflite or onnx, into `out` (default RUN/export/), with labels.txt and
    export.json beside it. `precision`: float32 (runs anywhere) or run (the run's own: keras and
    savedmodel). The export is measured against predict on up to `check_images` of the run's
    validation images (0: not measured), recorded in export.json as agreement_with_predict. `tta`
    (flip, dihedral): the model averages those test-time views inside, as predict's `tta` does
    (every format; not with `quantize`). Returns what it wrote: `path`, `format`, `bytes`, `seconds`, `details`."""
    backends.select(backend)
    backends.require_tensorflow("export (SavedModel and TFLite are TensorFlow formats)")
    from pipeline.serving.export import export_run

    summary = export_run(_run_path(run), format, None if out is None else Path(out), quantize, Path(models),
                         None if data is None else Path(data), precision, check_images, tta, progress)
    _say(progress, lambda: summaries.export_text(summary))
    return summary


@checked
@kept_off
def embeddings(features: Any = None, out: PathLike = "embeddings.parquet", *, cache: PathLike = "features",
               layer: Sequence[str] | None = None, pooling: str | None = None, labels: Any = None,
               label: str | None = None, target: str | None = None, split_column: str | None = None,
               group: str | None = None, path: str = "path", missing: str = "error",
               label_separator: str | None = None, label_columns: Any = None, target_columns: Any = None,
               progress: bool = True) -> Any:
    """Every image of a cache as a row of `out` (.parquet or .npz) with its content-hash id, path,
    class, label, split and embedding, the cache's fingerprint in the file's metadata; written shard
    by shard; unlabelled images with an empty class. `labels`...: a labels table's classes and
    splits instead of the cache's (see train_head). Returns what it wrote: `path`, `rows`,
    `dimension`, `seconds`, `metadata`."""
    from pipeline.auditing.embeddings import check_output, write_embeddings
    from pipeline.cache.reader import open_features
    from pipeline.labelling import label_cache

    check_output(Path(out))  # before the work, not after
    stores, views = open_features(features, Path(cache), None if layer is None else list(layer), pooling)
    if len(stores) > 1:
        raise PipelineError("embeddings writes one cache's vectors: name one cache (its rows carry that cache's "
                            "fingerprint)")
    spec = label_spec(labels, label, target, split_column, group, path, missing, label_separator, label_columns,
                      target_columns=target_columns)
    store = label_cache(stores[0], spec)
    return write_embeddings(store, views[0], Path(out), progress)


@checked
@kept_off
def audit(features: Any = None, *, out: PathLike | None = None, models: PathLike = "models",
          cache: PathLike = "features", folds: int = 5, similarity: float = 0.98, seed: int = 0,
          c_grid: str | None = None, memory_budget: int | None = None, labels: Any = None,
          label: str | None = None, target: str | None = None, split_column: str | None = None,
          group: str | None = None, path: str = "path", missing: str = "error", label_separator: str | None = None,
          label_columns: Any = None, target_columns: Any = None, progress: bool = True) -> Any:
    """Label suspects (out-of-fold probabilities of the logistic regression, ranked by cleanlab),
    exact and near duplicates (cross-split pairs flagged) and their pictures, for a cache (or
    several of the same images, fused), into `out` (default models/audit-<cache>). Returns an
    AuditSummary: `directory`, `images`, `suspects`, `duplicate_pairs`, `cross_split_pairs`,
    `details` (audit.json). `memory_budget` is in MB. `labels`...: audit a labels table's labels
    instead of the cache's (see train_head)."""
    from pipeline.auditing.audit import AuditOptions, run_audit

    summary = run_audit(AuditOptions(
        features=features, out=None if out is None else Path(out), models=Path(models), cache_root=Path(cache),
        folds=folds, similarity=similarity, seed=seed, c_grid=c_grid,
        memory_budget=None if memory_budget is None else int(memory_budget) << 20, progress=progress,
        labels=label_spec(labels, label, target, split_column, group, path, missing, label_separator, label_columns,
                          target_columns=target_columns)))
    _say(progress, lambda: summaries.audit_text(summary))
    return summary


@checked
@kept_off
def suggest(features: Any = None, *, model: Any = None, budget: int = 50, out: PathLike | None = None,
            cache: PathLike = "features", models: PathLike = "models", progress: bool = True) -> Any:
    """What to label next: the cache's unlabelled images ranked by the head run `model`'s
    uncertainty and by diversity in the feature space (or by diversity alone without a run), the
    first `budget` of them; `out` (a CSV) is a labels table to fill in and give back to train_head
    as a second `labels` table. `features`: a cache of the run's fingerprint (default: the run's
    own, through its labels). Returns Suggestions: `path`, `rows`, `seconds`, `details`."""
    from pipeline.auditing.suggest import suggest as rank
    from pipeline.cache.reader import open_cache
    from pipeline.runs import Run

    if out is not None and Path(out).suffix.lower() != ".csv":
        raise PipelineError(f"--out {out}: suggest writes a CSV table (FILE.csv)")
    if out is not None and not Path(out).parent.is_dir():
        raise PipelineError(f"--out {out}: the folder {Path(out).parent} does not exist")
    run = None if model is None else Run.open(_run_path(model), Path(models), kind="head")
    if run is not None and features is None:
        store = run.features(cache_root=Path(cache))  # the run's cache, through the labels it was trained on
    else:
        store = open_cache(None if features is None else Path(features), Path(cache))
        if run is not None and store.fingerprint.digest() != run.fingerprint.digest():
            raise PipelineError(f"{store.directory} holds features of another fingerprint than run {run.name} "
                                "(another backbone, size, layer or precision): give a cache extracted as the run's "
                                "was")
    found = rank(store, run, budget, None if out is None else Path(out), progress)
    _say(progress, lambda: summaries.suggest_text(found))
    return found


@checked
@kept_off
def report_page(model: Any = None, *, audit: PathLike | None = None, out: PathLike | None = None,
                split: str = "test", thumbnails: str = "auto", screenshot: PathLike | None = None,
                models: PathLike = "models", cache: PathLike = "features", progress: bool = True) -> Any:
    """One offline HTML page (the `report` command) of the run `model` and/or the audit folder
    `audit`: metrics with intervals, the confusion matrix of `split` whose cells open their images,
    the errors, the unknowns, what to label next, the audit's suspects and cross-split pairs, the
    2-D map. `out` defaults to report.html in the run's folder (else the audit's); `thumbnails`:
    "embed" (in the page), "folder" (beside it, linked relative to it) or "auto" (embedded up to
    2,000 images). `screenshot` (FILE.png): the page as headless Chromium shows it (the browser
    extra). Returns a ReportSummary: `path`, `images`, `missing`, `thumbnails`, `sections`,
    `screenshot`."""
    from pipeline.pages.report import make_report
    from pipeline.runs import Run

    if screenshot is not None:
        from pipeline.pages.browser import unavailable

        if Path(screenshot).suffix.lower() != ".png":
            raise PipelineError(f"--screenshot {screenshot}: the picture is a PNG file (FILE.png)")
        missing = unavailable()
        if missing is not None:  # before any work
            raise PipelineError(f"--screenshot needs a headless browser: {missing}")
    run = None if model is None else Run.open(_run_path(model), Path(models))
    found = make_report(run, None if audit is None else Path(audit), None if out is None else Path(out), split,
                        thumbnails, Path(cache), progress)
    if screenshot is not None:
        from pipeline.pages.browser import screenshot as picture

        found.console_errors = picture(found.path, Path(screenshot))
        found.screenshot = Path(screenshot)
    _say(progress, lambda: summaries.report_text(found))
    return found


@checked
def list_runs(models: PathLike = "models", *, data: PathLike | None = None) -> list[dict[str, Any]]:
    """Every finished run under `models` (of the image folder `data` if given) as a row, best
    validation accuracy first; a damaged run is listed with its `problem`."""
    from pipeline.runs import list_runs as rows

    return rows(Path(models), None if data is None else Path(data))


@checked
def list_caches(cache: PathLike = "features") -> list[dict[str, Any]]:
    """Every feature cache under `cache`, newest first (the one train_head takes by default), as a
    row: name, directory, backbone, image_size, layers, pooling, precision, data, images, updated."""
    from pipeline.cache.catalogue import cache_rows

    return cache_rows(Path(cache))


def list_backbones() -> list[str]:
    """The backbones extract accepts."""
    from pipeline.backbone.registry import BACKBONES

    return list(BACKBONES)


@checked
def open_run(run: Any = "best", *, models: PathLike = "models", data: PathLike | None = None) -> Run:
    """A finished run (its directory, or "best"), read and checked."""
    from pipeline.runs import Run

    return Run.open(_run_path(run), Path(models), data=None if data is None else Path(data))
