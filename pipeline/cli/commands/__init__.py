"""One module per command, as git keeps builtin/commit.c: each has its NAME and HELP, `add` (its
flags: its stage function's declarations, plus --json), `run` (the call and what it prints) and
INTERRUPTED (what a Ctrl-C leaves behind). COMMANDS is their order in --help and docs/flags.md."""

from __future__ import annotations

from pipeline.cli.commands import (
    audit,
    caches,
    demo_data,
    embeddings,
    evaluate,
    export,
    extract,
    finetune,
    inspect_backbone,
    predict,
    report,
    runs,
    suggest,
    train_head,
)

COMMANDS = (extract, train_head, embeddings, audit, suggest, report, runs, caches, evaluate, finetune, predict,
            export, inspect_backbone, demo_data)
