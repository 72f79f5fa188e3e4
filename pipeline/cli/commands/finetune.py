"""finetune: stage three, a head run trained end to end with its backbone."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline import api
from pipeline.cli.flags import JSON_PLAIN, add_declared, add_flag, stage_keywords
from pipeline.cli.printing import elapsed, print_run

NAME = "finetune"
HELP = "stage three: train the best head end to end with its backbone"
INTERRUPTED = ("no run was saved (a run is written only when complete; the head run is unchanged); rerun the command "
               "to fine-tune again")
DECLARED = api.finetune  # its flags: this function's declarations (calls go through api, patchable)


def add(parser: argparse.ArgumentParser) -> None:
    add_declared(parser, DECLARED)
    add_flag(parser, "json", JSON_PLAIN)


def run(args: argparse.Namespace) -> int:
    summary = api.finetune(args.run, **stage_keywords(args, DECLARED, "run")).summary
    before = summary.config["test_before_finetune"]
    tuned = summary.config["finetune"]
    on = " on cached " + tuned["trained_on"]["layer"] if tuned["trained_on"]["source"] != "images" else ""
    headline = (f"fine-tuned {summary.config['from']}{on} for {tuned['epochs_run']} epochs: "
                f"{elapsed(args) / 60:.1f} min in all, {summary.seconds / 60:.1f} min training (kept epoch "
                f"{tuned['kept_epoch']}, chosen on validation accuracy; 0 = unchanged); validation accuracy "
                f"before {tuned['validation_before']['accuracy']:.2%}, after "
                f"{summary.metrics['validation'].get('accuracy', float('nan')):.2%}; "
                f"test accuracy before {before.get('accuracy', float('nan')):.2%}, "
                f"after {summary.metrics['test'].get('accuracy', float('nan')):.2%} (both of the model from "
                f"pixels, end to end{head_run_figure(summary.config)})")
    print_run(summary, args.json, headline)
    return 0


def head_run_figure(config: dict[str, Any]) -> str:
    """The head run's own test accuracy, scored from its cached features, where it was recorded."""
    figure = (config.get("head_run_accuracy") or {}).get("test")
    return "" if figure is None else f"; the head run's own {figure:.2%} was scored from its cached features"
