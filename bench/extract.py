"""Extraction speed: the backbone's forward pass alone (the limit) against `extract` end to end
(files on disk to finished shards), same images, batch size and precision, in one run.

    .venv/bin/python bench/extract.py [--data data/elpv] [--precision fp32 bf16] [--image-size 150]

Prints images/s for each, the ratio pipeline / limit, and bf16 / fp32 where both ran.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from pipeline.backbones import FeatureExtractor, build_backbone, get_backbone, preprocess  # noqa: E402
from pipeline.extract import ExtractOptions, ExtractSummary, extract_features  # noqa: E402
from pipeline.weights import resolve_weights  # noqa: E402


def backbone_limit(precision: str, image_size: int, batch_size: int, images: int) -> float:
    """images/s of the frozen backbone on one preprocessed batch already in memory."""
    spec = get_backbone("vgg16")
    weights = resolve_weights("vgg16", "imagenet", spec.keras_weights, spec.pretrained_default)
    extractor = FeatureExtractor(build_backbone(spec, image_size, precision, weights), spec.default_layers, "none")
    batch = preprocess(tf.random.uniform((batch_size, image_size, image_size, 3)) * 255, weights.preprocessing)
    extractor(batch)  # trace and warm up
    batches = max(1, images // batch_size)
    started = time.perf_counter()
    for _ in range(batches):
        extractor(batch)
    return batches * batch_size / (time.perf_counter() - started)


def pipeline_run(data: Path, precision: str, image_size: int, batch_size: int) -> ExtractSummary:
    with tempfile.TemporaryDirectory() as cache:
        return extract_features(ExtractOptions(data=data, precision=precision, image_size=image_size,
                                               batch_size=batch_size, cache_root=Path(cache), progress=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/elpv"))
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--image-size", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"TensorFlow {tf.__version__}, GPU: {bool(tf.config.list_physical_devices('GPU'))}")
    rates = {}
    for precision in args.precision:
        summary = pipeline_run(args.data, precision, args.image_size, args.batch_size)
        pipeline = summary.images_per_second
        limit = backbone_limit(precision, args.image_size, args.batch_size, min(summary.new, 1024))
        rates[precision] = pipeline
        waited = summary.input_wait_seconds / summary.backbone_seconds
        print(f"vgg16 {args.image_size}px {precision}: limit {limit:.1f} img/s, extract {pipeline:.1f} img/s "
              f"({summary.new} images), extract/limit {pipeline / limit:.2f}, "
              f"backbone waited for input {waited:.1%} of the time")
    if {"fp32", "bf16"} <= rates.keys():
        print(f"bf16/fp32 extract speed-up: {rates['bf16'] / rates['fp32']:.1f}x")


if __name__ == "__main__":
    main()
