"""The image path alone (read, hash, decode, resize, preprocess) on every core, with OpenBLAS's own
thread pool left as it is (the baseline: one BLAS thread a core inside every decode thread) and
with one BLAS thread per decode thread (the pipeline), side by side in one run, for 1, 4 and all
decode threads.

    python -m bench.decode [--images 1024] [--image-size 224] [--json FILE]

Pillow's path only (the JAX backend's, and the GPU machines'): TensorFlow's own path decodes in
tf.data and never calls NumPy's BLAS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rate(folder: str, size: int, workers: int) -> float:
    from pipeline.backbone.network import preprocess
    from pipeline.images.reading import EncodedImages
    from pipeline.serving.predict import image_files

    source = EncodedImages(image_files([Path(folder)]))
    started = time.perf_counter()
    count = sum(len(i) for i, _ in source.batches(size, 128, lambda x: preprocess(x, "caffe"), workers=workers))
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "decode")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # folder, size, workers: one measurement
    args = parser.parse_args()
    if args.one:
        from bench.gpu import WHEELS, ensure_keras

        ensure_keras(WHEELS, args.work / "site")  # the GPU machines have no Keras of their own
        print(rate(args.one[0], int(args.one[1]), int(args.one[2])))
        return
    from bench.gpu import IMAGE_SETS, make_images

    cores = len(os.sched_getaffinity(0))
    rows = []
    for name, (width, height, channels, fmt) in IMAGE_SETS.items():
        folder = make_images(args.work / name.split()[0], args.images, width, height, channels, fmt)
        for path in folder.rglob("*.*"):  # every file read once first: both sides read from the page cache
            path.read_bytes()
        for workers in sorted({1, min(4, cores), cores}):
            measured = {}
            for blas in ("all", "one"):  # each in a fresh process: the pool's size is fixed at start
                env = dict(os.environ, KERAS_BACKEND="jax", PIPELINE_DECODE_BLAS_THREADS=blas)
                out = subprocess.run([sys.executable, "-m", "bench.decode", "--one", str(folder), str(args.image_size),
                                      str(workers)], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
                measured[blas] = float(out.stdout.strip().splitlines()[-1])
            row = {"images": name, "decode threads": workers, "baseline (BLAS pool per thread)": measured["all"],
                   "pipeline (one BLAS thread each)": measured["one"], "ratio": measured["one"] / measured["all"]}
            rows.append(row)
            print(f"{name}, {workers} decode threads: {measured['all']:,.0f} -> {measured['one']:,.0f} images/s "
                  f"({row['ratio']:.2f}x)", flush=True)
            if args.json:
                args.json.write_text(json.dumps({"cores": cores, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
