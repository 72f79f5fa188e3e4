"""What several commands print alike: a run's summary, and the time a command took."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from pipeline import summaries


def print_run(summary: Any, as_json: bool, headline: str) -> None:
    if as_json:
        print(json.dumps({"run": str(summary.directory), "seconds": summary.seconds, "metrics": summary.metrics},
                         indent=2))
        return
    print(summaries.run_text(summary, headline))


def elapsed(args: argparse.Namespace) -> float:
    """Seconds since the command started: what a summary line reports as the time it took."""
    return time.perf_counter() - args.started
