"""inspect: a backbone's layers with indices, types and blocks."""

from __future__ import annotations

import argparse
import json
from typing import Annotated

from pipeline.cli.flags import JSON_PLAIN, add_declared, add_flag
from pipeline.options import Option, backbone_help

NAME = "inspect"
HELP = "a backbone's layers with indices, types and blocks"
INTERRUPTED = None


def layers(backbone: Annotated[str, Option(backbone_help())] = "vgg16") -> list[dict]:
    """The layers of `backbone`: index, name, type, block, parameters, output shape."""
    from pipeline.backbone.blocks import describe_layers

    return describe_layers(backbone)


def add(parser: argparse.ArgumentParser) -> None:
    add_declared(parser, layers)
    add_flag(parser, "json", JSON_PLAIN)


def run(args: argparse.Namespace) -> int:
    rows = layers(args.backbone)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'index':>5}  {'name':<28} {'type':<22} {'block':<8} {'parameters':>10}  output")
    for row in rows:
        print(f"{row['index']:>5}  {row['name']:<28} {row['type']:<22} {row['block']:<8} {row['parameters']:>10}  "
              f"{row['output_shape']}")
    return 0
