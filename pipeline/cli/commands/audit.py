"""audit: label suspects and (cross-split) duplicates, from a cache."""

from __future__ import annotations

import argparse
import json

from pipeline import api, summaries
from pipeline.cli.flags import JSON, add_declared, add_flag, stage_keywords

NAME = "audit"
HELP = "label suspects and (cross-split) duplicates found from a cache"
INTERRUPTED = "no audit was written (its folder appears only when complete)"
DECLARED = api.audit  # its flags: this function's declarations (calls go through api, patchable)


def add(parser: argparse.ArgumentParser) -> None:
    add_declared(parser, DECLARED)
    add_flag(parser, "json", JSON)


def run(args: argparse.Namespace) -> int:
    summary = api.audit(args.features, **stage_keywords(args, DECLARED, "features"))
    if args.json:
        print(json.dumps({"directory": str(summary.directory), "seconds": round(summary.seconds, 2)}
                         | summary.details, indent=2))
        return 0
    print(summaries.audit_text(summary))
    return 0
