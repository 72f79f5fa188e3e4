"""embeddings: a cache's vectors with their ids, for other tools (Parquet or npz)."""

from __future__ import annotations

import argparse
import json

from pipeline import api
from pipeline.cli.flags import JSON, add_declared, add_flag, stage_keywords

NAME = "embeddings"
HELP = "a cache's embeddings with their ids, for other tools (parquet, npz)"
INTERRUPTED = "no embeddings file was written (it appears only when complete)"
DECLARED = api.embeddings  # its flags: this function's declarations (calls go through api, patchable)


def add(parser: argparse.ArgumentParser) -> None:
    add_declared(parser, DECLARED)
    add_flag(parser, "json", JSON)


def run(args: argparse.Namespace) -> int:
    written = api.embeddings(args.features, args.out, **stage_keywords(args, DECLARED, "features", "out"))
    if args.json:
        print(json.dumps({"path": str(written.path), "rows": written.rows, "dimension": written.dimension,
                          "seconds": round(written.seconds, 2)} | written.metadata, indent=2))
        return 0
    print(f"embeddings: {written.rows} images x {written.dimension} values in {written.path} "
          f"({written.path.stat().st_size / 2**20:.1f} MB, {written.seconds:.1f} s); ids are content sha256")
    return 0
