"""Stage one on a GPU, in one go: the backbone alone, decoding alone, the seeds' loop and `extract`,
side by side, for VGG16 and ResNet50, with the ratios.

    python bench/gpu.py --check      # in seconds: is everything there?
    python bench/gpu.py [--backend jax] [--images 2048] [--image-size 224] [--batch-size 256]
                        [--precision mixed] [--backbones vgg16,resnet50] [--wheels bench/wheels]
                        [--work bench/work/gpu] [--json bench/results/gpu.json]

Made for a GPU machine that has JAX but no TensorFlow or Keras: when Keras cannot be imported,
the wheels in --wheels (`make gpu-wheels` downloads them here: keras 3.15.1 is pure Python,
optree, namex, absl-py and rich are small) are unpacked first, from that folder only. It makes
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
and extract / seeds.

Its one try on a lent GPU cannot be wasted:
- `--check` answers in seconds: it imports everything the run needs, lists JAX's devices, builds
  every backbone and runs one batch through it, and says what is missing (exit status 1);
- Keras comes from the carried wheels, the ones bench/gpu-wheels.txt lists (the list `make
  gpu-wheels` downloads), unpacked into a private folder under --work and put at the end of the
  import path: the machine's interpreter is never installed into, and what it has wins;
- the JSON (--json) is rewritten after every row, so a crash keeps what was measured.
tests/test_gpu_bench.py runs it (and --check) on a CPU from a virtual environment holding only
what the GPU machines hold (numpy, jax, h5py, pillow, tqdm, scikit-learn, joblib) and the wheels,
with TensorFlow unimportable.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

WHEELS = ROOT / "bench" / "wheels"
WHEEL_LIST = ROOT / "bench" / "gpu-wheels.txt"  # shared with `make gpu-wheels`
IMAGE_SETS = {  # name: (width, height, channels, format)
    "elpv-like 300x300 gray png": (300, 300, 1, "PNG"),
    "photo-like 500x375 colour jpeg": (500, 375, 3, "JPEG"),
}
NEEDED = ("numpy", "jax", "h5py", "PIL", "tqdm", "sklearn", "joblib")  # on the machine already


def wheel_requirements() -> list[str]:
    """The requirements of bench/gpu-wheels.txt (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in WHEEL_LIST.read_text().splitlines())
    return [line for line in lines if line]


def _normalised(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _fits_this_python(wheel: Path) -> bool:
    """A wheel's tags (name-version[-build]-python-abi-platform.whl) fit this interpreter: pure
    Python, or CPython of this version on Linux x86-64."""
    import platform

    python, abi, plat = wheel.stem.split("-")[-3:]
    ours = f"cp{sys.version_info.major}{sys.version_info.minor}"
    pythons, platforms = python.split("."), plat.split(".")
    machine = platform.machine()
    return (any(tag in ("py3", "py2.py3", ours) or tag == "py" + str(sys.version_info.major) for tag in pythons)
            and abi in ("none", ours, "abi3")
            and any(tag == "any" or (tag.startswith(("manylinux", "linux")) and tag.endswith(machine))
                    for tag in platforms))


def install_wheels(wheels: Path, site: Path) -> list[str]:
    """Unpack the listed wheels found in `wheels` into `site` (a private folder) and put it at the
    end of sys.path. Returns the requirements no fitting wheel was found for. A wheel is a zip
    of files laid out as site-packages holds them: unpacking is installing, without pip."""
    import importlib
    import zipfile

    missing = []
    site.mkdir(parents=True, exist_ok=True)
    for requirement in wheel_requirements():
        name, _, version = requirement.partition("==")
        candidates = sorted(w for w in wheels.glob("*.whl") if _normalised(w.name.split("-")[0]) == _normalised(name)
                            and (not version or w.name.split("-")[1] == version) and _fits_this_python(w))
        if not candidates:
            missing.append(requirement)
            continue
        marker = site / f".{candidates[-1].name}.unpacked"
        if not marker.exists():
            with zipfile.ZipFile(candidates[-1]) as archive:
                archive.extractall(site)
            marker.touch()
    if str(site) not in sys.path:
        sys.path.append(str(site))  # last: what the machine has wins
    importlib.invalidate_caches()
    return missing


def ensure_keras(wheels: Path, site: Path) -> str:
    """Keras importable: the machine's own, else from the carried wheels (a GPU machine with JAX
    only). Returns where it came from; exits in one line when it cannot be had."""
    if importlib.util.find_spec("keras") is not None:
        return "keras: the machine's own"
    if not wheels.is_dir() or not any(wheels.glob("*.whl")):
        sys.exit(f"error: Keras is not installed and {wheels} holds no wheels: run `make gpu-wheels` where PyPI "
                 "can be reached, and carry that folder along")
    missing = install_wheels(wheels, site)
    if missing:
        sys.exit(f"error: {wheels} has no wheel for this Python ({sys.version.split()[0]}) of: {', '.join(missing)}: "
                 "run `make gpu-wheels` for the GPU machine's Python")
    return f"keras: from {wheels}, unpacked into {site}"


def check(args: argparse.Namespace) -> int:
    """Everything the run needs, in seconds: modules, Keras from the wheels, JAX's devices, every
    backbone built and run on one batch. Prints one line per check; 1 when anything is missing."""
    problems = []
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    for module in NEEDED:
        try:
            imported = importlib.import_module(module)
            print(f"ok       {module} {getattr(imported, '__version__', '')}")
        except ImportError as error:
            problems.append(f"{module} ({error})")
            print(f"MISSING  {module}: {error}")
    try:
        print(f"ok       {ensure_keras(args.wheels, args.work / 'site')}")
    except SystemExit as stop:
        problems.append("keras")
        print(f"MISSING  {stop.code}")
    if problems:
        print(f"check failed: {', '.join(problems)}")
        return 1
    from pipeline import backend

    backend.select(args.backend)
    import numpy as np

    if args.backend == "jax":
        import jax

        devices = jax.devices()
        print(f"ok       jax devices: {', '.join(f'{d.platform}:{d.device_kind}' for d in devices)}")
        if not any(d.platform == "gpu" for d in devices):
            print("note     no GPU among JAX's devices: the figures would be a CPU's")
    from pipeline.backbone.network import FeatureExtractor, build_backbone, preprocess
    from pipeline.backbone.precision import resolve_precision
    from pipeline.backbone.registry import get_backbone

    precision = resolve_precision(args.precision)
    for name in args.backbones.split(","):
        try:
            spec = get_backbone(name)
            weights = spec.resolve_weights("none")
            extractor = FeatureExtractor(build_backbone(spec, 64, precision, weights), spec.default_layers, "none")
            batch = preprocess(np.zeros((2, 64, 64, 3), np.float32), weights.preprocessing)
            shapes = {layer: tuple(np.asarray(v).shape) for layer, v in extractor(batch).items()}
            print(f"ok       {name} ({precision}) builds and runs: {shapes}")
        except Exception as error:  # noqa: BLE001 - every failure is a line of the report
            problems.append(name)
            print(f"FAILED   {name}: {type(error).__name__}: {str(error)[:200]}")
    try:
        args.work.mkdir(parents=True, exist_ok=True)
        probe = args.work / ".probe"
        probe.write_text("")
        probe.unlink()
        print(f"ok       {args.work} is writable")
    except OSError as error:
        problems.append(f"{args.work} ({error.strerror})")
        print(f"FAILED   {args.work}: {error.strerror}")
    print("check passed: the run can start" if not problems else f"check failed: {', '.join(problems)}")
    return 1 if problems else 0


def write_json(path: Path, report: dict) -> None:
    """The report so far, replaced whole (a crash between rows keeps the rows before it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(report, indent=2))
    os.replace(temporary, path)


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
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON (after every row)")
    parser.add_argument("--check", action="store_true",
                        help="in seconds: imports, Keras from the wheels, JAX's devices, every backbone built and run "
                             "once; exit status 1 and what is missing")
    args = parser.parse_args()
    if args.check:
        sys.exit(check(args))

    from pipeline import backend

    print(ensure_keras(args.wheels, args.work / "site"), flush=True)
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
    report = {"machine": machine_line(), "precision": precision, "image_size": args.image_size,
              "batch_size": args.batch_size}
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
            if args.json:
                write_json(args.json, report | {"rows": records, "complete": False})
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
        write_json(args.json, report | {"rows": records, "complete": True})


if __name__ == "__main__":
    main()
