"""extract: stage one, the feature cache of an image folder (or a table of images)."""

from __future__ import annotations

import argparse
import json

from pipeline import api, summaries
from pipeline.cli.flags import JSON, add_declared, add_flag, stage_keywords

NAME = "extract"
HELP = "stage one: cache backbone features of an image folder"
INTERRUPTED = "finished shards are kept; rerun the same command to resume"
DECLARED = api.extract  # its flags: this function's declarations (calls go through api, patchable)


def add(parser: argparse.ArgumentParser) -> None:
    add_declared(parser, DECLARED)
    add_flag(parser, "json", JSON)


def run(args: argparse.Namespace) -> int:
    cache = api.extract(args.data, **stage_keywords(args, DECLARED, "data"))
    summary = cache.summary
    if args.json:
        print(json.dumps(summary.as_dict() | {"skipped_images": summary.skipped}, indent=2))
        return 0
    print(summaries.extract_text(summary))
    return 0
