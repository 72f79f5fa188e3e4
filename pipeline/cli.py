"""Command-line front door: parses arguments and calls one stage function per subcommand.

Errors a user can cause print one line on stderr and exit non-zero; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import PipelineError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _layers(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_pipeline.py", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    extract = commands.add_parser("extract", help="stage one: cache backbone features of an image folder")
    extract.add_argument("--data", type=Path, required=True,
                         help="DIR/<class>/<image> or DIR/{train,validation|val,test}/<class>/<image>")
    extract.add_argument("--backbone", default="vgg16", help="vgg16 (default) or resnet50")
    extract.add_argument("--image-size", type=_positive_int, default=None,
                         help="square input size (default: 150 for vgg16, 224 for resnet50)")
    extract.add_argument("--pooling", default="none", choices=("none", "avg", "max"),
                         help="none keeps the full feature map (default)")
    extract.add_argument("--layer", type=_layers, default=None, metavar="NAME[,NAME...]",
                         help="feature layer(s) (default: the last convolutional block's output)")
    extract.add_argument("--precision", default=None, choices=("fp32", "bf16", "mixed"),
                         help="default: mixed on a GPU, bf16 on a CPU with bf16 hardware, else fp32")
    extract.add_argument("--weights", default="imagenet",
                         help="imagenet (default), torchvision (vgg16), keras, none (random, for tests) or a file")
    extract.add_argument("--preprocessing", default=None, choices=("torch", "caffe"),
                         help="override the preprocessing that follows from --weights (for a weights file)")
    extract.add_argument("--batch-size", type=_positive_int, default=32)
    extract.add_argument("--shard-size", type=_positive_int, default=1024, help="images per HDF5 shard")
    extract.add_argument("--cache", type=Path, default=Path("features"), help="cache root (default features/)")
    extract.add_argument("--val-fraction", type=float, default=0.15, help="for DIR/<class>/ layouts")
    extract.add_argument("--test-fraction", type=float, default=0.15, help="for DIR/<class>/ layouts")
    extract.add_argument("--split-seed", type=int, default=0, help="for DIR/<class>/ layouts")
    extract.add_argument("--rehash", action="store_true",
                         help="hash every file again instead of trusting remembered size and mtime")
    extract.add_argument("--no-progress", action="store_true", help="no progress bar")
    extract.add_argument("--json", action="store_true", help="print the summary as JSON")
    extract.set_defaults(handler=_extract)

    demo = commands.add_parser("demo-data", help="export the ELPV solar-cell images into DIR/<class>/")
    demo.add_argument("--out", type=Path, default=Path("data/elpv"))
    demo.add_argument("--classes", default="binary", choices=("binary", "4class"),
                      help="binary: functional (p<0.5) vs defective; 4class: p = 0, 1/3, 2/3, 1")
    demo.set_defaults(handler=_demo_data)
    return parser


def _extract(args: argparse.Namespace) -> int:
    from pipeline.dataset import SplitConfig
    from pipeline.extract import ExtractOptions, extract_features

    summary = extract_features(ExtractOptions(
        data=args.data,
        backbone=args.backbone,
        image_size=args.image_size,
        pooling=args.pooling,
        layers=args.layer,
        precision=args.precision,
        weights=args.weights,
        preprocessing=args.preprocessing,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        cache_root=args.cache,
        splits=SplitConfig(args.val_fraction, args.test_fraction, args.split_seed),
        rehash=args.rehash,
        progress=not args.no_progress,
    ))
    if args.json:
        print(json.dumps(summary.as_dict() | {"skipped_images": summary.skipped}, indent=2))
        return 0
    print(
        f"extracted: {summary.images} images in cache, {summary.new} new, {summary.reused} reused, "
        f"{len(summary.skipped)} skipped; {summary.seconds:.1f} s"
        + (f", {summary.images_per_second:.1f} images/s through the backbone" if summary.new else "")
    )
    shown = 20
    for item in summary.skipped[:shown]:
        print(f"  skipped {item['path']}: {item['reason']}")
    if len(summary.skipped) > shown:
        print(f"  ... and {len(summary.skipped) - shown} more: see skipped in {summary.cache_dir / 'manifest.json'}")
    print(f"cache: {summary.cache_dir}")
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from pipeline.demo_data import export_elpv

    counts = export_elpv(args.out, args.classes)
    listing = ", ".join(f"{name} {count}" for name, count in counts.items())
    print(f"ELPV: {sum(counts.values())} images in {args.out} ({listing}); licence CC BY-NC-SA 4.0")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except PipelineError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
