"""The command line (`run_pipeline.py` or `bottleneck-pipeline`): one module a command under
pipeline/cli/commands/, whose flags are built from its stage function's declarations
(pipeline/options.py, through pipeline/cli/flags.py); this module parses, runs the command and
turns the errors a user can cause into one line on stderr and a non-zero exit (--debug shows the
traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from collections.abc import Sequence

from pipeline import api  # noqa: F401 - the commands call it; tests reach it as pipeline.cli.api
from pipeline.chatter import library_warnings_quiet, native_chatter_filtered
from pipeline.cli.commands import COMMANDS
from pipeline.errors import PipelineError, speak_as_command_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Transfer-learning image classification in stages: extract caches a frozen backbone's features "
                    "of an image folder once; train-head fits heads on them in seconds; finetune trains a head with "
                    "its backbone end to end; predict and export use any run.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(command.NAME, help=command.HELP)
        command.add(sub)
        sub.set_defaults(handler=command.run)
    return parser


def flag_tables() -> str:
    """docs/flags.md: every command's flags with their defaults and help, from the parser itself
    (`make docs` writes it; a test checks that it matches)."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    lines = ["# Flags", "",
             "Generated from the argument parser by `make docs` (do not edit by hand). The same names in",
             "snake_case are the keyword arguments of the Python functions (`pipeline.extract(data, image_size=...)`);",
             "`--no-progress` is `progress=False` there.", ""]
    for name, command in commands.choices.items():
        lines += [f"## `{name}`", "", f"{helps.get(name, '')}.", "", "| flag | default | meaning |", "|---|---|---|"]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = ", ".join(action.option_strings) or action.metavar or action.dest
            if action.option_strings and action.nargs != 0:
                flag += f" {action.metavar or action.dest.upper()}"
            flag = flag.replace("|", "\\|")
            if action.required or (not action.option_strings and action.nargs in ("+", None)):
                default = "required"
            elif action.nargs == 0:
                default = "off"
            else:
                default = "" if action.default is None else f"`{action.default}`"
            choices = f" ({' / '.join(map(str, action.choices))})" if action.choices else ""
            meaning = (action.help or "").replace("|", "\\|").replace("\n", " ") + choices
            lines.append(f"| `{flag}` | {default} | {meaning} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    args.started = started
    with contextlib.ExitStack() as cleanup:
        speak_as_command_line()  # advice in flags, and the summaries printed here rather than by the API
        cleanup.callback(speak_as_command_line, False)
        if not args.debug:
            cleanup.enter_context(native_chatter_filtered())
            cleanup.enter_context(library_warnings_quiet())
        return _run(args)


def buried_pipeline_error(error: BaseException) -> str | None:
    """Our one-line message where TensorFlow or Keras re-raised it inside an error of its own (a
    PipelineError raised while tf.data or Keras pulled examples, forty lines of context around it)."""
    found = re.findall(r"PipelineError: ([^\n]+)", str(error))
    return found[-1].strip() if found else None


# What a Ctrl-C leaves behind, by command (each command's INTERRUPTED): every command writes its
# results whole or not at all.
INTERRUPTED = {command.NAME: command.INTERRUPTED for command in COMMANDS if command.INTERRUPTED}


def _run(args: argparse.Namespace) -> int:
    from pipeline.atomic import one_line, os_error_message

    try:
        if hasattr(args, "backend"):
            from pipeline import backend

            backend.select(args.backend)  # before anything imports Keras
        return args.handler(args)
    except PipelineError as error:
        if args.debug:
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    except OSError as error:  # a full disk, a read-only folder, a name too long: the user's to fix
        if args.debug:
            raise
        print(f"error: {os_error_message(error, 'could not use')}; rerun with --debug for details",
              file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - only to unbury our own message from a library's
        buried = buried_pipeline_error(error)
        if buried is None or args.debug:
            raise
        print(f"error: {buried}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"interrupted: {INTERRUPTED.get(args.command, 'nothing was changed')}", file=sys.stderr)
        return 130
