"""report: one offline HTML page of a run and/or an audit."""

from __future__ import annotations

import argparse
import json

from pipeline import api, summaries
from pipeline.cli.flags import JSON, add_declared, add_flag, stage_keywords

NAME = "report"
HELP = ("one offline HTML page of a run and/or an audit: metrics, the confusion matrix's images, errors, suspects, "
        "unknowns, the map")
INTERRUPTED = None
DECLARED = api.report_page  # its flags: this function's declarations (calls go through api, patchable)


def add(parser: argparse.ArgumentParser) -> None:
    add_declared(parser, DECLARED)
    add_flag(parser, "json", JSON)


def run(args: argparse.Namespace) -> int:
    found = api.report_page(args.model, **stage_keywords(args, DECLARED, "model"))
    if args.json:
        print(json.dumps({"path": str(found.path), "images": found.images, "missing": found.missing,
                          "thumbnails": found.thumbnails, "sections": found.sections, "notes": found.notes,
                          "screenshot": None if found.screenshot is None else str(found.screenshot),
                          "console_errors": found.console_errors,
                          "seconds": round(found.seconds, 2)}, indent=2))
        return 0
    print(summaries.report_text(found))
    return 0
