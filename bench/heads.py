"""Head training from the feature cache against the seeds' way, one epoch each on the same images;
and the heads' own searches, today's against the new defaults.

    .venv/bin/python -m bench.heads [--data data/elpv] [--image-size 150]
    .venv/bin/python -m bench.heads --suite search [--sizes 10000x2000,100000x1280]
    .venv/bin/python -m bench.heads --suite scale [--scale-sizes 2500,5000,10000,20000,100000]

scale: the SVM and nearest-neighbour heads on synthetic features of 1,280 values (EfficientNet-Lite0's
width; 4 Gaussian classes, 5% of labels flipped) at growing training sizes: one fit of one setting
(the default search fits 12 RBF settings or 4 linear ones, and kNN's 10 settings are votes only),
then predicting 2,000 images; seconds and the peak resident memory of a fresh process for each.
The RBF kernel stops at 10,000 images (beyond, its square growth is extrapolated, never run).
Each row is written to bench/results/heads-scale.json as it ends (a rerun skips the rows there).

search: synthetic caches (10 Gaussian clusters, 5% of labels flipped, 70/15/15 splits; written through
the store as extract writes them) of ROWS x DIMENSION: the logistic regression's C search over the
default grid (1e-6:1e5:45) fitted whole (`--c-search grid`, today's protocol) and walked as a path
(`--c-search path`, the default), side by side with seconds, fits, the chosen C and validation
and test accuracy; on the largest size, streamed by shard (the path only: the whole grid streamed
would take hours). Then the dense head with patience 8 (before) and 4 (now). Each row is written to
bench/results/heads-search.json as it ends (a rerun skips the rows there).

seeds: the dense head trained with the frozen VGG16 conv base inside the model, so every epoch
decodes every training image and runs the backbone on it again (the classic recipe before
bottleneck features). pipeline: the same dense head (same layers, optimizer and batch size)
trained for one epoch on the cached features. Both see the training split of the same cache.
Also: the logistic-regression head with its full C search on the same features, in seconds.
The cache is made (or reused) under bench/work/features; its extraction is not timed here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import machine_line, markdown_table  # noqa: E402
from pipeline.cache.reader import FeatureView, load_splits, split_images  # noqa: E402
from pipeline.cache.store import FeatureStore  # noqa: E402
from pipeline.extraction.extract import ExtractOptions, extract_features  # noqa: E402
from pipeline.heads import DenseHead, training_statistics  # noqa: E402
from pipeline.images.decode_tf import labelled_batches  # noqa: E402
from pipeline.runs.classifier import image_input, weights_for  # noqa: E402
from pipeline.training.train import TrainOptions, run_training  # noqa: E402


def seeds_epoch(store: FeatureStore, head: DenseHead, dimension: int) -> float:
    """Seconds for one epoch of the dense head with the frozen backbone inside the model."""
    from pipeline.backbone.network import build_backbone, preprocessing_layers
    from pipeline.backbone.registry import get_backbone

    fingerprint = store.fingerprint
    backbone = build_backbone(get_backbone(fingerprint.backbone), fingerprint.image_size, fingerprint.precision,
                              weights_for(fingerprint, store.manifest.get("weights", {}).get("path")))
    backbone.trainable = False
    pixels = keras.Input((None, None, 3))
    x = image_input(pixels, fingerprint.image_size, preprocessing_layers(fingerprint.preprocessing))
    x = keras.layers.Flatten()(keras.layers.Activation("linear", dtype="float32")(backbone(x, training=False)))
    identity = np.zeros(dimension), np.ones(dimension)  # the same layers as the pipeline's head, same cost
    model = keras.Model(pixels, head.build(*identity)(x))
    model.compile(optimizer=head.make_optimizer(), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    train_images = split_images(store)["train"]
    files, labels = train_images.files, train_images.labels
    train = labelled_batches(files, labels, fingerprint.image_size, int(head.params["batch_size"]), shuffle_seed=0)
    started = time.perf_counter()
    model.fit(train, epochs=1, shuffle=False, verbose=0)  # the dataset shuffles itself
    return time.perf_counter() - started


def pipeline_epoch(store: FeatureStore, head: DenseHead) -> tuple[float, float, int]:
    """(seconds to read the features, seconds for one epoch on them, their dimension)."""
    started = time.perf_counter()
    splits = load_splits(store, FeatureView.for_cache(store))
    read = time.perf_counter() - started
    train = splits["train"]
    model = head.build(*training_statistics(train))
    model.compile(optimizer=head.make_optimizer(), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    started = time.perf_counter()
    model.fit(train.matrix, train.labels, batch_size=int(head.params["batch_size"]), epochs=1, shuffle=True,
              verbose=0)
    return read, time.perf_counter() - started, train.dimension


SEARCH_RESULTS = Path("bench/results/heads-search.json")


def search_suite(sizes: list[tuple[int, int]], work: Path, spread: float, caches: list[Path]) -> None:
    """The C search, whole grid against path, and the dense head's patience, side by side."""
    from bench.audit import synthetic_cache

    print(machine_line(), flush=True)
    done = json.loads(SEARCH_RESULTS.read_text()) if SEARCH_RESULTS.is_file() else {"rows": []}
    done["machine"] = machine_line()
    seen = {(r["size"], r["head"], r["setting"]) for r in done["rows"]}

    def record(row: dict) -> None:
        done["rows"].append(row)
        SEARCH_RESULTS.parent.mkdir(parents=True, exist_ok=True)
        SEARCH_RESULTS.write_text(json.dumps(done, indent=1) + "\n")
        print(f"  {row['size']} {row['head']} {row['setting']}: {row['seconds']:.1f} s, {row['fits']} fits, "
              f"validation {row['validation_accuracy']:.2%}, test {row['test_accuracy']:.2%}", flush=True)

    for rows, dimension in sizes:
        size = f"{rows}x{dimension}"
        cache = synthetic_cache(work / f"search-{size}-{spread}", rows, dimension, spread=spread)
        store = FeatureStore(cache)
        largest = (rows, dimension) == max(sizes)
        streamed = largest and len(sizes) > 1
        _search_rows(store, size, streamed, seen, record)
    for cache in caches:
        store = FeatureStore(cache)
        _search_rows(store, f"{Path(cache).name} ({store.fingerprint.backbone})", False, seen, record)
    table = markdown_table(["size", "head", "setting", "seconds", "fits or epochs", "validation", "test"],
                           [[r["size"], r["head"], r["setting"], f"{r['seconds']:.1f}", r["fits"],
                             f"{r['validation_accuracy']:.2%}", f"{r['test_accuracy']:.2%}"] for r in done["rows"]])
    print(f"\n{table}")


def _search_rows(store: FeatureStore, size: str, streamed: bool, seen: set, record: Callable[[dict], None]) -> None:
    """The logistic regression's two searches and the dense head's two patiences on one cache."""
    from pipeline.heads import LogRegHead

    splits = load_splits(store, FeatureView.for_cache(store), stream=streamed)
    for setting in (("path",) if streamed else ("grid", "path")):
        label = f"logreg c-search {setting}" + (" (streamed)" if streamed else "")
        if (size, "logreg", label) in seen:
            continue
        head = LogRegHead(c_search=setting)
        started = time.perf_counter()
        head.fit(splits["train"], splits["validation"], progress=sys.stderr.isatty())
        seconds = time.perf_counter() - started
        test = head.predict_proba(splits["test"]).argmax(axis=1) == splits["test"].labels
        best = max(head.history_, key=lambda r: (r["validation_accuracy"], -r["validation_loss"]))
        record({"size": size, "head": "logreg", "setting": label, "seconds": seconds, "fits": len(head.history_),
                "chosen_C": head.C_, "validation_accuracy": best["validation_accuracy"],
                "test_accuracy": float(np.mean(test)), "train_images": len(splits["train"])})
    if streamed:
        return
    for patience in (8, 4):
        label = f"dense patience {patience}"
        if (size, "dense", label) in seen:
            continue
        head = DenseHead(patience=patience)
        started = time.perf_counter()
        head.fit(splits["train"], splits["validation"], progress=False)
        seconds = time.perf_counter() - started
        test = head.predict_proba(splits["test"]).argmax(axis=1) == splits["test"].labels
        outcome = head.outcome()
        record({"size": size, "head": "dense", "setting": label, "seconds": seconds,
                "fits": len(head.history_), "epochs_run": len(head.history_), "outcome": outcome,
                "validation_accuracy": max(r.get("val_accuracy", 0) for r in head.history_),
                "test_accuracy": float(np.mean(test)), "train_images": len(splits["train"])})


SCALE_RESULTS = Path("bench/results/heads-scale.json")
SCALE_DIMENSION, SCALE_CLASSES, SCALE_PREDICT = 1280, 4, 2000
SCALE_HEADS = {  # name -> (head kind, one setting of its search, largest training size run)
    "svm rbf": ("svm", {"kernel": "rbf", "c_grid": "1", "gamma_grid": "1", "rbf_limit": 10**9}, 10_000),
    "svm linear": ("svm", {"kernel": "linear", "c_grid": "1"}, 10**9),
    "knn": ("knn", {"k_grid": "10", "weighting": "distance"}, 10**9),
}


def scale_features(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes in SCALE_DIMENSION values, 5% of the labels flipped."""
    centres = np.random.default_rng(1234).normal(0, 0.08, (SCALE_CLASSES, SCALE_DIMENSION)).astype(np.float32)
    rng = np.random.default_rng(seed)  # the same classes, other images
    labels = rng.integers(0, SCALE_CLASSES, rows)
    features = centres[labels] + rng.normal(0, 1, (rows, SCALE_DIMENSION)).astype(np.float32)
    flipped = rng.random(rows) < 0.05
    labels[flipped] = rng.integers(0, SCALE_CLASSES, int(flipped.sum()))
    return features, labels.astype(np.int32)


def scale_row(name: str, rows: int) -> dict:
    """One head at one size, in this process (run in a fresh one: its peak memory is the row's)."""
    import resource

    from pipeline.heads import ArrayFeatures, make_head

    kind, params, _ = SCALE_HEADS[name]
    import keras  # noqa: F401 - the pipeline imports it anyway: its memory is in the baseline, not the head's

    x, y = scale_features(rows)
    vx, vy = scale_features(1000, seed=1)
    tx, ty = scale_features(SCALE_PREDICT, seed=2)
    names = [f"c{i}" for i in range(SCALE_CLASSES)]
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    head = make_head(kind, names, params)
    started = time.perf_counter()
    head.fit(ArrayFeatures(x, y, names), ArrayFeatures(vx, vy, names))
    fit = time.perf_counter() - started
    started = time.perf_counter()
    proba = head.predict_proba(ArrayFeatures(tx, ty, names))
    predict = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"head": name, "rows": rows, "fit_seconds": fit, "predict_seconds": predict,
            "predict_images": SCALE_PREDICT, "test_accuracy": float(np.mean(proba.argmax(1) == ty)),
            "peak_rss_mb": peak / 1024, "features_mb": x.nbytes / 2**20, "rss_before_fit_mb": baseline / 1024,
            "outcome": {k: v for k, v in head.outcome().items() if isinstance(v, int | float | str)}}


def scale_suite(sizes: list[int]) -> None:
    """Every head of SCALE_HEADS at every size, each in a fresh process, resumable."""
    import subprocess

    print(machine_line(), flush=True)
    done = json.loads(SCALE_RESULTS.read_text()) if SCALE_RESULTS.is_file() else {"rows": []}
    done["machine"] = machine_line()
    seen = {(r["head"], r["rows"]) for r in done["rows"]}
    for rows in sizes:
        for name, (_, _, largest) in SCALE_HEADS.items():
            if (name, rows) in seen or rows > largest:
                continue
            code = (f"import json; from bench.heads import scale_row; "
                    f"print('ROW ' + json.dumps(scale_row({name!r}, {rows})))")
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    cwd=Path(__file__).resolve().parent.parent)
            found = [line[4:] for line in result.stdout.splitlines() if line.startswith("ROW ")]
            if result.returncode != 0 or not found:
                print(f"  {name} at {rows}: failed ({result.stderr.strip().splitlines()[-1:]})", flush=True)
                continue
            row = json.loads(found[0])
            done["rows"].append(row)
            SCALE_RESULTS.parent.mkdir(parents=True, exist_ok=True)
            SCALE_RESULTS.write_text(json.dumps(done, indent=1) + "\n")
            print(f"  {name} at {rows}: fit {row['fit_seconds']:.1f} s, predict {SCALE_PREDICT} in "
                  f"{row['predict_seconds']:.2f} s, peak {row['peak_rss_mb']:.0f} MB, test {row['test_accuracy']:.2%}",
                  flush=True)
    table = markdown_table(["head", "training images", "one fit (s)", f"predict {SCALE_PREDICT} (s)",
                            "peak MB above the imports", "features MB", "test"],
                           [[r["head"], r["rows"], f"{r['fit_seconds']:.1f}", f"{r['predict_seconds']:.2f}",
                             f"{r['peak_rss_mb'] - r['rss_before_fit_mb']:.0f}", f"{r['features_mb']:.0f}",
                             f"{r['test_accuracy']:.2%}"]
                            for r in sorted(done["rows"], key=lambda r: (r["head"], r["rows"]))])
    print(f"\n{table}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("epoch", "search", "scale"), default="epoch")
    parser.add_argument("--scale-sizes", default="2500,5000,10000,20000,100000",
                        help="training sizes of the scale suite")
    parser.add_argument("--sizes", default="10000x2000,100000x1280", help="ROWSxDIMENSION,... (the search suite)")
    parser.add_argument("--spread", type=float, default=0.08, help="cluster centres' scale (the search suite)")
    parser.add_argument("--cache", type=Path, action="append", default=[],
                        help="the search suite on a real cache too (repeatable)")
    parser.add_argument("--data", type=Path, default=Path("data/elpv"))
    parser.add_argument("--image-size", type=int, default=150)
    parser.add_argument("--work", type=Path, default=Path("bench/work"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/heads.json"))
    args = parser.parse_args()
    if args.suite == "scale":
        scale_suite([int(n) for n in args.scale_sizes.split(",") if n])
        return
    if args.suite == "search":
        sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes.split(",") if size]
        search_suite(sizes, args.work / "heads", args.spread, args.cache)  # --sizes "": the caches only
        return
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} does not exist: run `run_pipeline.py demo-data` (or `make bench`) first")
    print(machine_line(), flush=True)
    cache = extract_features(ExtractOptions(data=args.data, image_size=args.image_size,
                                            cache_root=args.work / "features", progress=sys.stderr.isatty())).cache_dir
    store = FeatureStore(cache)
    head = DenseHead()
    read, ours, dimension = pipeline_epoch(store, head)
    theirs = seeds_epoch(store, head, dimension)
    logreg = run_training(TrainOptions(head="logreg", features=cache, models=args.work / "models", progress=False))
    images = len(split_images(store)["train"].files)
    precision = store.fingerprint.precision
    rows = [
        [f"seeds: dense head with the frozen backbone inside ({precision})", f"{theirs:.1f}", "1.0"],
        ["pipeline: dense head on cached features", f"{ours:.2f}", f"{theirs / ours:.0f}x faster"],
    ]
    table = markdown_table([f"one epoch, {images} training images, vgg16 {args.image_size}px", "seconds",
                            "speed-up"], rows)
    print(f"\n{table}\n\nreading the cached features once: {read:.2f} s")
    print(f"logreg with its C search ({logreg.config['head']['params']['c_grid']}) on the same features: "
          f"{logreg.seconds:.1f} s, test accuracy {logreg.metrics['test']['accuracy']:.2%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_line(), "images": images, "seeds_epoch_seconds": theirs,
                                    "pipeline_epoch_seconds": ours, "feature_read_seconds": read,
                                    "ratio": theirs / ours, "logreg_seconds": logreg.seconds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
