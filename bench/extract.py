"""Extraction speed and memory: the backbone alone, the seeds' loop and `extract`, side by side.

    .venv/bin/python bench/extract.py [--data data/elpv] [--images 512] [--sizes 150 224]
                                      [--precision fp32 bf16] [--skip-memory] [--skip-accuracy]

On the same images, batch size and precision, for VGG16 at each size:
  1. limit: the backbone's forward pass alone on a preprocessed batch already in memory;
  2. seeds: the classic loop that decodes images one by one (keras.utils.load_img), calls
     model.predict per batch and collects numpy arrays;
  3. extract: `run_pipeline.py extract` end to end, files on disk to finished shards.
Prints images/s and the ratios 3/1 and 3/2 against the targets (>= 0.95, >= 1.3), bf16 against
fp32 (>= 3.5x), the seconds and backbone passes of a second extract on the unchanged folder,
the test accuracy of the same logistic-regression head on fp32 and on bf16 features of the
whole folder (within 0.5 points), and the peak memory of extract on 1x and 4x the images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.common import machine_line, markdown_table  # noqa: E402
from pipeline.backbones import FeatureExtractor, build_backbone, preprocess  # noqa: E402
from pipeline.extract import ExtractOptions, extract_features  # noqa: E402
from pipeline.images import IMAGE_EXTENSIONS  # noqa: E402
from pipeline.precision import resolve_precision  # noqa: E402
from pipeline.registry import get_backbone  # noqa: E402

BATCH = 32
TARGETS = {"extract/limit": 0.95, "extract/seeds": 1.3, "bf16/fp32": 3.5, "accuracy points": 0.5}


def subset_folder(data: Path, images: int, destination: Path) -> Path:
    """The first `images` files of `data` (spread over its classes) as links in DIR/<class>/."""
    classes = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = {c: sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS) for c in classes}
    per_class = -(-images // len(classes))
    chosen = 0
    for c in classes:
        for f in files[c][:per_class]:
            if chosen == images:
                break
            target = destination / c.name / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f.resolve())
            chosen += 1
    return destination


def backbone_for(precision: str, size: int):
    """The VGG16 conv base exactly as extract builds it (weights, precision), and its preprocessing."""
    spec = get_backbone("vgg16")
    weights = spec.resolve_weights("imagenet")
    # "mixed" means mixed-fp16 on a GPU and mixed-bf16 on a CPU: resolved as extract resolves it
    return build_backbone(spec, size, resolve_precision(precision), weights), weights.preprocessing


def limit_rate(precision: str, size: int, images: int) -> float:
    backbone, preprocessing = backbone_for(precision, size)
    extractor = FeatureExtractor(backbone, get_backbone("vgg16").default_layers, "none")
    batch = preprocess(tf.random.uniform((BATCH, size, size, 3)) * 255, preprocessing)
    batches = max(1, images // BATCH)
    started = time.perf_counter()  # the first call traces the function, as extract's first batch does
    for _ in range(batches):
        extractor(batch)
    return batches * BATCH / (time.perf_counter() - started)


def seeds_rate(folder: Path, precision: str, size: int) -> float:
    """The seeds' way, timed from the first file read to the last array collected."""
    import keras

    model, preprocessing = backbone_for(precision, size)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    started = time.perf_counter()  # the first predict traces the model, as extract's first batch does
    features = []
    for start in range(0, len(paths), BATCH):
        pixels = np.stack([keras.utils.img_to_array(keras.utils.load_img(p, target_size=(size, size),
                                                                         interpolation="bilinear"))
                           for p in paths[start:start + BATCH]])
        features.append(model.predict(preprocess(pixels, preprocessing), verbose=0))
    np.concatenate(features)
    return len(paths) / (time.perf_counter() - started)


def extract_run(folder: Path, cache: Path, precision: str, size: int):
    return extract_features(ExtractOptions(data=folder, precision=precision, image_size=size, batch_size=BATCH,
                                           cache_root=cache, progress=False))


def speed_table(data: Path, images: int, sizes: list[int], precisions: list[str], work: Path) -> tuple[list, dict]:
    folder = subset_folder(data, images, work / "subset")
    rows, rates, rerun = [], {}, {}
    for size in sizes:
        for precision in precisions:
            cache = work / f"cache-{size}-{precision}"
            summary = extract_run(folder, cache, precision, size)
            # From the first batch requested to the last shard written: decoding, the backbone and
            # the shard writes, the same span as the seeds' loop is timed over. Start-up (scan,
            # hashing, building the model) is shown apart, as the wall-clock seconds of the run.
            pipeline = summary.images_per_second
            seeds = seeds_rate(folder, precision, size)
            limit = limit_rate(precision, size, summary.new)
            again = extract_run(folder, cache, precision, size)
            rerun[(size, precision)] = (again.seconds, again.backbone_batches)
            rates[(size, precision)] = pipeline
            waited = summary.input_wait_seconds / summary.loop_seconds
            rows.append([f"vgg16 {size}px", precision, f"{limit:.1f}", f"{seeds:.1f}", f"{pipeline:.1f}",
                         f"{pipeline / limit:.2f}", f"{pipeline / seeds:.2f}", f"{waited:.1%}",
                         f"{summary.seconds:.1f} s",
                         f"{again.seconds:.2f} s, {again.backbone_batches} passes"])
            print(" | ".join(rows[-1]), flush=True)
    return rows, rates


def accuracy_fp32_vs_bf16(data: Path, work: Path) -> dict[str, float]:
    """The same default logistic-regression head on fp32 and bf16 features of the whole folder."""
    from pipeline.train import TrainOptions, train_head

    accuracy = {}
    for precision in ("fp32", "bf16"):
        cache = extract_features(ExtractOptions(data=data, precision=precision, cache_root=work / "features",
                                                progress=sys.stderr.isatty())).cache_dir
        run = train_head(TrainOptions(head="logreg", features=cache, models=work / "models", pooling="avg",
                                      progress=False))
        accuracy[precision] = run.metrics["test"]["accuracy"]
    return accuracy


def peak_memory_mb(folder: Path, cache: Path) -> float:
    """Peak resident memory of one `extract` process (its own rusage, not the benchmark's)."""
    command = [sys.executable, str(ROOT / "run_pipeline.py"), "extract", "--data", str(folder), "--cache", str(cache),
               "--no-progress", "--image-size", "150", "--shard-size", "256"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"extract failed on {folder}")
    return usage.ru_maxrss / 1024


def memory_rows(data: Path, images: int, work: Path) -> list[list[str]]:
    rows = []
    for factor in (1, 4):
        folder = subset_folder(data, images * factor, work / f"memory-{factor}x")
        peak = peak_memory_mb(folder, work / f"memory-cache-{factor}x")
        rows.append([f"{factor}x", str(images * factor), f"{peak:.0f} MB"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/elpv"))
    parser.add_argument("--images", type=int, default=512, help="images per speed measurement (default 512)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[150, 224])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--work", type=Path, default=Path("bench/work"), help="where the accuracy caches are kept")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/extract.json"))
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} does not exist: run `run_pipeline.py demo-data` (or `make bench`) first")
    print(machine_line(), flush=True)
    result: dict = {"machine": machine_line(), "images": args.images, "batch_size": BATCH}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        header = ["backbone", "precision", "1 limit img/s", "2 seeds img/s", "3 extract img/s", "3/1", "3/2",
                  "3 waiting for input", "extract wall clock", "second extract"]
        print(" | ".join(header), flush=True)
        rows, rates = speed_table(args.data, args.images, args.sizes, args.precision, work)
        result["speed"] = [dict(zip(header, row)) for row in rows]
        tables = [markdown_table(header, rows)]
        speedups = {size: rates[(size, "bf16")] / rates[(size, "fp32")] for size in args.sizes
                    if (size, "bf16") in rates and (size, "fp32") in rates}
        if not args.skip_accuracy:
            accuracy = accuracy_fp32_vs_bf16(args.data, args.work)
            result["accuracy"] = accuracy
        if not args.skip_memory:
            print("extract peak memory (bf16, 150 px, shards of 256):", flush=True)
            memory = memory_rows(args.data, args.images, work)
            result["memory"] = memory
            tables.append(markdown_table(["images", "count", "peak resident memory"], memory))
    lines = []
    for size, speedup in speedups.items():
        lines.append(f"bf16/fp32 extract speed-up at {size}px: {speedup:.1f}x (target >= {TARGETS['bf16/fp32']}x)")
    if "accuracy" in result:
        a = result["accuracy"]
        lines.append(f"logreg (avg pooled, 150 px) test accuracy: fp32 {a['fp32']:.2%}, bf16 {a['bf16']:.2%}: "
                     f"{abs(a['fp32'] - a['bf16']) * 100:.2f} points apart (target <= {TARGETS['accuracy points']})")
    result["speedups"] = speedups
    print("\n" + "\n\n".join(tables) + "\n\n" + "\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
