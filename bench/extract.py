"""Extraction speed and memory: the backbone alone, the seeds' loop and `extract`, side by side.

    .venv/bin/python -m bench.extract [--data data/elpv] [--images 512] [--sizes 150 224]
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

Then the engines, in the same run: `extract --engine local` against `--engine ray` on the same
images (VGG16 150 px, --engine-precision, shards of 128 so that decoding and the backbone
overlap), images/s of the extraction loop and wall-clock seconds of the whole call, and the
ratio (goal: Ray within 10% of local on one machine); and the driver's cost of listing and
planning synthetic file records (no images: a fake scan) at 100,000 and 1,000,000 records:
seconds and peak Python memory per record, for a first run and for an unchanged folder.
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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.common import machine_line, markdown_table  # noqa: E402
from pipeline.backbone.network import FeatureExtractor, build_backbone, preprocess  # noqa: E402
from pipeline.backbone.precision import resolve_precision  # noqa: E402
from pipeline.backbone.registry import get_backbone  # noqa: E402
from pipeline.extraction.extract import ExtractOptions, extract_features  # noqa: E402
from pipeline.images.formats import IMAGE_EXTENSIONS  # noqa: E402

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
    from pipeline.training.train import TrainOptions, run_training

    accuracy = {}
    for precision in ("fp32", "bf16"):
        cache = extract_features(ExtractOptions(data=data, precision=precision, cache_root=work / "features",
                                                progress=sys.stderr.isatty())).cache_dir
        run = run_training(TrainOptions(head="logreg", features=cache, models=work / "models", pooling="avg",
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


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}" if denominator > 0 else "-"


def engine_rows(data: Path, images: int, precision: str, work: Path) -> list[list[str]]:
    """The local and Ray engines on the same folder, one fresh cache each, local first. A folder
    with fewer images than asked gives rows for what it has (a rate of nothing is shown as -)."""
    folder = subset_folder(data, images, work / f"engines-subset-{images}")
    found = sum(1 for f in folder.rglob("*") if f.is_symlink())  # fewer where a class runs out
    rows, rates = [], {}
    for engine in ("local", "ray"):
        options = ExtractOptions(data=folder, precision=precision, image_size=150, batch_size=BATCH, shard_size=128,
                                 cache_root=work / f"engine-{engine}-{images}", progress=False, engine=engine)
        started = time.perf_counter()
        summary = extract_features(options)
        wall = time.perf_counter() - started
        working = summary.loop_seconds - summary.warmup_seconds  # from the backbone's first batch on
        rates[engine] = (summary.images_per_second, summary.new / wall if wall > 0 else 0.0,
                         summary.new / working if working > 0 else 0.0)
        rows.append([f"{engine}, {found} images", str(summary.new), f"{summary.images_per_second:.1f}",
                     f"{rates[engine][2]:.1f}",
                     f"{wall:.1f} s",
                     f"{wall - summary.loop_seconds:.1f} s", f"{summary.warmup_seconds:.1f} s",
                     f"{summary.actor_build_seconds:.1f} s"])
        print(" | ".join(rows[-1]), flush=True)
    local, ray = rates["local"], rates["ray"]
    rows.append([f"ray/local, {found} images", "", _ratio(ray[0], local[0]), _ratio(ray[2], local[2]),
                 f"{_ratio(ray[1], local[1])} (images per wall-clock second)", "", "", ""])
    return rows


def _plan_once(count: int) -> dict[str, float]:
    """One pass of the driver's steps on `count` synthetic records; seconds per step."""
    from pipeline.cache.fingerprint import Fingerprint
    from pipeline.cache.store import ShardIndex
    from pipeline.data.dataset import ImageRecord, ScannedDataset
    from pipeline.extraction.plan import ShardWriter, cut_units, plan_update
    from pipeline.extraction.ray_engine import unit_rows

    fingerprint = Fingerprint("vgg16", "none", "random-seed-0", 150, "area-down-bilinear-up", "torch",
                              ("block5_pool",), "none", "bf16", "2.21")
    classes = [f"class{c}" for c in range(4)]
    seconds = {}
    started = time.perf_counter()
    records = [ImageRecord(f"class{i % 4}/img{i:08d}.png", i % 4, "train", "", 90_000 + i % 1000,
                           1_700_000_000_000_000_000 + i) for i in range(count)]
    seconds["list"] = time.perf_counter() - started
    started = time.perf_counter()
    plan = plan_update(ScannedDataset(Path("/synthetic"), "class-folders", classes, records), [], set())
    units = unit_rows(cut_units(plan.extract, 1024), ShardWriter(Path("/synthetic-cache"), classes, fingerprint))
    seconds["first"] = time.perf_counter() - started
    seconds["units"] = len(units)
    del units, plan
    # the next run: every file known to the hash index, every row in a shard
    known = [ImageRecord(r.path, r.label, r.split, f"{i:064x}", r.size, r.mtime_ns) for i, r in enumerate(records)]
    del records
    shards = [ShardIndex(Path(f"/synthetic-cache/shard-{n:05d}.h5"), "u", classes,
                         [r.path for r in known[s:s + 1024]], [r.sha256 for r in known[s:s + 1024]],
                         np.array([r.label for r in known[s:s + 1024]], np.int32),
                         [r.split for r in known[s:s + 1024]]) for n, s in enumerate(range(0, count, 1024))]
    started = time.perf_counter()
    unchanged = plan_update(ScannedDataset(Path("/synthetic"), "class-folders", classes, known), shards, set())
    seconds["unchanged"] = time.perf_counter() - started
    assert not unchanged.extract and not unchanged.copy and not unchanged.rewrite
    return seconds


def plan_rows(counts: list[int]) -> list[list[str]]:
    """The driver's work before any image is read, on synthetic records: list (records as a scan
    that reads no image makes them), plan a first run (no cache: every image to extract, cut into
    units, described and keyed), and plan an unchanged folder against shards holding every row
    (their indexes made in memory, as if read). Timed in one pass, memory (tracemalloc's peak,
    which includes the records and shard indexes themselves) in a second."""
    import tracemalloc

    rows = []
    for count in counts:
        seconds = _plan_once(count)
        tracemalloc.start()
        _plan_once(count)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        per = [seconds[k] / count * 1e6 for k in ("list", "first", "unchanged")]
        rows.append([f"{count:,}", f"{seconds['list']:.2f} s",
                     f"{seconds['first']:.2f} s ({seconds['units']:.0f} units)",
                     f"{seconds['unchanged']:.2f} s", " / ".join(f"{v:.1f}" for v in per) + " us",
                     f"{peak / 2**20:.0f} MB", f"{peak / count:.0f} B"])
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
    parser.add_argument("--skip-speed", action="store_true", help="only the engine and plan tables")
    parser.add_argument("--engine-precision", default="bf16", help="precision of the local/Ray comparison")
    parser.add_argument("--plan-records", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--engine-images", type=int, nargs="+", default=[512, 2624],
                        help="folder sizes of the local/Ray comparison (default 512 and all of ELPV)")
    parser.add_argument("--skip-engines", action="store_true")
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
        tables, speedups = [], {}
        if not args.skip_speed:
            print(" | ".join(header), flush=True)
            rows, rates = speed_table(args.data, args.images, args.sizes, args.precision, work)
            result["speed"] = [dict(zip(header, row)) for row in rows]
            tables.append(markdown_table(header, rows))
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
        if not args.skip_engines:
            engine_header = ["engine", "new images", "loop img/s", "img/s once the backbone began", "wall clock",
                             "outside the loop (scan, plan, start-up, manifest)", "until the backbone began",
                             "of which actor set-up"]
            engines = []
            for count in args.engine_images:
                print(f"engines: VGG16 150 px {args.engine_precision}, {count} images, shards of 128:", flush=True)
                engines += engine_rows(args.data, count, args.engine_precision, work)
            result["engines"] = [dict(zip(engine_header, row)) for row in engines]
            tables.append(markdown_table(engine_header, engines))
        plan_header = ["records", "list", "plan a first run (cut, describe, key units)", "plan unchanged",
                       "per record: list / first / unchanged", "peak Python memory", "per record"]
        print("driver: list and plan synthetic records:", flush=True)
        plans = plan_rows(args.plan_records)
        result["plan"] = [dict(zip(plan_header, row)) for row in plans]
        tables.append(markdown_table(plan_header, plans))
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
