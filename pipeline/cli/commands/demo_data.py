"""demo-data: the ELPV solar-cell images exported into a class folder layout."""

from __future__ import annotations

import argparse
from typing import Annotated

from pipeline.cli.flags import add_declared
from pipeline.options import Option, PathLike, defined

NAME = "demo-data"
HELP = "export the ELPV solar-cell images into DIR/<class>/"
INTERRUPTED = "rerun the command to finish exporting the images"


def images(out: Annotated[PathLike, Option(rule="path")] = "data/elpv",
           classes: Annotated[str, Option("binary: functional (p<0.5) vs defective; 4class: p = 0, 1/3, 2/3, 1",
                                          choices=defined("data.demo:CLASSINGS"))] = "binary") -> dict[str, int]:
    """ELPV's images written into `out`/<class>/: the class counts."""
    from pathlib import Path

    from pipeline.data.demo import export_elpv

    return export_elpv(Path(out), classes)


def add(parser: argparse.ArgumentParser) -> None:
    add_declared(parser, images)


def run(args: argparse.Namespace) -> int:
    counts = images(args.out, args.classes)
    listing = ", ".join(f"{name} {count}" for name, count in counts.items())
    print(f"ELPV: {sum(counts.values())} images in {args.out} ({listing}); licence CC BY-NC-SA 4.0")
    return 0
