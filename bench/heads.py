"""Head training from the feature cache against the seeds' way, one epoch each on the same images.

    .venv/bin/python bench/heads.py [--data data/elpv] [--image-size 150]

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
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
from pipeline.training.train import TrainOptions, train_head  # noqa: E402


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
    model.compile(optimizer=head.optimizer(), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
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
    model.compile(optimizer=head.optimizer(), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    started = time.perf_counter()
    model.fit(train.matrix, train.labels, batch_size=int(head.params["batch_size"]), epochs=1, shuffle=True,
              verbose=0)
    return read, time.perf_counter() - started, train.dimension


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/elpv"))
    parser.add_argument("--image-size", type=int, default=150)
    parser.add_argument("--work", type=Path, default=Path("bench/work"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/heads.json"))
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} does not exist: run `run_pipeline.py demo-data` (or `make bench`) first")
    print(machine_line(), flush=True)
    cache = extract_features(ExtractOptions(data=args.data, image_size=args.image_size,
                                            cache_root=args.work / "features", progress=sys.stderr.isatty())).cache_dir
    store = FeatureStore(cache)
    head = DenseHead(store.class_names)
    read, ours, dimension = pipeline_epoch(store, head)
    theirs = seeds_epoch(store, head, dimension)
    logreg = train_head(TrainOptions(head="logreg", features=cache, models=args.work / "models", progress=False))
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
