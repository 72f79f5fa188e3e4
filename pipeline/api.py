"""The stages as Python functions: the front door (`import pipeline`) and what the command line calls.

Each function takes its main input positionally and the command's flags as keyword arguments
(`--image-size` is `image_size`, `--no-progress` is `progress=False`). Each keyword is declared
once, here, in the signature: its name, type and default, and in its annotation an Option with its
help, choices and rule (pipeline/options.py). The command line builds its flags from these
declarations (pipeline/cli/flags.py) and passes its parsed flags straight through, docs/flags.md
is generated from them, and both are checked by the same code: the annotations (arguments.py),
the options' own constructors (ExtractOptions, TrainOptions, FinetuneOptions, Augmentation) and
the stage functions behind them. A new option is one keyword argument here. The labels-table
keywords, the same for every stage that reads labels, are one keyword group, `**table:
Unpack[LabelsTable]` (pipeline/options.py): spelled out in each stage's signature and flags.

    cache = extract("data/elpv", backbone="efficientnet_lite0")
    run = train_head(cache, head="logreg")
    predict(run, ["data/elpv/defective/cell0001.png"])

Errors a user can cause are `PipelineError` with a one-line message.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Unpack

from pipeline import backend as backends
from pipeline import summaries
from pipeline.arguments import check_image_target, checked, image_targets
from pipeline.chatter import kept_off
from pipeline.errors import PipelineError, spoken_by_command_line
from pipeline.images.formats import MEGAPIXEL
from pipeline.options import (  # noqa: F401 - the declarations the signatures below are annotated with
    TABLE_GROUP,
    AmongRunsOf,
    Backend,
    Cache,
    LabelsTable,
    Layers,
    MemoryBudget,
    Option,
    PathLike,
    Progress,
    ProgressOutput,
    Seed,
    WhereBestLooks,
    backbone_help,
    backend_option,
    defined,
    flip_help,
    heads_help,
    image_size_help,
    layer_help,
    missing_rows,
    path_column,
    unfreeze_help,
    weights_help,
    with_defaults,
)

if TYPE_CHECKING:
    from pipeline.extraction.extract import ExtractedCache
    from pipeline.runs import Run, RunResult
    from pipeline.serving.export import ExportSummary
    from pipeline.serving.predict import Prediction

DENSE, LOGREG, KNN = "dense head", "logreg head", "knn head"  # train-head's sections of --help
SVM, GENERIC = "svm head (--c-grid too: 1e-1:1e2:4)", "sklearn head: any scikit-learn classifier"
RECIPE = "the recipe"  # finetune's


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
def extract(
    data: Annotated[Any, Option(
        "DIR/<class>/<image> or DIR/{train,validation|val,test}/<class>/<image>; a folder of images without class "
        "folders is extracted unlabelled; with --images, the folder the table's paths are relative to (default: the "
        "table's folder)", rule="path")] = None, *,
    images: Annotated[Any, Option(
        "a CSV, TSV or Parquet table with a column of image paths; labels come at train-head (--labels TABLE, the "
        "same file)", metavar="TABLE", group=TABLE_GROUP)] = None,
    path: Annotated[str, path_column("--images", TABLE_GROUP)] = "path",
    missing: Annotated[str, missing_rows("--images", TABLE_GROUP)] = "error",
    backbone: Annotated[str, Option(backbone_help())] = "vgg16",
    image_size: Annotated[int | None, Option(image_size_help(), rule="positive")] = None,
    pooling: Annotated[str | None, Option(
        "none keeps the full feature map (default; avg for the EfficientNet-Lite backbones, whose default layers are "
        "four)", choices=defined("backbone.pooling:POOLINGS"))] = None,
    layer: Annotated[Sequence[str] | None, Option(layer_help(), rule="names", metavar="NAME[,NAME...]")] = None,
    precision: Annotated[str | None, Option(
        "default: mixed on a GPU, bf16 on a CPU with bf16 hardware, else fp32; int8: the backbone quantised and run "
        "by ONNX Runtime, calibrated on the data's training images",
        choices=defined("backbone.precision:PRECISIONS"))] = None,
    weights: Annotated[str, Option(weights_help())] = "imagenet",
    preprocessing: Annotated[str | None, Option(
        "override the preprocessing that follows from --weights (for a weights file)",
        choices=defined("backbone.registry:PREPROCESSING"))] = None,
    batch_size: Annotated[int, Option(rule="positive")] = 32,
    shard_size: Annotated[int, Option("images per HDF5 shard", rule="positive")] = 1024,
    cache: Cache = "features",
    val_fraction: Annotated[float | None, Option(
        "validation share of each class (default 0.15): of DIR/<class>/, or carved out of train/ where a split "
        "layout has no validation folder")] = None,
    test_fraction: Annotated[float | None, Option(
        "test share of each class (default 0.15): of DIR/<class>/, or carved out of train/ where a split layout has "
        "no test folder")] = None,
    split_seed: Annotated[int, Option("for the splits chosen by file name")] = 0,
    rehash: Annotated[bool, Option("hash every file again instead of trusting remembered size and mtime")] = False,
    strict: Annotated[bool, Option(
        "stop at the first file that cannot be decoded (default: skip and list it)")] = False,
    max_megapixels: Annotated[float, Option(
        "images of more decoded pixels than this many millions (10^6) are held back with an error, never decoded "
        "(default 128)", rule="positive_float")] = 128,
    engine: Annotated[str, Option(
        "local: this process (default); ray: Ray Data across processes, nodes and GPUs",
        choices=defined("extraction.engine:ENGINES"))] = "local",
    ray_address: Annotated[str | None, Option(
        "--engine ray: join this running cluster (default: a local instance for the command)",
        metavar="auto|HOST:PORT")] = None,
    workers: Annotated[int | None, Option(
        "--engine ray: backbone workers (default: one per GPU, else one per node)", rule="positive")] = None,
    backend: Annotated[str | None, backend_option("; images decode with Pillow on jax")] = None,
    progress: Progress = True,
) -> ExtractedCache:
    """Stage one: bring the feature cache of the image folder `data` up to date (every new or
    changed image through the frozen backbone once) and return it, opened: an ExtractedCache (a
    FeatureStore with its `path`, `fingerprint`, `class_names`) with this extract's `summary`
    (images, new, reused, skipped, seconds, notes). A folder without class folders is extracted
    unlabelled. `images`: a table of image paths instead (a CSV, TSV or Parquet file, or a
    dataframe; its column `path`), relative to `data` where given, else to the table's folder;
    also accepted as `data` itself. `missing`: "skip" goes on past paths that are not image files."""
    from pipeline.labelling import is_dataframe

    if images is None and data is not None and (is_dataframe(data) or Path(data).is_file()):
        images, data = data, None  # extract(table) as extract(images=table)
    backends.select(backend)
    from pipeline.data.dataset import SplitConfig
    from pipeline.extraction.extract import ExtractedCache, ExtractOptions, extract_features

    summary = extract_features(ExtractOptions(
        data=None if data is None else Path(data), images=images, path_column=path, missing=missing,
        backbone=backbone, image_size=image_size, pooling=pooling,
        layers=None if layer is None else list(layer), precision=precision, weights=weights,
        preprocessing=preprocessing, batch_size=batch_size, shard_size=shard_size, cache_root=Path(cache),
        splits=SplitConfig.from_flags(val_fraction, test_fraction, split_seed), rehash=rehash, strict=strict,
        max_pixels=_max_pixels(max_megapixels), progress=progress, engine=engine, ray_address=ray_address,
        workers=workers,
    ))
    _say(progress, lambda: summaries.extract_text(summary))
    return ExtractedCache(summary)


@checked
@kept_off
def train_head(
    features: Annotated[Any, Option(
        "a cache directory from extract, or its name under --cache (default: the latest); several, comma-separated "
        "(A,B), fuse their features: the same images, one image size, other backbones", rule="caches")] = None, *,
    head: Annotated[str, Option(heads_help())] = "logreg",
    candidates: Annotated[Sequence[str] | None, Option(
        "--head auto: the heads to fit and compare, each kept as a run, the best on validation chosen (default "
        "logreg,svm,knn,dense)", metavar="HEAD[,HEAD...]", rule="text")] = None,
    cache: Cache = "features",
    models: Annotated[PathLike, Option("runs root (default models/)", rule="path")] = "models",
    name: Annotated[str | None, Option("run name (default: from dataset, head, features, settings)")] = None,
    layer: Layers = None,
    pooling: Annotated[str | None, Option(
        "pool spatial features at read time (default: as extracted; none flattens)",
        choices=defined("backbone.pooling:POOLINGS"))] = None,
    seed: Seed = 0,
    class_weight: Annotated[str | None, Option(
        "weigh classes inversely to their frequency (default none)",
        choices=defined("heads.base:CLASS_WEIGHTS"))] = None,
    units: Annotated[int | None, Option("hidden units (256)", rule="positive", group=DENSE)] = None,
    dropout: Annotated[float | None, Option("dropout rate (0.5)", group=DENSE)] = None,
    batch_norm: Annotated[bool | None, Option("BatchNormalization after Dense", group=DENSE)] = None,
    optimizer: Annotated[str | None, Option("rmsprop (default), adam or sgd", group=DENSE)] = None,
    lr: Annotated[float | None, Option("learning rate (1e-3)", group=DENSE)] = None,
    epochs: Annotated[int | None, Option("at most this many epochs (50)", rule="positive", group=DENSE)] = None,
    batch_size: Annotated[int | None, Option("(32)", rule="positive", group=DENSE)] = None,
    patience: Annotated[int | None, Option(
        "epochs without validation accuracy improvement before stopping (4)", rule="positive", group=DENSE)] = None,
    loss: Annotated[str | None, Option(
        "crossentropy (default), or ordinal: the classes, in their sorted order, are ordered levels (ELPV's "
        "defect-0.00 .. defect-1.00): the mean cross-entropy of every cut 'at or above level k'; metrics.json adds "
        "each cut's accuracy and the error in levels", choices=defined("heads.ordinal:LOSSES"), group=DENSE)] = None,
    c_grid: Annotated[str | None, Option(
        "log-spaced C values, or C1,C2,... (1e-6:1e5:45; --c-search path fits about 15 of them, grid all 45)",
        metavar="LOW:HIGH:COUNT", group=LOGREG)] = None,
    c_search: Annotated[str | None, Option(
        "path (default): C ascending, warm-started, about one a decade, stopped three decades after validation stops "
        "improving, then refined between the best's neighbours; grid: every C of --c-grid (grids of 12 values or "
        "fewer are always fitted whole)", choices=defined("heads.logreg:C_SEARCHES"), group=LOGREG)] = None,
    max_iter: Annotated[int | None, Option("L-BFGS iterations per fit (1000)", rule="positive", group=LOGREG)] = None,
    n_jobs: Annotated[int | None, Option("parallel fits (-1: all cores)", group=LOGREG)] = None,
    kernel: Annotated[str | None, Option(
        "auto (default): rbf up to --rbf-limit training images, linear above", choices=defined("heads.svm:KERNELS"),
        group=SVM)] = None,
    gamma_grid: Annotated[str | None, Option(
        "the RBF kernel's widths to try, as multiples of 1/features (0.25,1,4)", metavar="G1,G2,...",
        group=SVM)] = None,
    rbf_limit: Annotated[int | None, Option(
        "training images up to which auto uses the RBF kernel (5000: bench/RESULTS.md says why)", rule="positive",
        metavar="N", group=SVM)] = None,
    k_grid: Annotated[str | None, Option("neighbours to try (1,3,5,10,20)", metavar="K1,K2,...", group=KNN)] = None,
    weighting: Annotated[str | None, Option(
        "votes uniform, or weighted by 1/cosine distance; search (default) tries both",
        choices=defined("heads.knn:WEIGHTING_CHOICES"), group=KNN)] = None,
    estimator: Annotated[str | None, Option(
        "the classifier's class, e.g. sklearn.ensemble.HistGradientBoostingClassifier (default "
        "sklearn.linear_model.LogisticRegression)", metavar="DOTTED.NAME", group=GENERIC)] = None,
    estimator_params: Annotated[Mapping[str, Any] | str | None, Option(
        "the estimator's parameters as a JSON object, e.g. '{\"max_iter\": 200}'", metavar="JSON", flag="--params",
        rule="text", group=GENERIC)] = None,
    trust_module: Annotated[str | None, Option(
        "import estimators from these modules outside scikit-learn (importing runs their code; loading the run later "
        "needs BOTTLENECK_PIPELINE_TRUST=MODULE)", metavar="MODULE[,MODULE...]", group=GENERIC)] = None,
    memory_budget: Annotated[int | None, Option(
        "read features into memory up to this size, stream by shard above (default: a quarter of physical memory)",
        rule="positive", metavar="MB")] = None,
    stream: Annotated[bool, Option("stream features by shard even when they fit")] = False,
    exclude: Annotated[PathLike | None, Option(
        "leave these images out of training (never out of validation or test): an audit's suspects.csv, or a file of "
        "paths or content-hash ids, one a line", rule="path", metavar="FILE")] = None,
    assert_accuracy_at_least: Annotated[float | None, Option(
        "exit non-zero if validation accuracy is below X (0..1), e.g. to gate CI", metavar="X")] = None,
    metrics_by: Annotated[str | None, Option(
        "--labels' column whose values the metrics are also given per, e.g. a cell type (metrics.json: by_group)",
        metavar="COL")] = None,
    threshold: Annotated[Any, Option(
        "two classes: decide the second class at or above this probability of it, or the one of the highest "
        "validation accuracy (validation); recorded in the run, used by its metrics, predict and export.json "
        "(default: the most probable class)", metavar="validation|P", rule="text")] = None,
    backend: Backend = None,
    progress: ProgressOutput = True,
    **table: Unpack[LabelsTable],
) -> RunResult:
    """Stage two: fit a head on cached features and return the finished run: a RunResult (a Run, with
    this fit's `summary`). `features`: a cache
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
    from pipeline.runs import RunResult
    from pipeline.training.train import TrainOptions, run_training

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
    spec = label_spec(table, metrics_by)

    def fit(kind: str, params: dict[str, Any], run_name: str | None) -> Any:
        return run_training(TrainOptions(
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
    run = RunResult.of(summary.directory, summary, comparison)  # --head auto: every candidate's figures
    if comparison is None:
        headline = (f"trained {summary.config['head']['kind']} head: {summary.seconds:.1f} s fitting "
                    f"({summary.config['read']})")
        _say(progress, lambda: summaries.run_text(summary, headline))
    check_accuracy_at_least(run, assert_accuracy_at_least)
    return run


def label_spec(table: Mapping[str, Any], metrics_by: str | None = None) -> Any:
    """Where a stage's labels come from (pipeline/labelling/labelling.LabelSpec), read from the
    labels-table keywords a stage received (`table`, pipeline/options.LabelsTable): the table
    `labels` and its columns (multi-label: `label_separator` between the labels of the label column,
    or `label_columns`, one 0/1 column a label, a list or "a,b,c"); `target_columns`: soft targets
    as one probability column a class (summing to 1); `metrics_by`: a column whose values the run's
    metrics are also given per (e.g. ELPV's cell type); None: the cache's own labels."""
    from pipeline.labelling import LabelSpec

    given = with_defaults(LabelsTable, table)
    for flag, value in (("--label-columns", given["label_columns"]), ("--target-columns", given["target_columns"])):
        if value is not None and not isinstance(value, str | list | tuple):
            raise PipelineError(f"{flag} {value!r}: column names, a list or 'a,b,c'")
    spec = LabelSpec(given["labels"], given["path"], given["label"], given["target"], given["split_column"],
                     given["group"], given["missing"], given["label_separator"], given["label_columns"], metrics_by,
                     given["target_columns"])
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
def evaluate(
    run: Annotated[Any, Option("a run directory, e.g. models/NAME", flag="--model", rule="path", required=True)], *,
    split: Annotated[str, Option("whose reports to write: train, validation, test")] = "test",
    features: Annotated[PathLike | None, Option(
        "the cache to read (default: the one the run was trained on)", rule="path")] = None,
    tta: Annotated[str, Option(
        "score the run (head or fine-tuned) from its images, averaging test-time views: flip (2) or dihedral (8); "
        "written to RUN/tta-VIEWS/ (default none: from the cache)", choices=defined("images.views:TTA"))] = "none",
    backend: Backend = None,
    **table: Unpack[LabelsTable],
) -> RunResult:
    """Score a head run again from its cache (or `features`, a cache of the same fingerprint):
    metrics.json and the reports of `split`. With `tta` (flip, dihedral): any run scored from its
    images, end to end, averaging the test-time views, into RUN/tta-<views>/ (the run's own
    metrics stay). `labels`...: score against a labels table instead of the labels the run was
    trained on (see train_head). Returns the run as it now stands, with this scoring's `summary`
    (a RunResult)."""
    backends.select(backend)
    from pipeline.runs import RunResult
    from pipeline.training.train import evaluate_run, evaluate_with_views

    spec = label_spec(table)
    if tta != "none" and spec is not None:
        raise PipelineError("--tta scores a run with the labels it was trained on: drop --labels, or --tta")
    if tta != "none":  # written beside the run's own figures, into RUN/tta-<views>/
        summary = evaluate_with_views(Path(_run_path(run)), tta, split)
        return RunResult.of(summary.directory.parent, summary)
    summary = evaluate_run(Path(_run_path(run)), split, None if features is None else Path(features), labels=spec)
    return RunResult.of(summary.directory, summary)


@checked
@kept_off
def finetune(
    run: Annotated[Any, Option(
        "a head run directory, or best (highest validation accuracy; default)", flag="--from")] = "best", *,
    models: Annotated[PathLike, Option(rule="path")] = "models",
    data: Annotated[PathLike | None, Option(
        "--from best: choose among the head runs of this image folder (needed where runs of several folders stand "
        "side by side)", rule="path")] = None,
    name: Annotated[str | None, Option("run name (default: <head run>-finetuned-<unfreeze>)")] = None,
    unfreeze: Annotated[str | None, Option(unfreeze_help())] = None,
    epochs: Annotated[int, Option("(3: CPUs are slow; more on a GPU)", rule="positive")] = 3,
    lr: Annotated[float, Option("learning rate (1e-4) of the head and the top unfrozen block")] = 1e-4,
    momentum: Annotated[float, Option()] = 0.9,
    clipnorm: Annotated[float, Option("clip gradients to this norm (0: off; default 1)")] = 1.0,
    batch_size: Annotated[int, Option(rule="positive")] = 16,
    patience: Annotated[int, Option(
        "epochs without validation accuracy improvement before stopping (3)", rule="positive")] = 3,
    precision: Annotated[str | None, Option(
        "default: as the features were extracted (bf16 trains in mixed bfloat16)",
        choices=defined("backbone.precision:TRAINING_PRECISIONS"))] = None,
    augment: Annotated[str, Option(
        "none switches every augmentation off",
        choices=defined("finetuning.examples:AUGMENT"))] = "default",
    flip: Annotated[str | None, Option(flip_help(), choices=defined("finetuning.examples:Augmentation.FLIPS"))] = None,
    rotation: Annotated[float, Option("fraction of a full turn, e.g. 0.05 (default 0: off)")] = 0.0,
    zoom: Annotated[float, Option("e.g. 0.1 (default 0: off)")] = 0.0,
    translation: Annotated[float, Option("e.g. 0.05 (default 0: off)")] = 0.0,
    contrast: Annotated[float, Option("e.g. 0.1 (default 0: off)")] = 0.0,
    brightness: Annotated[float, Option(
        "photos: scale each image's pixels by a factor from [1-B, 1+B], e.g. 0.2 (default 0: off)")] = 0.0,
    saturation: Annotated[float, Option(
        "photos: scale each image's colour saturation by a factor from [1-S, 1+S], e.g. 0.2 (default 0: off; gray "
        "images stay gray)")] = 0.0,
    cached: Annotated[bool, Option(
        "train on cached activations of the layer below --unfreeze (e.g. block4_pool for block5; extract them with "
        "--layer NAME --pooling none): no pass through the frozen blocks per epoch; augmentation flips the cached "
        "maps")] = False,
    cache: Annotated[PathLike | None, Option(
        "--cached: where to look for that cache (default: beside the head's cache)", rule="path")] = None,
    seed: Seed = 0,
    optimizer: Annotated[str, Option(
        "sgd with --momentum (default), or adamw (decoupled --weight-decay)",
        choices=defined("finetuning.recipe:OPTIMIZERS"),
        group=RECIPE)] = "sgd",
    weight_decay: Annotated[float, Option("(default 0)", group=RECIPE)] = 0.0,
    schedule: Annotated[str, Option(
        "plateau: halve the rate when validation loss stalls (default); cosine: a linear warm-up over "
        "--warmup-epochs, then a cosine decay to 0 at the last epoch", choices=defined("finetuning.recipe:SCHEDULES"),
        group=RECIPE)] = "plateau",
    warmup_epochs: Annotated[float, Option("with --schedule cosine (default 0)", group=RECIPE)] = 0.0,
    label_smoothing: Annotated[float, Option("e.g. 0.1 (default 0: off)", group=RECIPE)] = 0.0,
    loss: Annotated[str | None, Option(
        "ordinal: the classes, in their sorted order, are ordered levels (see train-head --loss); default: the head "
        "run's loss", choices=defined("heads.ordinal:LOSSES"), group=RECIPE)] = None,
    lr_decay: Annotated[float, Option(
        "discriminative rates: each block below the top unfrozen one learns at this factor of the one above (e.g. "
        "0.5; default 1: one rate)", group=RECIPE)] = 1.0,
    head_epochs: Annotated[int, Option(
        "of --epochs, train the head alone first (the backbone frozen), then unfreeze (default 0)",
        group=RECIPE)] = 0,
    tta: Annotated[str, Option(
        "score the run averaging test-time views: flip (2) or dihedral (8, for images without an up); default none",
        choices=defined("images.views:TTA"), group=RECIPE)] = "none",
    backend: Annotated[str | None, backend_option("; fine-tuning runs on tensorflow")] = None,
    progress: Annotated[bool, Option(flag="--no-progress", negated=True)] = True,
) -> RunResult:
    """Stage three: put a head run (a Run, its directory, or "best") back on its backbone, unfreeze
    from `unfreeze` (default the top block), train end to end with augmentation, and return the
    fine-tuned run (a RunResult: the Run, with this training's `summary`). `augment="none"` switches
    every augmentation off; `flip`, `rotation`, `zoom`,
    `translation`, `contrast`, `brightness` and `saturation` choose it (Augmentation). The recipe: `optimizer` sgd
    or adamw, `schedule` plateau or cosine (with `warmup_epochs`), `lr_decay` per block below the
    top one, `label_smoothing`, `head_epochs` of the head alone first; `loss` crossentropy or
    ordinal (default: the head run's); `tta` none, flip or dihedral views averaged when the run is
    scored (pipeline/finetuning/recipe.py, views.py, pipeline/heads/ordinal.py)."""
    backends.select(backend)
    backends.require_tensorflow("finetune (its image pipeline is tf.data)")
    from pipeline.finetuning.examples import AUGMENT, Augmentation
    from pipeline.finetuning.finetune import FinetuneOptions, run_finetuning
    from pipeline.runs import RunResult

    if augment not in AUGMENT:
        raise PipelineError(f"--augment {augment!r}: choose {' or '.join(AUGMENT)}")
    augmentation = Augmentation.off() if augment == "none" else Augmentation(
        flip or Augmentation.default(cached).flip, rotation, zoom, translation, contrast, brightness, saturation)
    summary = run_finetuning(FinetuneOptions(
        source=_run_path(run), models=Path(models), name=name, unfreeze=unfreeze, epochs=epochs, lr=lr,
        momentum=momentum, clipnorm=clipnorm, batch_size=batch_size, patience=patience, augmentation=augmentation,
        precision=precision, seed=seed, progress=progress, cached=cached,
        cache_root=None if cache is None else Path(cache), data=None if data is None else Path(data),
        optimizer=optimizer, weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing, loss=loss, lr_decay=lr_decay, head_epochs=head_epochs, tta=tta,
    ))
    return RunResult.of(summary.directory, summary)


@checked
@kept_off
def predict(
    run: Annotated[Any, Option(
        "a run directory, e.g. models/NAME, or best (highest validation accuracy)", flag="--model", rule="path",
        required=True)],
    images: Annotated[Any, Option(rule="path", positional=True, metavar="IMAGE_OR_DIR")], *,
    top: Annotated[int, Option("labels per image (3)", rule="positive")] = 3,
    models: WhereBestLooks = "models",
    data: AmongRunsOf = None,
    output: Annotated[PathLike | None, Option("also write FILE.csv or FILE.json", rule="path")] = None,
    max_megapixels: Annotated[float, Option(
        "images of more decoded pixels than this many millions (10^6) get an error instead of a prediction (default "
        "128)", rule="positive_float")] = 128,
    unknown: Annotated[str, Option(
        "an image farther from the run's training images than the run's recorded threshold (5%% of its validation "
        "images are): flag it and keep its labels (default), or reject it (no labels); head runs",
        choices=defined("serving.predict:UNKNOWN"))] = "flag",
    tta: Annotated[str, Option(
        "average the probabilities over test-time views: flip (2) or dihedral (8, for images without an up); "
        "default none", choices=defined("images.views:TTA"))] = "none",
    backend: Annotated[str | None, backend_option("; images decode with Pillow on jax")] = None,
) -> list[Prediction] | Iterator[Prediction]:
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
def export(
    run: Annotated[Any, Option("a run directory, e.g. models/NAME, or best", flag="--model", required=True)],
    format: Annotated[str, Option(  # noqa: A002 - the flag's name
        "keras: one .keras file; savedmodel: for TF Serving (default); tflite: for mobile; onnx: for ONNX Runtime, "
        "OpenVINO, TensorRT, Triton", choices=defined("serving.formats:NAMES"))] = "savedmodel",
    out: Annotated[PathLike | None, Option("output folder (default: RUN/export/)", rule="path")] = None, *,
    quantize: Annotated[bool, Option(
        "tflite: dynamic-range int8 weights; onnx: int8 weights (ONNX Runtime), measured against float32 on the "
        "run's validation images and refused past the documented threshold")] = False,
    precision: Annotated[str, Option(
        "float32: runs anywhere (default); run: computes in the run's precision (bf16 when extract chose it), as "
        "predict does: keras and savedmodel only (TFLite and ONNX Runtime have no bfloat16 kernels)",
        choices=defined("serving.formats:PRECISIONS"))] = "float32",
    check_images: Annotated[int, Option(
        "measure the export against predict on up to N of the run's validation images (accuracy, largest "
        "probability difference), printed and recorded in export.json (default 500; 0: skip)", rule="non_negative",
        metavar="N")] = 500,
    tta: Annotated[str, Option(
        "average test-time views inside the model, as predict --tta does: flip (2 passes) or dihedral (8, for images "
        "without an up); every format, not with --quantize (default none)",
        choices=defined("images.views:TTA"))] = "none",
    models: WhereBestLooks = "models",
    data: AmongRunsOf = None,
    backend: Annotated[str | None, backend_option(
        "; SavedModel and TFLite are TensorFlow formats: export runs on tensorflow")] = None,
    progress: ProgressOutput = True,
) -> ExportSummary:
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
def embeddings(
    features: Annotated[Any, Option(
        "a cache directory, or its name under --cache (default: the latest)", rule="caches")] = None,
    out: Annotated[PathLike, Option(
        "FILE.parquet (default embeddings.parquet) or FILE.npz (with FILE.json beside it)",
        rule="path")] = "embeddings.parquet", *,
    cache: Cache = "features",
    layer: Annotated[Sequence[str] | None, Option(
        "cached layer(s) to write, concatenated (default: all the cache holds)", rule="names",
        metavar="NAME[,NAME...]")] = None,
    pooling: Annotated[str | None, Option(
        "pool spatial features (default: as extracted; none flattens)",
        choices=defined("backbone.pooling:POOLINGS"))] = None,
    progress: Progress = True,
    **table: Unpack[LabelsTable],
) -> Any:
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
    spec = label_spec(table)
    store = label_cache(stores[0], spec)
    return write_embeddings(store, views[0], Path(out), progress)


@checked
@kept_off
def audit(
    features: Annotated[Any, Option(
        "a cache directory, or its name under --cache (default: the latest); several (A,B): their features fused",
        rule="caches")] = None, *,
    cache: Cache = "features",
    out: Annotated[PathLike | None, Option(
        "the audit's folder (default: models/audit-<cache directory name>)", rule="path")] = None,
    models: Annotated[PathLike, Option("where the default folder goes", rule="path")] = "models",
    folds: Annotated[int, Option("stratified folds for the out-of-fold probabilities (5)", rule="positive")] = 5,
    c_grid: Annotated[str | None, Option(
        "the C values the first fold searches (1e-2:1e2:5); the other folds fit the C it chose. One value (e.g. 1.0) "
        "is quickest", metavar="LOW:HIGH:COUNT")] = None,
    similarity: Annotated[float, Option(
        "cosine similarity from which two images count as near-duplicates (0.98; see docs/commands.md, "
        "audit)")] = 0.98,
    seed: Seed = 0,
    memory_budget: MemoryBudget = None,
    progress: Progress = True,
    **table: Unpack[LabelsTable],
) -> Any:
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
        labels=label_spec(table)))
    _say(progress, lambda: summaries.audit_text(summary))
    return summary


@checked
@kept_off
def suggest(
    features: Annotated[Any, Option("a cache of the run's fingerprint (default: the run's own)", rule="path")] = None,
    *,
    cache: Cache = "features",
    model: Annotated[Any, Option("a head run (its uncertainty ranks the images); none: by diversity alone")] = None,
    models: WhereBestLooks = "models",
    budget: Annotated[int, Option("how many images to suggest (50)", rule="positive")] = 50,
    out: Annotated[PathLike | None, Option(
        "FILE.csv: the suggestions as a labels table to fill in and give back with --labels", rule="path")] = None,
    progress: ProgressOutput = True,
) -> Any:
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
def report_page(
    model: Annotated[Any, Option("a run directory, or best")] = None, *,
    audit: Annotated[PathLike | None, Option("an audit's folder (made by audit)", rule="path")] = None,
    out: Annotated[PathLike | None, Option(
        "FILE.html (default: report.html in the run's folder, else in the audit's)", rule="path")] = None,
    split: Annotated[str, Option("the split whose images the matrix opens: train, validation, test (test)")] = "test",
    thumbnails: Annotated[str, Option(
        "embed: in the page; folder: beside it (FILE_files/), linked relative to it; auto: embedded up to 2,000 "
        "images (auto)", choices=defined("pages.thumbnails:MODES"))] = "auto",
    screenshot: Annotated[PathLike | None, Option(
        "also a picture of the page in headless Chromium (the [browser] extra)", rule="path",
        metavar="FILE.png")] = None,
    models: WhereBestLooks = "models",
    cache: Cache = "features",
    progress: Progress = True,
) -> Any:
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
def list_runs(
    models: Annotated[PathLike, Option(rule="path")] = "models", *,
    data: Annotated[PathLike | None, Option("only the runs trained on this image folder", rule="path")] = None,
) -> list[dict[str, Any]]:
    """Every finished run under `models` (of the image folder `data` if given) as a row, best
    validation accuracy first; a damaged run is listed with its `problem`."""
    from pipeline.runs import list_runs as rows

    return rows(Path(models), None if data is None else Path(data))


@checked
def list_caches(cache: Cache = "features") -> list[dict[str, Any]]:
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
