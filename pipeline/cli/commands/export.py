"""export: a run as a model that needs no pipeline."""

from __future__ import annotations

import argparse
import json

from pipeline import api, summaries
from pipeline.cli.flags import JSON_PLAIN, add_declared, add_flag, stage_keywords

NAME = "export"
HELP = "a run as a model that needs no pipeline (keras, savedmodel, tflite, onnx)"
INTERRUPTED = "no export was written (an export appears only when complete)"
DECLARED = api.export  # its flags: this function's declarations (calls go through api, patchable)


def add(parser: argparse.ArgumentParser) -> None:
    add_declared(parser, DECLARED)
    add_flag(parser, "json", JSON_PLAIN)


def run(args: argparse.Namespace) -> int:
    summary = api.export(args.model, **stage_keywords(args, DECLARED, "run"))
    if args.json:
        print(json.dumps({"path": str(summary.path), "bytes": summary.bytes, "seconds": round(summary.seconds, 2)}
                         | summary.details, indent=2))
        return 0
    print(summaries.export_text(summary))
    return 0
