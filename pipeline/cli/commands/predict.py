"""predict: top-k labels of images with any run."""

from __future__ import annotations

import argparse
import sys

from pipeline import api
from pipeline.cli.flags import add_declared, stage_keywords

NAME = "predict"
HELP = "top-k labels of images with any run"
INTERRUPTED = "no predictions were written"
DECLARED = api.predict  # its flags: this function's declarations (calls go through api, patchable)


def add(parser: argparse.ArgumentParser) -> None:
    add_declared(parser, DECLARED)


def run(args: argparse.Namespace) -> int:
    from pipeline.serving.predict import predictions_table

    results = api.predict(args.model, args.images, **stage_keywords(args, DECLARED, "run", "images"))
    print(predictions_table(results))
    failed = sum(1 for r in results if r.error)
    if failed:
        print(f"error: {failed} of {len(results)} files could not be read as images", file=sys.stderr)
        return 1
    return 0
