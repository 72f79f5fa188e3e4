"""train-head: stage two, a head fitted on cached features (or several compared: --head auto)."""

from __future__ import annotations

import argparse
import contextlib
import json

from pipeline import api
from pipeline.cli.flags import add_declared, add_flag, stage_keywords
from pipeline.cli.printing import elapsed, print_run
from pipeline.errors import PipelineError
from pipeline.options import Option

NAME = "train-head"
HELP = "stage two: fit a head on cached features"
INTERRUPTED = "no run was saved (a run is written only when complete); rerun the command to train it"
DECLARED = api.train_head  # its flags: this function's declarations (calls go through api, patchable)


def add(parser: argparse.ArgumentParser) -> None:
    add_declared(parser, DECLARED)
    add_flag(parser, "json", Option("print the run summary as JSON"))


def run(args: argparse.Namespace) -> int:
    flags = stage_keywords(args, DECLARED, "features") | {"assert_accuracy_at_least": None}  # gated after
    features = args.features
    if features is None:  # the cache written last: say which, before the work
        from pipeline.cache.reader import latest_cache

        with contextlib.suppress(PipelineError):  # none: train_head says so
            features = latest_cache(args.cache)
            if not args.json:
                print(f"features: {features.name} (the cache written last; --features NAME or BACKBONE:SIZE:LAYER "
                      "chooses another, `caches` lists them)", flush=True)
    trained = api.train_head(features, **flags)
    summary = trained.summary
    if trained.comparison is not None:
        from pipeline.training.auto import comparison_text

        if args.json:
            print(json.dumps({"run": str(summary.directory), "chosen": summary.config["head"]["kind"],
                              "comparison": str(trained.comparison.path), "candidates": trained.comparison.rows},
                             indent=2))
        else:
            print(comparison_text(trained.comparison))
        api.check_accuracy_at_least(trained, args.assert_accuracy_at_least)
        return 0
    print_run(summary, args.json, f"trained {summary.config['head']['kind']} head: {elapsed(args):.1f} s in all, "
              f"{summary.seconds:.1f} s fitting ({summary.config['read']})")
    api.check_accuracy_at_least(trained, args.assert_accuracy_at_least)
    return 0
