"""evaluate: a run's metrics and reports again, from the cache (or from its images: --tta)."""

from __future__ import annotations

import argparse

from pipeline import api
from pipeline.cli.flags import JSON_PLAIN, add_declared, add_flag, stage_keywords
from pipeline.cli.printing import print_run

NAME = "evaluate"
HELP = "recompute a run's metrics and reports from the cache"
INTERRUPTED = "the run's metrics and reports are as they were"
DECLARED = api.evaluate  # its flags: this function's declarations (calls go through api, patchable)


def add(parser: argparse.ArgumentParser) -> None:
    add_declared(parser, DECLARED)
    add_flag(parser, "json", JSON_PLAIN)


def run(args: argparse.Namespace) -> int:
    summary = api.evaluate(args.model, **stage_keywords(args, DECLARED, "run")).summary
    where = f"{args.split} reports written" + ("" if args.tta == "none" else f" to {summary.directory}")
    print_run(summary, args.json, f"evaluated {args.model.name} ({where})")
    return 0
