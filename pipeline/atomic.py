"""Files that appear whole or not at all, and OS-level failures as one line with the way out.

Every file the pipeline writes or rewrites goes through `replacing`: it is written under a hidden
temporary name beside its final place and renamed over it when complete, so a killed process,
a full disk or a read-only folder never leaves a half-written file under a real name.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

TEMPORARY_MARK = ".tmp"  # `.<name>.<pid>.tmp`: never a visible name, removed by the next writer

_WAY_OUT = {
    errno.ENOSPC: "the disk is full: free some space (or write elsewhere)",
    errno.EDQUOT: "the disk quota is exceeded: free some space",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.EACCES: "permission denied: choose a location you can write to",
    errno.EPERM: "permission denied: choose a location you can write to",
    errno.ENAMETOOLONG: "the name is too long for the file system: choose a shorter one",
    errno.ENOENT: "a folder on the way does not exist: create it or fix the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
}


def one_line(message: object) -> str:
    """A library message folded into one line (HDF5 and Keras messages span several)."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text or type(message).__name__


def _reason(error: OSError) -> tuple[str, str | None]:
    """The OS's reason for a failure, and what the user can do about it where we know."""
    return error.strerror or one_line(error), _WAY_OUT.get(error.errno or -1)


def os_error_message(error: OSError, action: str = "could not write") -> str:
    """`could not write PATH: reason (what to do)`, one line."""
    target = error.filename if error.filename is not None else ""
    reason, way_out = _reason(error)
    return one_line(f"{action} {target}: {reason}" + (f" ({way_out})" if way_out else ""))


def write_error(path: Path, error: OSError, after: str = "nothing half-written was left") -> PipelineError:
    reason, way_out = _reason(error)
    return PipelineError(one_line(f"could not write {path}: {reason}; {after}: {way_out or 'check the location'}, "
                                  "then rerun the same command to resume"))


def temporary_name(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_MARK}{suffix}")


def probe_writable(directory: Path) -> None:
    """Create and remove a hidden file in `directory`; raises OSError when that fails (missing
    folder, read-only, full, no permission)."""
    probe = temporary_name(Path(directory) / ".write-test")
    probe.write_bytes(b"")
    probe.unlink()


@contextmanager
def replacing(path: Path, durable: bool = False, after: str = "nothing half-written was left",
              suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` in one rename. `durable`
    syncs the file and its folder to disk first (for cache shards); `suffix` ends the temporary
    name for writers that insist on one (Keras' `.weights.h5`). An OSError becomes a one-line
    PipelineError and the temporary file is removed."""
    path = Path(path)
    temporary = temporary_name(path, suffix)
    try:
        yield temporary
        if durable:
            _fsync(temporary, os.O_RDONLY)
        os.replace(temporary, path)
        if durable:
            _fsync(path.parent, os.O_RDONLY)
    except BaseException as error:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(error, OSError):
            raise write_error(path, error, after) from error
        raise


@contextmanager
def replacing_directory(path: Path, after: str = "nothing half-written was left") -> Iterator[Path]:
    """Yield a hidden staging directory (`.<name>.tmp-<pid>`) beside `path`; on success it
    replaces `path` in one rename (an earlier directory of that name is retired as
    `.<name>.old-<pid>` and removed). On failure the staging directory is removed."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        yield staging
        retired = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, retired)
        os.replace(staging, path)
        shutil.rmtree(retired, ignore_errors=True)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise write_error(path, error, after) from None
        raise


def write_text(path: Path, text: str) -> None:
    with replacing(path) as temporary:
        temporary.write_text(text)


def write_json(path: Path, content: Any, compact: bool = False) -> None:
    text = json.dumps(content, separators=(",", ":")) if compact else json.dumps(content, indent=2) + "\n"
    write_text(path, text)


def _fsync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
