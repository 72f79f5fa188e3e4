"""suggest: what to label next."""

from __future__ import annotations

import argparse
import json

from pipeline import api, summaries
from pipeline.cli.flags import add_declared, add_flag, stage_keywords
from pipeline.options import Option

NAME = "suggest"
HELP = "what to label next: unlabelled images ranked by a run's uncertainty and by diversity"
INTERRUPTED = None  # nothing was changed
DECLARED = api.suggest  # its flags: this function's declarations (calls go through api, patchable)


def add(parser: argparse.ArgumentParser) -> None:
    add_declared(parser, DECLARED)
    add_flag(parser, "json", Option("print the suggestions as JSON"))


def run(args: argparse.Namespace) -> int:
    found = api.suggest(args.features, **stage_keywords(args, DECLARED, "features"))
    if args.json:
        print(json.dumps({"path": None if found.path is None else str(found.path), "rows": found.rows,
                          "seconds": round(found.seconds, 2)} | found.details, indent=2))
        return 0
    print(summaries.suggest_text(found))
    return 0
