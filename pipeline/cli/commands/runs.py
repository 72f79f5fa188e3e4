"""runs: every run side by side."""

from __future__ import annotations

import argparse
import json

from pipeline import api
from pipeline.cli.flags import JSON_PLAIN, add_declared, add_flag, stage_keywords

NAME = "runs"
HELP = "every run side by side, best validation accuracy first"
INTERRUPTED = None
DECLARED = api.list_runs  # its flags: this function's declarations (calls go through api, patchable)


def add(parser: argparse.ArgumentParser) -> None:
    add_declared(parser, DECLARED)
    add_flag(parser, "json", JSON_PLAIN)


def run(args: argparse.Namespace) -> int:
    from pipeline.report import runs_table

    rows = api.list_runs(args.models, **stage_keywords(args, DECLARED, "models"))
    print(json.dumps(rows, indent=2) if args.json else runs_table(rows))
    return 0
