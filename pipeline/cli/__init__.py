"""The command line (`run_pipeline.py` or `bottleneck-pipeline`): parses arguments, calls one
function of pipeline.api per stage with the flags as its keyword arguments, and prints.

Errors a user can cause print one line on stderr and exit non-zero; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import api, summaries
from pipeline.backbone.pooling import POOLINGS
from pipeline.backbone.registry import BACKBONES, PREPROCESSING
from pipeline.chatter import library_warnings_quiet, native_chatter_filtered
from pipeline.errors import PipelineError, speak_as_command_line
from pipeline.finetuning.examples import Augmentation
from pipeline.heads import HEADS
from pipeline.pages.thumbnails import MODES as THUMBNAIL_MODES
from pipeline.serving.formats import NAMES as EXPORT_FORMATS


def _cache_list(value: str) -> list[Path]:
    """--features A or A,B (fused); an empty name between commas is refused."""
    if "," not in value or Path(value).exists():
        return [Path(value)]
    names = value.split(",")
    if any(not name.strip() for name in names):
        raise argparse.ArgumentTypeError(f"{value!r}: name caches separated by commas, e.g. CACHE_A,CACHE_B")
    return [Path(name.strip()) for name in names]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _layers(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _add_backend(command: argparse.ArgumentParser, note: str = "") -> None:
    command.add_argument("--backend", default=None, choices=("tensorflow", "jax"),
                         help="the Keras backend (default: KERAS_BACKEND if set, else tensorflow)" + note)


def _add_label_flags(command: argparse.ArgumentParser) -> None:
    """The labels-table flags, the same for every command that reads labels (docs/formats.md: The
    labelling table)."""
    group = command.add_argument_group("labels from a table (default: the cache's class folders)")
    group.add_argument("--labels", default=None, action="append", metavar="TABLE",
                       help="a CSV, TSV or Parquet table of images and labels, joined to the cache by path (relative "
                            "to the table's folder or the data folder, or absolute) or by an id column (content "
                            "sha256); it relabels the images it names (an audit's suspects.csv too), others keep the "
                            "cache's labels; a row with an empty label makes its image unlabelled. Given again, each "
                            "table relabels over the ones before (labels.csv, then suggestions.csv filled in)")
    group.add_argument("--label-column", dest="label", default=None, metavar="COL",
                       help="the table's column of classes, one a row (default: label)")
    group.add_argument("--target-column", dest="target", default=None, metavar="COL",
                       help="a soft target instead: the probability (0..1) of class 1 of a binary task, e.g. ELPV's "
                            "defect probability (logreg and dense heads; images the table does not name are "
                            "unlabelled)")
    group.add_argument("--label-separator", default=None, metavar="SEP",
                       help="multi-label: the label column holds several labels an image, split by SEP (e.g. ;)")
    group.add_argument("--label-columns", default=None, metavar="A,B,...",
                       help="multi-label: one 0/1 column a label (logreg and dense heads: one sigmoid a label, "
                            "each label's threshold chosen on validation)")
    group.add_argument("--split-column", default=None, metavar="COL",
                       help="train, validation (val) or test per row (default: the cache's split, else a stable "
                            "rule from the content id, stratified by class)")
    group.add_argument("--group-column", dest="group", default=None, metavar="COL",
                       help="images of one group (a patient, a module, a cell type) are kept in one split")
    _add_path_flags(group, "--labels")


def _add_path_flags(group: Any, table: str) -> None:
    group.add_argument("--path-column", dest="path", default="path", metavar="COL",
                       help=f"{table}'s column of image paths (default: path)")
    group.add_argument("--missing", default="error", choices=("error", "skip"),
                       help=f"rows of {table} that name no image: error (default) or skip them")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Transfer-learning image classification in stages: extract caches a frozen backbone's features "
                    "of an image folder once; train-head fits heads on them in seconds; finetune trains a head with "
                    "its backbone end to end; predict and export use any run.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    extract = commands.add_parser("extract", help="stage one: cache backbone features of an image folder")
    extract.add_argument("--data", type=Path, default=None,
                         help="DIR/<class>/<image> or DIR/{train,validation|val,test}/<class>/<image>; a folder "
                              "of images without class folders is extracted unlabelled; with --images, the folder "
                              "the table's paths are relative to (default: the table's folder)")
    table = extract.add_argument_group("images from a table instead of a folder scan (extracted unlabelled)")
    table.add_argument("--images", default=None, metavar="TABLE",
                       help="a CSV, TSV or Parquet table with a column of image paths; labels come at train-head "
                            "(--labels TABLE, the same file)")
    _add_path_flags(table, "--images")
    extract.add_argument("--backbone", default="vgg16", help=f"{' or '.join(BACKBONES)} (default vgg16)")
    extract.add_argument("--image-size", type=_positive_int, default=None,
                         help="square input size (default: " + ", ".join(
                             f"{spec.default_image_size} for {name}" for name, spec in BACKBONES.items()) + "). For "
                              "images much smaller than that, extract notes it before the backbone pass with the "
                              "backbone's measured advice (28 px images: vgg16 --image-size 64 --layer block4_pool "
                              "--pooling avg; efficientnet_lite0 --image-size 128)")
    extract.add_argument("--pooling", default=None, choices=POOLINGS,
                         help="none keeps the full feature map (default; avg for the EfficientNet-Lite backbones, "
                              "whose default layers are four)")
    extract.add_argument("--layer", type=_layers, default=None, metavar="NAME[,NAME...]",
                         help="feature layer(s), comma-separated (default: the backbone's own: " + "; ".join(
                             f"{','.join(spec.default_layers)} for {name}" for name, spec in BACKBONES.items())
                         + "); `inspect --backbone NAME` lists them")
    extract.add_argument("--precision", default=None, choices=("fp32", "bf16", "mixed", "int8"),
                         help="default: mixed on a GPU, bf16 on a CPU with bf16 hardware, else fp32; int8: the "
                              "backbone quantised and run by ONNX Runtime, calibrated on the data's training images")
    extract.add_argument("--weights", default="imagenet",
                         help="imagenet (default: each backbone's first entry), a source or tag ("
                              + "; ".join(entry.describe() for spec in BACKBONES.values() for entry in spec.weights)
                              + "), none (random, for tests) or a file")
    extract.add_argument("--preprocessing", default=None, choices=PREPROCESSING,
                         help="override the preprocessing that follows from --weights (for a weights file)")
    extract.add_argument("--batch-size", type=_positive_int, default=32)
    extract.add_argument("--shard-size", type=_positive_int, default=1024, help="images per HDF5 shard")
    extract.add_argument("--cache", type=Path, default=Path("features"), help="cache root (default features/)")
    extract.add_argument("--val-fraction", type=_finite_float, default=None,
                         help="validation share of each class (default 0.15): of DIR/<class>/, or carved out of "
                              "train/ where a split layout has no validation folder")
    extract.add_argument("--test-fraction", type=_finite_float, default=None,
                         help="test share of each class (default 0.15): of DIR/<class>/, or carved out of train/ "
                              "where a split layout has no test folder")
    extract.add_argument("--split-seed", type=int, default=0, help="for the splits chosen by file name")
    extract.add_argument("--rehash", action="store_true",
                         help="hash every file again instead of trusting remembered size and mtime")
    extract.add_argument("--strict", action="store_true",
                         help="stop at the first file that cannot be decoded (default: skip and list it)")
    extract.add_argument("--max-megapixels", type=_positive_float, default=128,
                         help="images of more decoded pixels than this many millions (10^6) are held back with an "
                              "error, never decoded (default 128)")
    extract.add_argument("--engine", default="local", choices=("local", "ray"),
                         help="local: this process (default); ray: Ray Data across processes, nodes and GPUs")
    extract.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                         help="--engine ray: join this running cluster (default: a local instance for the command)")
    extract.add_argument("--workers", type=_positive_int, default=None,
                         help="--engine ray: backbone workers (default: one per GPU, else one per node)")
    _add_backend(extract, "; images decode with Pillow on jax")
    extract.add_argument("--no-progress", action="store_true", help="no progress bar")
    extract.add_argument("--json", action="store_true", help="print the summary as JSON")
    extract.set_defaults(handler=_extract)

    train = commands.add_parser("train-head", help="stage two: fit a head on cached features")
    train.add_argument("--head", default="logreg",
                       help=f"one of {', '.join(sorted(HEADS))}, or auto: logreg (default), dense, svm (support-vector "
                            "machine, RBF or linear), knn (cosine nearest neighbours, the few-shot baseline) or "
                            "sklearn (any scikit-learn classifier: --estimator, --params); auto fits every "
                            "--candidates head and keeps the best on validation")
    train.add_argument("--candidates", default=None, metavar="HEAD[,HEAD...]",
                       help="--head auto: the heads to fit and compare, each kept as a run, the best on validation "
                            "chosen (default logreg,svm,knn,dense)")
    train.add_argument("--features", type=_cache_list, default=None,
                       help="a cache directory from extract, or its name under --cache (default: the latest); "
                            "several, comma-separated (A,B), fuse their features: the same images, one image size, "
                            "other backbones")
    train.add_argument("--cache", type=Path, default=Path("features"), help="cache root (default features/)")
    train.add_argument("--models", type=Path, default=Path("models"), help="runs root (default models/)")
    train.add_argument("--name", default=None, help="run name (default: from dataset, head, features, settings)")
    train.add_argument("--layer", type=_layers, default=None, metavar="NAME[,NAME...]",
                       help="cached layer(s) to use, concatenated (default: all the cache holds)")
    train.add_argument("--pooling", default=None, choices=POOLINGS,
                       help="pool spatial features at read time (default: as extracted; none flattens)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--class-weight", default=None, choices=("none", "balanced"),
                       help="weigh classes inversely to their frequency (default none)")
    dense = train.add_argument_group("dense head")
    dense.add_argument("--units", type=_positive_int, default=None, help="hidden units (256)")
    dense.add_argument("--dropout", type=_finite_float, default=None, help="dropout rate (0.5)")
    dense.add_argument("--batch-norm", action="store_true", default=None, help="BatchNormalization after Dense")
    dense.add_argument("--optimizer", default=None, help="rmsprop (default), adam or sgd")
    dense.add_argument("--lr", type=_finite_float, default=None, help="learning rate (1e-3)")
    dense.add_argument("--epochs", type=_positive_int, default=None, help="at most this many epochs (50)")
    dense.add_argument("--batch-size", type=_positive_int, default=None, help="(32)")
    dense.add_argument("--patience", type=_positive_int, default=None,
                       help="epochs without validation accuracy improvement before stopping (4)")
    dense.add_argument("--loss", default=None, choices=("crossentropy", "ordinal"),
                       help="crossentropy (default), or ordinal: the classes, in their sorted order, are ordered "
                            "levels (ELPV's defect-0.00 .. defect-1.00): the mean cross-entropy of every cut "
                            "'at or above level k'; metrics.json adds each cut's accuracy and the error in levels")
    logreg = train.add_argument_group("logreg head")
    logreg.add_argument("--c-grid", default=None, metavar="LOW:HIGH:COUNT",
                        help="log-spaced C values, or C1,C2,... (1e-6:1e5:45; --c-search path fits about 15 of "
                             "them, grid all 45)")
    logreg.add_argument("--c-search", default=None, choices=("path", "grid"),
                        help="path (default): C ascending, warm-started, about one a decade, stopped three "
                             "decades after validation stops improving, then refined between the best's "
                             "neighbours; grid: every C of --c-grid (grids of 12 values or fewer are always "
                             "fitted whole)")
    logreg.add_argument("--max-iter", type=_positive_int, default=None, help="L-BFGS iterations per fit (1000)")
    logreg.add_argument("--n-jobs", type=int, default=None, help="parallel fits (-1: all cores)")
    svm = train.add_argument_group("svm head (--c-grid too: 1e-1:1e2:4)")
    svm.add_argument("--kernel", default=None, choices=("auto", "rbf", "linear"),
                     help="auto (default): rbf up to --rbf-limit training images, linear above")
    svm.add_argument("--gamma-grid", default=None, metavar="G1,G2,...",
                     help="the RBF kernel's widths to try, as multiples of 1/features (0.25,1,4)")
    svm.add_argument("--rbf-limit", type=_positive_int, default=None, metavar="N",
                     help="training images up to which auto uses the RBF kernel (5000: bench/RESULTS.md says why)")
    knn = train.add_argument_group("knn head")
    knn.add_argument("--k-grid", default=None, metavar="K1,K2,...", help="neighbours to try (1,3,5,10,20)")
    knn.add_argument("--weighting", default=None, choices=("search", "uniform", "distance"),
                     help="votes uniform, or weighted by 1/cosine distance; search (default) tries both")
    generic = train.add_argument_group("sklearn head: any scikit-learn classifier")
    generic.add_argument("--estimator", default=None, metavar="DOTTED.NAME",
                         help="the classifier's class, e.g. sklearn.ensemble.HistGradientBoostingClassifier "
                              "(default sklearn.linear_model.LogisticRegression)")
    generic.add_argument("--params", dest="estimator_params", default=None, metavar="JSON",
                         help="the estimator's parameters as a JSON object, e.g. '{\"max_iter\": 200}'")
    generic.add_argument("--trust-module", default=None, metavar="MODULE[,MODULE...]",
                         help="import estimators from these modules outside scikit-learn (importing runs their "
                              "code; loading the run later needs BOTTLENECK_PIPELINE_TRUST=MODULE)")
    train.add_argument("--memory-budget", type=_positive_int, default=None, metavar="MB",
                       help="read features into memory up to this size, stream by shard above (default: "
                            "a quarter of physical memory)")
    train.add_argument("--stream", action="store_true", help="stream features by shard even when they fit")
    train.add_argument("--exclude", type=Path, default=None, metavar="FILE",
                       help="leave these images out of training (never out of validation or test): an audit's "
                            "suspects.csv, or a file of paths or content-hash ids, one a line")
    train.add_argument("--assert-accuracy-at-least", type=_finite_float, default=None, metavar="X",
                       help="exit non-zero if validation accuracy is below X (0..1), e.g. to gate CI")
    train.add_argument("--metrics-by", default=None, metavar="COL",
                       help="--labels' column whose values the metrics are also given per, e.g. a cell type "
                            "(metrics.json: by_group)")
    train.add_argument("--threshold", default=None, metavar="validation|P",
                       help="two classes: decide the second class at or above this probability of it, or the one "
                            "of the highest validation accuracy (validation); recorded in the run, used by its "
                            "metrics, predict and export.json (default: the most probable class)")
    _add_label_flags(train)
    _add_backend(train)
    train.add_argument("--no-progress", action="store_true", help="no progress output")
    train.add_argument("--json", action="store_true", help="print the run summary as JSON")
    train.set_defaults(handler=_train_head)

    vectors = commands.add_parser("embeddings",
                                  help="a cache's embeddings with their ids, for other tools (parquet, npz)")
    vectors.add_argument("--features", type=_cache_list, default=None,
                         help="a cache directory, or its name under --cache (default: the latest)")
    vectors.add_argument("--cache", type=Path, default=Path("features"), help="cache root (default features/)")
    vectors.add_argument("--out", type=Path, default=Path("embeddings.parquet"),
                         help="FILE.parquet (default embeddings.parquet) or FILE.npz (with FILE.json beside it)")
    vectors.add_argument("--layer", type=_layers, default=None, metavar="NAME[,NAME...]",
                         help="cached layer(s) to write, concatenated (default: all the cache holds)")
    vectors.add_argument("--pooling", default=None, choices=POOLINGS,
                         help="pool spatial features (default: as extracted; none flattens)")
    _add_label_flags(vectors)
    vectors.add_argument("--no-progress", action="store_true", help="no progress bar")
    vectors.add_argument("--json", action="store_true", help="print the summary as JSON")
    vectors.set_defaults(handler=_embeddings)

    check = commands.add_parser("audit", help="label suspects and (cross-split) duplicates found from a cache")
    check.add_argument("--features", type=_cache_list, default=None,
                       help="a cache directory, or its name under --cache (default: the latest); several "
                            "(A,B): their features fused")
    check.add_argument("--cache", type=Path, default=Path("features"), help="cache root (default features/)")
    check.add_argument("--out", type=Path, default=None,
                       help="the audit's folder (default: models/audit-<cache directory name>)")
    check.add_argument("--models", type=Path, default=Path("models"), help="where the default folder goes")
    check.add_argument("--folds", type=_positive_int, default=5, help="stratified folds for the out-of-fold "
                       "probabilities (5)")
    check.add_argument("--c-grid", default=None, metavar="LOW:HIGH:COUNT",
                       help="the C values the first fold searches (1e-2:1e2:5); the other folds fit the C it "
                            "chose. One value (e.g. 1.0) is quickest")
    check.add_argument("--similarity", type=_finite_float, default=0.98,
                       help="cosine similarity from which two images count as near-duplicates (0.98; see "
                            "docs/commands.md, audit)")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--memory-budget", type=_positive_int, default=None, metavar="MB",
                       help="the features are held in memory up to this size (default: a quarter of memory)")
    _add_label_flags(check)
    check.add_argument("--no-progress", action="store_true", help="no progress bar")
    check.add_argument("--json", action="store_true", help="print the summary as JSON")
    check.set_defaults(handler=_audit)

    nextup = commands.add_parser("suggest", help="what to label next: unlabelled images ranked by a run's "
                                                 "uncertainty and by diversity")
    nextup.add_argument("--features", type=Path, default=None,
                        help="a cache of the run's fingerprint (default: the run's own)")
    nextup.add_argument("--cache", type=Path, default=Path("features"), help="cache root (default features/)")
    nextup.add_argument("--model", default=None,
                        help="a head run (its uncertainty ranks the images); none: by diversity alone")
    nextup.add_argument("--models", type=Path, default=Path("models"), help="where --model best looks")
    nextup.add_argument("--budget", type=_positive_int, default=50, help="how many images to suggest (50)")
    nextup.add_argument("--out", type=Path, default=None,
                        help="FILE.csv: the suggestions as a labels table to fill in and give back with --labels")
    nextup.add_argument("--no-progress", action="store_true", help="no progress output")
    nextup.add_argument("--json", action="store_true", help="print the suggestions as JSON")
    nextup.set_defaults(handler=_suggest)

    page = commands.add_parser("report", help="one offline HTML page of a run and/or an audit: metrics, the "
                                              "confusion matrix's images, errors, suspects, unknowns, the map")
    page.add_argument("--model", default=None, help="a run directory, or best")
    page.add_argument("--audit", type=Path, default=None, help="an audit's folder (made by audit)")
    page.add_argument("--out", type=Path, default=None,
                      help="FILE.html (default: report.html in the run's folder, else in the audit's)")
    page.add_argument("--split", default="test",
                      help="the split whose images the matrix opens: train, validation, test (test)")
    page.add_argument("--thumbnails", choices=THUMBNAIL_MODES, default="auto",
                      help="embed: in the page; folder: beside it (FILE_files/), linked relative to it; auto: "
                           "embedded up to 2,000 images (auto)")
    page.add_argument("--screenshot", type=Path, default=None, metavar="FILE.png",
                      help="also a picture of the page in headless Chromium (the [browser] extra)")
    page.add_argument("--models", type=Path, default=Path("models"), help="where --model best looks")
    page.add_argument("--cache", type=Path, default=Path("features"), help="cache root (default features/)")
    page.add_argument("--no-progress", action="store_true", help="no progress bar")
    page.add_argument("--json", action="store_true", help="print the summary as JSON")
    page.set_defaults(handler=_report)

    runs = commands.add_parser("runs", help="every run side by side, best validation accuracy first")
    runs.add_argument("--models", type=Path, default=Path("models"))
    runs.add_argument("--data", type=Path, default=None, help="only the runs trained on this image folder")
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(handler=_runs)

    caches = commands.add_parser("caches", help="every feature cache: backbone, size, layers, images; newest first")
    caches.add_argument("--cache", type=Path, default=Path("features"), help="cache root (default features/)")
    caches.add_argument("--json", action="store_true")
    caches.set_defaults(handler=_caches)

    evaluate = commands.add_parser("evaluate", help="recompute a run's metrics and reports from the cache")
    evaluate.add_argument("--model", type=Path, required=True, help="a run directory, e.g. models/NAME")
    evaluate.add_argument("--split", default="test", help="whose reports to write: train, validation, test")
    evaluate.add_argument("--features", type=Path, default=None,
                          help="the cache to read (default: the one the run was trained on)")
    evaluate.add_argument("--tta", default="none", choices=("none", "flip", "dihedral"),
                          help="score the run (head or fine-tuned) from its images, averaging test-time views: flip "
                               "(2) or dihedral (8); written to RUN/tta-VIEWS/ (default none: from the cache)")
    _add_label_flags(evaluate)
    _add_backend(evaluate)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(handler=_evaluate)

    tune = commands.add_parser("finetune", help="stage three: train the best head end to end with its backbone")
    tune.add_argument("--from", dest="source", default="best",
                      help="a head run directory, or best (highest validation accuracy; default)")
    tune.add_argument("--models", type=Path, default=Path("models"))
    tune.add_argument("--data", type=Path, default=None,
                      help="--from best: choose among the head runs of this image folder (needed where runs of "
                           "several folders stand side by side)")
    tune.add_argument("--name", default=None, help="run name (default: <head run>-finetuned-<unfreeze>)")
    tune.add_argument("--unfreeze", default=None,
                      help="train from this block or layer index on (default: the top block, " + ", ".join(
                          f"{spec.default_unfreeze} for {name}" for name, spec in BACKBONES.items())
                           + "); see `inspect`")
    tune.add_argument("--epochs", type=_positive_int, default=3, help="(3: CPUs are slow; more on a GPU)")
    tune.add_argument("--lr", type=_finite_float, default=1e-4,
                      help="learning rate (1e-4) of the head and the top unfrozen block")
    tune.add_argument("--momentum", type=_finite_float, default=0.9)
    tune.add_argument("--clipnorm", type=_finite_float, default=1.0,
                      help="clip gradients to this norm (0: off; default 1)")
    tune.add_argument("--batch-size", type=_positive_int, default=16)
    tune.add_argument("--patience", type=_positive_int, default=3,
                      help="epochs without validation accuracy improvement before stopping (3)")
    tune.add_argument("--precision", default=None, choices=("fp32", "mixed-bf16", "mixed-fp16"),
                      help="default: as the features were extracted (bf16 trains in mixed bfloat16)")
    tune.add_argument("--augment", default="default", choices=("default", "none"),
                      help="none switches every augmentation off")
    defaults = Augmentation()  # a plain dataclass: no TensorFlow import for --help
    tune.add_argument("--flip", default=None, choices=Augmentation.FLIPS,
                      help=f"default {defaults.flip} (horizontal_and_vertical for data with no up, such as solar "
                           "cells); with --cached none (flipping cached maps measured harmful for flattened heads: "
                           "see README)")
    tune.add_argument("--rotation", type=_finite_float, default=defaults.rotation,
                      help="fraction of a full turn, e.g. 0.05 (default 0: off)")
    tune.add_argument("--zoom", type=_finite_float, default=defaults.zoom, help="e.g. 0.1 (default 0: off)")
    tune.add_argument("--translation", type=_finite_float, default=defaults.translation,
                      help="e.g. 0.05 (default 0: off)")
    tune.add_argument("--contrast", type=_finite_float, default=defaults.contrast, help="e.g. 0.1 (default 0: off)")
    tune.add_argument("--brightness", type=_finite_float, default=defaults.brightness,
                      help="photos: scale each image's pixels by a factor from [1-B, 1+B], e.g. 0.2 (default 0: off)")
    tune.add_argument("--saturation", type=_finite_float, default=defaults.saturation,
                      help="photos: scale each image's colour saturation by a factor from [1-S, 1+S], e.g. 0.2 "
                           "(default 0: off; gray images stay gray)")
    tune.add_argument("--cached", action="store_true",
                      help="train on cached activations of the layer below --unfreeze (e.g. block4_pool for "
                           "block5; extract them with --layer NAME --pooling none): no pass through the frozen "
                           "blocks per epoch; augmentation flips the cached maps")
    tune.add_argument("--cache", type=Path, default=None,
                      help="--cached: where to look for that cache (default: beside the head's cache)")
    tune.add_argument("--seed", type=int, default=0)
    steps = tune.add_argument_group("the recipe")
    steps.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"),
                       help="sgd with --momentum (default), or adamw (decoupled --weight-decay)")
    steps.add_argument("--weight-decay", type=_finite_float, default=0.0, help="(default 0)")
    steps.add_argument("--schedule", default="plateau", choices=("plateau", "cosine"),
                       help="plateau: halve the rate when validation loss stalls (default); cosine: a linear "
                            "warm-up over --warmup-epochs, then a cosine decay to 0 at the last epoch")
    steps.add_argument("--warmup-epochs", type=_finite_float, default=0.0, help="with --schedule cosine (default 0)")
    steps.add_argument("--label-smoothing", type=_finite_float, default=0.0, help="e.g. 0.1 (default 0: off)")
    steps.add_argument("--loss", default=None, choices=("crossentropy", "ordinal"),
                       help="ordinal: the classes, in their sorted order, are ordered levels (see train-head --loss); "
                            "default: the head run's loss")
    steps.add_argument("--lr-decay", type=_finite_float, default=1.0,
                       help="discriminative rates: each block below the top unfrozen one learns at this factor of "
                            "the one above (e.g. 0.5; default 1: one rate)")
    steps.add_argument("--head-epochs", type=int, default=0,
                       help="of --epochs, train the head alone first (the backbone frozen), then unfreeze (default 0)")
    steps.add_argument("--tta", default="none", choices=("none", "flip", "dihedral"),
                       help="score the run averaging test-time views: flip (2) or dihedral (8, for images without "
                            "an up); default none")
    _add_backend(tune, "; fine-tuning runs on tensorflow")
    tune.add_argument("--no-progress", action="store_true")
    tune.add_argument("--json", action="store_true")
    tune.set_defaults(handler=_finetune)

    guess = commands.add_parser("predict", help="top-k labels of images with any run")
    guess.add_argument("--model", type=Path, required=True,
                       help="a run directory, e.g. models/NAME, or best (highest validation accuracy)")
    guess.add_argument("--models", type=Path, default=Path("models"), help="where --model best looks")
    guess.add_argument("--data", type=Path, default=None, help="--model best: among the runs of this image folder")
    guess.add_argument("images", type=Path, nargs="+", metavar="IMAGE_OR_DIR")
    guess.add_argument("--top", type=_positive_int, default=3, help="labels per image (3)")
    guess.add_argument("--output", type=Path, default=None, help="also write FILE.csv or FILE.json")
    guess.add_argument("--max-megapixels", type=_positive_float, default=128,
                       help="images of more decoded pixels than this many millions (10^6) get an error instead of a "
                            "prediction (default 128)")
    guess.add_argument("--unknown", default="flag", choices=("flag", "reject"),
                       help="an image farther from the run's training images than the run's recorded threshold (5%% "
                            "of its validation images are): flag it and keep its labels (default), or reject it "
                            "(no labels); head runs")
    guess.add_argument("--tta", default="none", choices=("none", "flip", "dihedral"),
                       help="average the probabilities over test-time views: flip (2) or dihedral (8, for images "
                            "without an up); default none")
    _add_backend(guess, "; images decode with Pillow on jax")
    guess.set_defaults(handler=_predict)

    ship = commands.add_parser("export",
                               help="a run as a model that needs no pipeline (keras, savedmodel, tflite, onnx)")
    ship.add_argument("--model", required=True, help="a run directory, e.g. models/NAME, or best")
    ship.add_argument("--models", type=Path, default=Path("models"), help="where --model best looks")
    ship.add_argument("--data", type=Path, default=None, help="--model best: among the runs of this image folder")
    ship.add_argument("--format", default="savedmodel", choices=EXPORT_FORMATS,
                      help="keras: one .keras file; savedmodel: for TF Serving (default); tflite: for mobile; onnx: "
                           "for ONNX Runtime, OpenVINO, TensorRT, Triton")
    ship.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/export/)")
    ship.add_argument("--quantize", action="store_true",
                      help="tflite: dynamic-range int8 weights; onnx: int8 weights (ONNX Runtime), measured against "
                           "float32 on the run's validation images and refused past the documented threshold")
    ship.add_argument("--precision", default="float32", choices=("float32", "run"),
                      help="float32: runs anywhere (default); run: computes in the run's precision (bf16 when extract "
                           "chose it), as predict does: keras and savedmodel only (TFLite and ONNX Runtime have no "
                           "bfloat16 kernels)")
    ship.add_argument("--check-images", type=_non_negative_int, default=500, metavar="N",
                      help="measure the export against predict on up to N of the run's validation images (accuracy, "
                           "largest probability difference), printed and recorded in export.json (default 500; 0: "
                           "skip)")
    ship.add_argument("--tta", default="none", choices=("none", "flip", "dihedral"),
                      help="average test-time views inside the model, as predict --tta does: flip (2 passes) or "
                           "dihedral (8, for images without an up); every format, not with --quantize (default none)")
    _add_backend(ship, "; SavedModel and TFLite are TensorFlow formats: export runs on tensorflow")
    ship.add_argument("--no-progress", action="store_true", help="no progress output")
    ship.add_argument("--json", action="store_true")
    ship.set_defaults(handler=_export)

    inspect = commands.add_parser("inspect", help="a backbone's layers with indices, types and blocks")
    inspect.add_argument("--backbone", default="vgg16", help=f"{' or '.join(BACKBONES)} (default vgg16)")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(handler=_inspect)

    demo = commands.add_parser("demo-data", help="export the ELPV solar-cell images into DIR/<class>/")
    demo.add_argument("--out", type=Path, default=Path("data/elpv"))
    demo.add_argument("--classes", default="binary", choices=("binary", "4class"),
                      help="binary: functional (p<0.5) vs defective; 4class: p = 0, 1/3, 2/3, 1")
    demo.set_defaults(handler=_demo_data)
    return parser


def flag_tables() -> str:
    """docs/flags.md: every command's flags with their defaults and help, from the parser itself
    (`make docs` writes it; a test checks that it matches)."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    lines = ["# Flags", "",
             "Generated from the argument parser by `make docs` (do not edit by hand). The same names in",
             "snake_case are the keyword arguments of the Python functions (`pipeline.extract(data, image_size=...)`);",
             "`--no-progress` is `progress=False` there.", ""]
    for name, command in commands.choices.items():
        lines += [f"## `{name}`", "", f"{helps.get(name, '')}.", "", "| flag | default | meaning |", "|---|---|---|"]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = ", ".join(action.option_strings) or action.metavar or action.dest
            if action.option_strings and action.nargs != 0:
                flag += f" {action.metavar or action.dest.upper()}"
            flag = flag.replace("|", "\\|")
            if action.required or (not action.option_strings and action.nargs in ("+", None)):
                default = "required"
            elif action.nargs == 0:
                default = "off"
            else:
                default = "" if action.default is None else f"`{action.default}`"
            choices = f" ({' / '.join(map(str, action.choices))})" if action.choices else ""
            meaning = (action.help or "").replace("|", "\\|").replace("\n", " ") + choices
            lines.append(f"| `{flag}` | {default} | {meaning} |")
        lines.append("")
    return "\n".join(lines)


def _flags(args: argparse.Namespace, function: Any, *positional: str) -> dict[str, Any]:
    """The parsed flags that `function` (a stage of pipeline.api) takes as keyword arguments: the
    same names, snake_case; --no-progress is progress=False. `positional`: what the command passes
    by position (its main input)."""
    values = {name: getattr(args, name) for name in inspect.signature(function).parameters
              if name not in positional and hasattr(args, name)}
    if "progress" in inspect.signature(function).parameters:
        values["progress"] = not args.no_progress
    return values


def _extract(args: argparse.Namespace) -> int:
    cache = api.extract(args.data, **_flags(args, api.extract, "data"))
    summary = cache.summary
    if args.json:
        print(json.dumps(summary.as_dict() | {"skipped_images": summary.skipped}, indent=2))
        return 0
    print(summaries.extract_text(summary))
    return 0


def _train_head(args: argparse.Namespace) -> int:
    flags = _flags(args, api.train_head, "features") | {"assert_accuracy_at_least": None}  # gated after printing
    features = args.features
    if features is None:  # the cache written last: say which, before the work
        from pipeline.cache.reader import latest_cache

        with contextlib.suppress(PipelineError):  # none: train_head says so
            features = latest_cache(args.cache)
            if not args.json:
                print(f"features: {features.name} (the cache written last; --features NAME or BACKBONE:SIZE:LAYER "
                      "chooses another, `caches` lists them)", flush=True)
    run = api.train_head(features, **flags)
    summary = run.summary
    if run.comparison is not None:
        from pipeline.training.auto import comparison_text

        if args.json:
            print(json.dumps({"run": str(summary.directory), "chosen": summary.config["head"]["kind"],
                              "comparison": str(run.comparison.path), "candidates": run.comparison.rows}, indent=2))
        else:
            print(comparison_text(run.comparison))
        api.check_accuracy_at_least(run, args.assert_accuracy_at_least)
        return 0
    _print_run(summary, args.json, f"trained {summary.config['head']['kind']} head: {_elapsed(args):.1f} s in all, "
               f"{summary.seconds:.1f} s fitting ({summary.config['read']})")
    api.check_accuracy_at_least(run, args.assert_accuracy_at_least)
    return 0


def _print_run(summary, as_json: bool, headline: str) -> None:
    if as_json:
        print(json.dumps({"run": str(summary.directory), "seconds": summary.seconds, "metrics": summary.metrics},
                         indent=2))
        return
    print(summaries.run_text(summary, headline))


def _embeddings(args: argparse.Namespace) -> int:
    written = api.embeddings(args.features, args.out, **_flags(args, api.embeddings, "features", "out"))
    if args.json:
        print(json.dumps({"path": str(written.path), "rows": written.rows, "dimension": written.dimension,
                          "seconds": round(written.seconds, 2)} | written.metadata, indent=2))
        return 0
    print(f"embeddings: {written.rows} images x {written.dimension} values in {written.path} "
          f"({written.path.stat().st_size / 2**20:.1f} MB, {written.seconds:.1f} s); ids are content sha256")
    return 0


def _audit(args: argparse.Namespace) -> int:
    summary = api.audit(args.features, **_flags(args, api.audit, "features"))
    details = summary.details
    if args.json:
        print(json.dumps({"directory": str(summary.directory), "seconds": round(summary.seconds, 2)} | details,
                         indent=2))
        return 0
    print(summaries.audit_text(summary))
    return 0


def _suggest(args: argparse.Namespace) -> int:
    found = api.suggest(args.features, **_flags(args, api.suggest, "features"))
    if args.json:
        print(json.dumps({"path": None if found.path is None else str(found.path), "rows": found.rows,
                          "seconds": round(found.seconds, 2)} | found.details, indent=2))
        return 0
    print(summaries.suggest_text(found))
    return 0


def _report(args: argparse.Namespace) -> int:
    found = api.report_page(args.model, **_flags(args, api.report_page, "model"))
    if args.json:
        print(json.dumps({"path": str(found.path), "images": found.images, "missing": found.missing,
                          "thumbnails": found.thumbnails, "sections": found.sections, "notes": found.notes,
                          "screenshot": None if found.screenshot is None else str(found.screenshot),
                          "console_errors": found.console_errors,
                          "seconds": round(found.seconds, 2)}, indent=2))
        return 0
    print(summaries.report_text(found))
    return 0


def _caches(args: argparse.Namespace) -> int:
    from pipeline.cache.catalogue import caches_table

    rows = api.list_caches(args.cache)
    print(json.dumps(rows, indent=2) if args.json else caches_table(rows))
    return 0


def _runs(args: argparse.Namespace) -> int:
    from pipeline.report import runs_table

    rows = api.list_runs(args.models, data=args.data)
    print(json.dumps(rows, indent=2) if args.json else runs_table(rows))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    summary = api.evaluate(args.model, **_flags(args, api.evaluate, "run")).summary
    where = f"{args.split} reports written" + ("" if args.tta == "none" else f" to {summary.directory}")
    _print_run(summary, args.json, f"evaluated {args.model.name} ({where})")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    summary = api.finetune(args.source, **_flags(args, api.finetune, "run")).summary
    before = summary.config["test_before_finetune"]
    tuned = summary.config["finetune"]
    on = " on cached " + tuned["trained_on"]["layer"] if tuned["trained_on"]["source"] != "images" else ""
    headline = (f"fine-tuned {summary.config['from']}{on} for {tuned['epochs_run']} epochs: "
                f"{_elapsed(args) / 60:.1f} min in all, {summary.seconds / 60:.1f} min training (kept epoch "
                f"{tuned['kept_epoch']}, chosen on validation accuracy; 0 = unchanged); validation accuracy "
                f"before {tuned['validation_before']['accuracy']:.2%}, after "
                f"{summary.metrics['validation'].get('accuracy', float('nan')):.2%}; "
                f"test accuracy before {before.get('accuracy', float('nan')):.2%}, "
                f"after {summary.metrics['test'].get('accuracy', float('nan')):.2%} (both of the model from "
                f"pixels, end to end{_head_run_figure(summary.config)})")
    _print_run(summary, args.json, headline)
    return 0


def _head_run_figure(config: dict[str, Any]) -> str:
    """The head run's own test accuracy, scored from its cached features, where it was recorded."""
    figure = (config.get("head_run_accuracy") or {}).get("test")
    return "" if figure is None else f"; the head run's own {figure:.2%} was scored from its cached features"


def _predict(args: argparse.Namespace) -> int:
    from pipeline.serving.predict import predictions_table

    results = api.predict(args.model, args.images, **_flags(args, api.predict, "run", "images"))
    print(predictions_table(results))
    failed = sum(1 for r in results if r.error)
    if failed:
        print(f"error: {failed} of {len(results)} files could not be read as images", file=sys.stderr)
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    summary = api.export(args.model, **_flags(args, api.export, "run"))
    if args.json:
        print(json.dumps({"path": str(summary.path), "bytes": summary.bytes, "seconds": round(summary.seconds, 2)}
                         | summary.details, indent=2))
        return 0
    print(summaries.export_text(summary))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from pipeline.backbone.blocks import describe_layers

    rows = describe_layers(args.backbone)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'index':>5}  {'name':<28} {'type':<22} {'block':<8} {'parameters':>10}  output")
    for row in rows:
        print(f"{row['index']:>5}  {row['name']:<28} {row['type']:<22} {row['block']:<8} {row['parameters']:>10}  "
              f"{row['output_shape']}")
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from pipeline.data.demo import export_elpv

    counts = export_elpv(args.out, args.classes)
    listing = ", ".join(f"{name} {count}" for name, count in counts.items())
    print(f"ELPV: {sum(counts.values())} images in {args.out} ({listing}); licence CC BY-NC-SA 4.0")
    return 0


def _elapsed(args: argparse.Namespace) -> float:
    """Seconds since the command started: what a summary line reports as the time it took."""
    return time.perf_counter() - args.started


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    args.started = started
    with contextlib.ExitStack() as cleanup:
        speak_as_command_line()  # advice in flags, and the summaries printed here rather than by the API
        cleanup.callback(speak_as_command_line, False)
        if not args.debug:
            cleanup.enter_context(native_chatter_filtered())
            cleanup.enter_context(library_warnings_quiet())
        return _run(args)


def buried_pipeline_error(error: BaseException) -> str | None:
    """Our one-line message where TensorFlow or Keras re-raised it inside an error of its own (a
    PipelineError raised while tf.data or Keras pulled examples, forty lines of context around it)."""
    found = re.findall(r"PipelineError: ([^\n]+)", str(error))
    return found[-1].strip() if found else None


# What a Ctrl-C leaves behind, by command: every command writes its results whole or not at all.
INTERRUPTED = {
    "extract": "finished shards are kept; rerun the same command to resume",
    "train-head": "no run was saved (a run is written only when complete); rerun the command to train it",
    "finetune": "no run was saved (a run is written only when complete; the head run is unchanged); rerun the "
                "command to fine-tune again",
    "evaluate": "the run's metrics and reports are as they were",
    "predict": "no predictions were written",
    "embeddings": "no embeddings file was written (it appears only when complete)",
    "audit": "no audit was written (its folder appears only when complete)",
    "export": "no export was written (an export appears only when complete)",
    "demo-data": "rerun the command to finish exporting the images",
}


def _run(args: argparse.Namespace) -> int:
    from pipeline.atomic import one_line, os_error_message

    try:
        if hasattr(args, "backend"):
            from pipeline import backend

            backend.select(args.backend)  # before anything imports Keras
        return args.handler(args)
    except PipelineError as error:
        if args.debug:
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    except OSError as error:  # a full disk, a read-only folder, a name too long: the user's to fix
        if args.debug:
            raise
        print(f"error: {os_error_message(error, 'could not use')}; rerun with --debug for details",
              file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - only to unbury our own message from a library's
        buried = buried_pipeline_error(error)
        if buried is None or args.debug:
            raise
        print(f"error: {buried}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"interrupted: {INTERRUPTED.get(args.command, 'nothing was changed')}", file=sys.stderr)
        return 130
