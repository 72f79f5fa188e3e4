"""Fine-tuning seconds per epoch: end to end on images against `finetune --cached`, side by side.

    .venv/bin/python -m bench.finetune [--data data/elpv] [--images 512] [--sizes 150 300]
                                       [--unfreeze block5 block4] [--epochs 2]

On the same images, head, batch (16) and precision (bf16 features, mixed bfloat16 training), for
VGG16 at each size and each unfreeze point: `finetune` end to end (every epoch decodes every image
and runs the whole backbone) and `finetune --cached` (the layers above the unfreeze point and the
head, on activations of the layer below it read from the cache). Seconds per epoch are the
training time over the epochs run (validation included, first-epoch tracing included), and the
ratio is the speed-up (goal: >= 4x). The activations are extracted once, before, and that cost is
shown apart: it is paid once per cache, not per epoch or per run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import machine_line, markdown_table  # noqa: E402
from bench.extract import subset_folder  # noqa: E402
from pipeline.extraction.extract import ExtractOptions, extract_features  # noqa: E402
from pipeline.finetuning.finetune import FinetuneOptions, run_finetuning  # noqa: E402
from pipeline.training.train import TrainOptions, run_training  # noqa: E402

BELOW = {"block5": "block4_pool", "block4": "block3_pool"}


def measure(folder: Path, work: Path, size: int, unfreeze_points: list[str], epochs: int) -> list[list[str]]:
    layers = sorted({BELOW[u] for u in unfreeze_points} | {"block5_pool"})
    started = time.perf_counter()
    summary = extract_features(ExtractOptions(data=folder, image_size=size, layers=layers, precision="bf16",
                                              cache_root=work / "features", progress=False))
    extracted = time.perf_counter() - started
    head = run_training(TrainOptions(head="dense", features=summary.cache_dir, models=work / "models",
                                     layers=["block5_pool"], head_params={"epochs": 5}, progress=False)).directory
    rows = []
    for point in unfreeze_points:
        seconds = {}
        for cached in (False, True):
            run = run_finetuning(FinetuneOptions(source=str(head), models=work / "models", unfreeze=point,
                                                 epochs=epochs,
                                                patience=epochs, cached=cached, progress=False,
                                                name=f"{head.name}-{point}-{'cached' if cached else 'images'}"))
            seconds[cached] = run.config["seconds_per_epoch"]
        trained = "block5" if point == "block5" else "block4+5"
        rows.append([f"vgg16 {size}px", trained, BELOW[point], f"{seconds[False]:.1f}", f"{seconds[True]:.1f}",
                     f"{seconds[False] / seconds[True]:.1f}x",
                     f"{extracted:.0f} s ({summary.new} images, {'+'.join(layers)})"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/elpv"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="+", default=[150, 300])
    parser.add_argument("--unfreeze", nargs="+", default=["block5", "block4"], choices=sorted(BELOW))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/finetune.json"))
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} does not exist: run `run_pipeline.py demo-data` (or `make bench`) first")
    print(machine_line(), flush=True)
    header = ["backbone", "trained blocks", "cached layer", "end to end s/epoch", "cached s/epoch", "speed-up",
              "extract of the activations (once)"]
    print(" | ".join(header), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        folder = subset_folder(args.data, args.images, work / "subset")
        rows = [row for size in args.sizes for row in measure(folder, work, size, args.unfreeze, args.epochs)]
    print("\n" + markdown_table(header, rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_line(), "images": args.images, "epochs": args.epochs,
                                    "rows": [dict(zip(header, row)) for row in rows]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
