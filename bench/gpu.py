"""Stage one on a GPU, in one go: the backbone alone, decoding alone, the seeds' loop and `extract`,
side by side, for VGG16 and ResNet50, with the ratios.

    python bench/gpu.py [--backend jax] [--images 2048] [--image-size 224] [--batch-size 256]
                        [--precision mixed] [--backbones vgg16,resnet50] [--wheels bench/wheels]
                        [--work bench/work/gpu] [--json bench/results/gpu.json]

Made for a GPU machine that has JAX but no TensorFlow or Keras: when Keras cannot be imported,
the wheels in --wheels (`make gpu-wheels` downloads them here: keras 3.15.1 is pure Python,
optree, namex, absl-py and rich are small) are installed first, from that folder only. It makes
its own images (an ELPV-like set, 300x300 grayscale PNG, and a photo-like one, 500x375 colour
JPEG: speed does not depend on the pixels, and the real data is too large to carry), and uses
`--weights none` (speed does not depend on the weights' values either). For each backbone and
image set, on the same images, batch size and precision:

  1. backbone: the jitted forward pass alone on a batch already on the device (no transfer);
  2. decode: the pipeline's image path alone (read, hash, decode, squash, preprocess) on every core;
  3. seeds: the classic loop, keras.utils.load_img per image and model.predict per batch;
  4. extract: the pipeline's `extract` end to end, files to finished shards: new images per second
     once its backbone is compiled (after the first batch; the backbone-alone figure excludes
     compilation too), of its whole extraction loop, and of the whole call (set-up included).

Ratios: extract / min(backbone, decode) (goal >= 0.9: extract as fast as its slower half allows)
and extract / seeds. It also runs on a CPU with a handful of images (tests/test_bench.py), so
that minutes on a GPU machine measure, not debug.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

WHEELS = ROOT / "bench" / "wheels"
KERAS_WHEELS = ("keras==3.15.1", "optree", "namex", "absl-py", "rich", "markdown-it-py", "mdurl", "pygments",
                "packaging", "typing-extensions")  # as the Makefile's GPU_WHEELS
IMAGE_SETS = {  # name: (width, height, channels, format)
    "elpv-like 300x300 gray png": (300, 300, 1, "PNG"),
    "photo-like 500x375 colour jpeg": (500, 375, 3, "JPEG"),
}


def ensure_keras(wheels: Path) -> None:
    """Install Keras from the carried wheels when this Python has none (a GPU machine with JAX only)."""
    if importlib.util.find_spec("keras") is not None:
        return
    if not wheels.is_dir() or not any(wheels.glob("*.whl")):
        sys.exit(f"error: Keras is not installed and {wheels} holds no wheels: run `make gpu-wheels` where PyPI "
                 "can be reached, and carry that folder along")
    print(f"installing Keras from {wheels} (no index) ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheels),
                    *KERAS_WHEELS], check=True)


def make_images(folder: Path, count: int, width: int, height: int, channels: int, fmt: str) -> Path:
    """`count` random images in two class folders, written by every core."""
    import numpy as np
    from PIL import Image

    if folder.is_dir() and len(list(folder.rglob("*.*"))) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)

    def write(index: int) -> None:
        rng = np.random.default_rng(index)
        base = rng.integers(0, 256, (height // 8, width // 8, channels), dtype=np.uint8)
        pixels = np.kron(base, np.ones((8, 8, 1), np.uint8))[:height, :width]  # blocky: compresses like a photo
        pixels = np.clip(pixels.astype(int) + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
        path = folder / f"class{index % 2}" / f"img{index:06d}.{fmt.lower().replace('jpeg', 'jpg')}"
        image.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))

    for name in ("class0", "class1"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write, range(count)))
    return folder


def backbone_rate(extractor, batch_size: int, size: int, seconds: float) -> float:
    """Images/s of the backbone alone on one preprocessed batch already on the device."""
    import numpy as np

    from pipeline import backend

    rng = np.random.default_rng(0)
    batch = rng.normal(size=(batch_size, size, size, 3)).astype(np.float32)
    if backend.is_tensorflow():
        import tensorflow as tf

        device_batch = tf.constant(batch)

        def step():
            return {k: v.numpy() for k, v in extractor.on_device(device_batch).items()}
    else:
        import jax

        device_batch = jax.device_put(batch)

        def step():
            return jax.block_until_ready(extractor.on_device(device_batch))
    step()  # compiles
    passes, started = 0, time.perf_counter()
    while passes < 3 or time.perf_counter() - started < seconds:
        step()
        passes += 1
    return passes * batch_size / (time.perf_counter() - started)


def decode_rate(folder: Path, size: int, batch_size: int, preprocessing: str) -> float:
    """Images/s of the pipeline's image path alone: every file read, hashed, decoded, squashed and
    preprocessed, on every core, as extract feeds the backbone."""
    from pipeline.backbone.network import preprocess
    from pipeline.images.reading import EncodedImages
    from pipeline.serving.predict import image_files

    files = image_files([folder])
    source = EncodedImages(files)
    started = time.perf_counter()
    count = sum(len(indices) for indices, _ in source.batches(size, batch_size, lambda x: preprocess(x, preprocessing)))
    return count / (time.perf_counter() - started)


def seeds_rate(folder: Path, model, size: int, batch_size: int, preprocessing: str, limit: int) -> float:
    """The blog recipe: load_img one by one, model.predict per batch (compilation excluded: one
    batch first)."""
    import keras
    import numpy as np

    from pipeline.backbone.network import preprocess
    from pipeline.serving.predict import image_files

    paths = image_files([folder])[:limit]

    def load(batch_paths):
        return np.stack([keras.utils.img_to_array(keras.utils.load_img(p, target_size=(size, size), color_mode="rgb"))
                         for p in batch_paths])

    model.predict(preprocess(load(paths[:batch_size]), preprocessing), verbose=0, batch_size=batch_size)
    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        model.predict(preprocess(load(paths[start:start + batch_size]), preprocessing), verbose=0,
                      batch_size=batch_size)
    return len(paths) / (time.perf_counter() - started)


def extract_rates(folder: Path, cache: Path, backbone: str, size: int, batch_size: int, precision: str) -> dict:
    from pipeline.extraction.extract import ExtractOptions, extract_features

    shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    summary = extract_features(ExtractOptions(data=folder, backbone=backbone, image_size=size, weights="none",
                                              precision=precision, batch_size=batch_size, shard_size=4 * batch_size,
                                              cache_root=cache, progress=False))
    wall = time.perf_counter() - started
    return {"loop": summary.images_per_second, "warm": summary.warm_images_per_second,
            "wall": summary.new / wall if wall > 0 else 0.0, "warmup_seconds": summary.warmup_seconds,
            "input_wait_share": summary.input_wait_seconds / summary.loop_seconds if summary.loop_seconds else 0.0,
            "new": summary.new}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"), choices=("jax", "tensorflow"))
    parser.add_argument("--images", type=int, default=2048, help="images per image set")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default="mixed", choices=("fp32", "bf16", "mixed"))
    parser.add_argument("--backbones", default="vgg16,resnet50")
    parser.add_argument("--seeds-images", type=int, default=1024, help="images the (slow) seeds' loop reads")
    parser.add_argument("--backbone-seconds", type=float, default=10.0, help="seconds of the backbone-alone loop")
    parser.add_argument("--wheels", type=Path, default=WHEELS)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "gpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()

    from pipeline import backend

    ensure_keras(args.wheels)
    backend.select(args.backend)
    from bench.common import machine_line, markdown_table
    from pipeline.backbone.network import FeatureExtractor, build_backbone
    from pipeline.backbone.precision import resolve_precision
    from pipeline.backbone.registry import get_backbone

    began = time.perf_counter()
    print(machine_line(), flush=True)
    precision = resolve_precision(args.precision)
    backend.exact_float32(precision)
    print(f"{args.images} images per set, {args.image_size} px, batch {args.batch_size}, {precision}, "
          f"--weights none (speed does not depend on the weights' values)", flush=True)
    folders = {name: make_images(args.work / "images" / str(index), args.images, *shape)
               for index, (name, shape) in enumerate(IMAGE_SETS.items())}
    rows, records = [], []
    for name in args.backbones.split(","):
        spec = get_backbone(name)
        weights = spec.resolve_weights("none")
        model = build_backbone(spec, args.image_size, precision, weights)
        extractor = FeatureExtractor(model, spec.default_layers, "none")
        alone = backbone_rate(extractor, args.batch_size, args.image_size, args.backbone_seconds)
        print(f"{name}: backbone alone {alone:,.0f} images/s", flush=True)
        for set_name, folder in folders.items():
            decode = decode_rate(folder, args.image_size, args.batch_size, weights.preprocessing)
            seeds = seeds_rate(folder, model, args.image_size, args.batch_size, weights.preprocessing,
                               args.seeds_images)
            extract = extract_rates(folder, args.work / "cache", name, args.image_size, args.batch_size,
                                    args.precision)
            bound = min(alone, decode)
            warm = extract["warm"] or extract["loop"]
            record = {"backbone": name, "images": set_name, "backbone_alone": alone, "decode": decode,
                      "seeds": seeds, "extract_warm": extract["warm"], "extract_loop": extract["loop"],
                      "extract_wall": extract["wall"], "compile_seconds": extract["warmup_seconds"],
                      "input_wait_share": extract["input_wait_share"], "extract_over_bound": warm / bound,
                      "extract_over_seeds": warm / seeds, "bound_by": "decode" if decode < alone else "backbone"}
            records.append(record)
            rows.append([name, set_name, f"{alone:,.0f}", f"{decode:,.0f}", f"{seeds:,.0f}", f"{warm:,.0f}",
                         f"{extract['loop']:,.0f} / {extract['wall']:,.0f}", f"{extract['warmup_seconds']:.1f}",
                         f"{record['extract_over_bound']:.2f}", record["bound_by"],
                         f"{record['extract_over_seeds']:.1f}x", f"{extract['input_wait_share']:.0%}"])
            print(f"  {set_name}: decode {decode:,.0f}, seeds {seeds:,.0f}, extract {warm:,.0f} images/s once "
                  f"compiled ({extract['warmup_seconds']:.1f} s to compile and run the first batch)", flush=True)
    print()
    print(markdown_table(["backbone", "images", "backbone alone", "decode alone (all cores)", "seeds' loop",
                          "extract once compiled", "extract loop / whole call", "first batch (s)",
                          "extract / min(backbone, decode)", "bound by", "extract / seeds",
                          "extract waiting for images"], rows))
    print(f"\nimages/s; goal extract / min >= 0.9; {time.perf_counter() - began:.0f} s in all")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_line(), "precision": precision,
                                         "image_size": args.image_size, "batch_size": args.batch_size,
                                         "rows": records}, indent=2))


if __name__ == "__main__":
    main()
