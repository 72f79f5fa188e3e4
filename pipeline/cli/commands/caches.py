"""caches: every feature cache, newest first."""

from __future__ import annotations

import argparse
import json

from pipeline import api
from pipeline.cli.flags import JSON_PLAIN, add_declared, add_flag

NAME = "caches"
HELP = "every feature cache: backbone, size, layers, images; newest first"
INTERRUPTED = None
DECLARED = api.list_caches  # its flags: this function's declarations (calls go through api, patchable)


def add(parser: argparse.ArgumentParser) -> None:
    add_declared(parser, DECLARED)
    add_flag(parser, "json", JSON_PLAIN)


def run(args: argparse.Namespace) -> int:
    from pipeline.cache.catalogue import caches_table

    rows = api.list_caches(args.cache)
    print(json.dumps(rows, indent=2) if args.json else caches_table(rows))
    return 0
