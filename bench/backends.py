"""`extract` on the TensorFlow and the JAX backend, side by side on the same images, alternating
rounds, each on a fresh cache in its own process (a process runs one backend):

    .venv/bin/python -m bench.backends [--data data/elpv] [--images 512] [--image-size 150]
                                       [--precision fp32] [--rounds 2]

Prints new images/s of the extraction loop once the backbone is warm (after the first batch) and
of the whole call, per backend and round, and the ratio jax / tensorflow of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from bench.common import cpu_model, markdown_table  # noqa: E402
from bench.extract import subset_folder  # noqa: E402


def one_extract(backend: str, folder: Path, cache: Path, size: int, precision: str) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    environment = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    result = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), "extract", "--data", str(folder),
                             "--cache", str(cache), "--image-size", str(size), "--precision", precision,
                             "--backend", backend, "--no-progress", "--json"],
                            cwd=ROOT, capture_output=True, text=True, env=environment, check=True)
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "elpv")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=150)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "mixed"))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        folder = subset_folder(args.data, args.images, Path(work) / "subset")
        runs: dict[str, list[dict]] = {"tensorflow": [], "jax": []}
        rows = []
        for round_ in range(1, args.rounds + 1):
            for backend in runs:
                summary = one_extract(backend, folder, Path(work) / "cache", args.image_size, args.precision)
                runs[backend].append(summary)
                wall = summary["new"] / summary["seconds"] if summary["seconds"] else 0.0
                rows.append([round_, backend, summary["new"], f"{summary['warm_images_per_second']:.1f}",
                             f"{summary['images_per_second']:.1f}", f"{wall:.1f}",
                             f"{summary['warmup_seconds']:.1f}"])
                print(f"round {round_} {backend}: {summary['warm_images_per_second']:.1f} images/s warm", flush=True)
    print(f"\n{cpu_model()}, {os.cpu_count()} cores; VGG16 {args.image_size} px {args.precision}, ImageNet weights, "
          f"{args.images} ELPV images, batch 32")
    print(markdown_table(["round", "backend", "new", "images/s warm", "images/s loop", "images/s whole call",
                          "first batch (s)"], rows))
    medians = {b: statistics.median(r["warm_images_per_second"] for r in runs[b]) for b in runs}
    print(f"\njax / tensorflow (median warm images/s): {medians['jax'] / medians['tensorflow']:.2f}")


if __name__ == "__main__":
    main()
