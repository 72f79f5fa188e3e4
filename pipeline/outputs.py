"""Folders and files a user names with --out: a command writes only what it owns.

`check_output_folder` is the rule for every command that writes a folder the user names (audit,
export): never a folder that is, or holds, an input (a cache, the image folder, a run); and, for a
command that replaces its folder whole (audit), never an existing folder holding files of anything
else (it must be empty, or an earlier output of that command, known by its marker file).
What a killed writer left beside the folder is cleared by runs.files.remove_leftovers.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pipeline import atomic
from pipeline.errors import PipelineError


def _inside_or_equal(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_folder(out: Path, flag: str, inputs: Iterable[tuple[str, Path]], replaces_whole: bool = False,
                        marker: str | None = None, what: str = "") -> Path:
    """`out`, resolved, once it is safe to write: not equal to or above any of `inputs` (name,
    path), not a file, and where the command replaces it whole, empty or holding `marker`."""
    given = Path(out)
    resolved = given.resolve()
    if resolved.parent == resolved:
        raise PipelineError(f"{flag} {given} is the file system's root: name a folder of its own")
    for name, path in inputs:
        if path is None or str(path) == "":
            continue
        held = Path(path).resolve()
        if _inside_or_equal(held, resolved):
            where = "is" if held == resolved else "holds"
            raise PipelineError(f"{flag} {given} {where} the {name} ({held}): writing there could replace files "
                                "this command did not write; name a new folder elsewhere")
    if resolved.exists() and not resolved.is_dir():
        raise PipelineError(f"{flag} {given} is a file: name a folder")
    if replaces_whole and resolved.is_dir():
        entries = [entry for entry in resolved.iterdir() if entry.name != atomic.STAGING_LOCK]
        if entries and (marker is None or not (resolved / marker).is_file()):
            raise PipelineError(f"{flag} {given} already holds files that are not {what} (no {marker} in it), and "
                                "this command replaces its folder whole: name a new or empty folder, or an earlier "
                                f"output of {what}")
    return resolved
