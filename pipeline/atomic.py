"""Files that appear whole or not at all, and OS-level failures as one line with the way out.

Every file the pipeline writes or rewrites goes through `replacing`: it is written under a hidden
temporary name beside its final place and renamed over it when complete, so a killed process,
a full disk or a read-only folder never leaves a half-written file under a real name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
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


def way_out(error: OSError) -> str | None:
    """What the user can do about an OS failure, where we know."""
    return _reason(error)[1]


def os_error_message(error: OSError, action: str = "could not write") -> str:
    """`could not write PATH: reason (what to do)`, one line."""
    target = error.filename if error.filename is not None else ""
    reason, way_out = _reason(error)
    return one_line(f"{action} {target}: {reason}" + (f" ({way_out})" if way_out else ""))


def write_error(path: Path, error: OSError, after: str = "nothing half-written was left") -> PipelineError:
    reason, way_out = _reason(error)
    return PipelineError(one_line(f"could not write {path}: {reason}; {after}: {way_out or 'check the location'}, "
                                  "then rerun the same command to resume"))


NAME_MAX = 255  # bytes in a file name on the usual file systems


def temporary_name(path: Path, suffix: str = "") -> Path:
    """`.<name>.<pid>.tmp<suffix>` beside `path`; where that would pass NAME_MAX bytes (a valid
    name near the limit), the name part is shortened and a hash of the whole name keeps it unique."""
    tail = f".{os.getpid()}{TEMPORARY_MARK}{suffix}"
    name = path.name
    if len(f".{name}{tail}".encode()) > NAME_MAX:
        digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
        name = os.fsencode(name)[:NAME_MAX - len(tail.encode()) - 18].decode("utf-8", "ignore") + "-" + digest
    return path.with_name(f".{name}{tail}")


PROBE_BYTES = 1 << 20  # what the writability probe writes: an empty file fits on a full disk


_TEMPORARY = re.compile(r"^\..+\.(?P<pid>\d+)" + re.escape(TEMPORARY_MARK) + r".*$")
ABANDONED_SECONDS = 3600  # a temporary file this old is abandoned whoever wrote it


def remove_abandoned_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files (`.<name>.<pid>.tmp...`) in `directory` that a killed process
    left: those whose process is gone from this host, or older than ABANDONED_SECONDS (a writer
    elsewhere). For folders written without a lock (a run's reports); returns what was removed."""
    removed = []
    now = time.time()
    for entry in Path(directory).glob(f".*{TEMPORARY_MARK}*"):
        match = _TEMPORARY.match(entry.name)
        try:
            if not match or not entry.is_file() or (process_alive(int(match["pid"]))
                                                    and now - entry.stat().st_mtime < ABANDONED_SECONDS):
                continue
            entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


def remove_dead_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files (`.<name>.<pid>.tmp<suffix>`, see temporary_name) that a killed
    writer left in `folder`: those whose process no longer runs. Returns what was removed."""
    removed = []
    pattern = re.compile(rf"^\..+\.(?P<pid>\d+){re.escape(TEMPORARY_MARK)}(\.[A-Za-z0-9]+)*$")
    with contextlib.suppress(OSError):
        for entry in Path(folder).iterdir():
            match = pattern.match(entry.name)
            if match and entry.is_file() and not entry.is_symlink() and not process_alive(int(match["pid"])):
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def probe_writable(directory: Path) -> None:
    """Create, fill with PROBE_BYTES and remove a hidden file in `directory`; raises OSError when
    that fails (missing folder, read-only, full, no permission)."""
    probe = temporary_name(Path(directory) / ".write-test")
    try:
        with open(probe, "wb") as handle:
            handle.write(bytes(PROBE_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        probe.unlink(missing_ok=True)


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
        failed = library_os_error(error)
        if failed is not None:
            raise write_error(path, failed, after) from None
        raise


def library_os_error(error: BaseException) -> OSError | None:
    """The OS failure inside a library's error that is not an OSError: h5py raises RuntimeError
    from File.close() when the disk fills ("... errno = 28, error message = 'No space left on
    device' ..."). None when the error names no errno."""
    if not isinstance(error, RuntimeError):
        return None
    found = re.search(r"errno = (\d+)", str(error))
    if not found or not int(found[1]):
        return None
    number = int(found[1])
    return OSError(number, os.strerror(number))


STAGING_LOCK = ".staging.lock"  # held (flock) by the process writing a staging directory


def staging_token() -> str:
    """`<pid>-<random>`: names a writer's staging directories. The PID alone is not unique where
    processes in two PID namespaces (two containers) share a folder."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


@contextmanager
def replacing_directory(path: Path, after: str = "nothing half-written was left") -> Iterator[Path]:
    """Yield a hidden staging directory (`.<name>.tmp-<pid>-<random>`) beside `path`; on success it
    replaces `path` in one step and an earlier directory of that name is removed. On failure the
    staging directory is removed.

    While it works, the writer holds an exclusive lock on the staging directory's STAGING_LOCK
    file: ownership that every process sharing the folder can see (another PID namespace, another
    NFS client), where a PID is not (see `staging_is_abandoned`). It renames in only the staging
    directory whose lock file is the one it holds. An earlier `path` is swapped with the staging
    directory in one rename (Linux renameat2 RENAME_EXCHANGE), so the old or the new directory is
    whole under `path` at every instant; where the file system cannot swap, the old one is moved
    aside first, and a writer killed between the two renames leaves it to be put back by the next
    (runs.files.remove_leftovers)."""
    path = Path(path)
    token = staging_token()
    staging = path.with_name(f".{path.name}.tmp-{token}")
    lock = None
    try:
        lock = _locked_directory(staging)
        yield staging
        with _swapping_in(path.parent):  # two writers of one name (threads or processes) swap in turn
            _check_still_ours(staging, lock)
            if path.exists() and _exchange(staging, path):
                (path / STAGING_LOCK).unlink(missing_ok=True)
                shutil.rmtree(staging, ignore_errors=True)  # the old directory, now under the staging name
                return
            retired = path.with_name(f".{path.name}.old-{token}")
            if path.exists():
                os.replace(path, retired)
            os.replace(staging, path)
            (path / STAGING_LOCK).unlink(missing_ok=True)
            shutil.rmtree(retired, ignore_errors=True)
    except BaseException as error:
        lost = lock is not None and not staging.is_dir()
        if lock is not None and _holds(staging, lock):
            shutil.rmtree(staging, ignore_errors=True)
        if lost and not isinstance(error, PipelineError):
            raise _lost(staging) from None
        if isinstance(error, OSError):
            raise write_error(path, error, after) from None
        raise
    finally:
        if lock is not None:
            lock.close()


@contextmanager
def _swapping_in(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` itself (flock on the directory) while a finished directory is
    swapped in: the check that the staging directory is still ours, the rename and the removal of
    the old one happen as one step for every writer of that folder, in this process or another."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _holds(staging: Path, lock: Any) -> bool:
    """Whether `staging`'s lock file is the very file `lock` has open (same device and inode)."""
    try:
        found = os.stat(staging / STAGING_LOCK, follow_symlinks=False)
    except OSError:
        return False
    held = os.fstat(lock.fileno())
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


def _check_still_ours(staging: Path, lock: Any) -> None:
    if not _holds(staging, lock):
        raise _lost(staging)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one rename (Linux renameat2 with RENAME_EXCHANGE). False where the C
    library, the kernel or the file system cannot (the caller renames in two steps)."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    number = ctypes.get_errno()
    if number in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(number, os.strerror(number), str(second))


def _locked_directory(staging: Path) -> Any:
    """Make `staging` with its lock file already locked: the directory is made under another name
    and renamed into place once locked, so no other process ever sees it unlocked. Returns the
    open lock file (closing it releases the lock)."""
    making = staging.with_name(staging.name.replace(".tmp-", ".new-"))
    making.mkdir()  # the token makes the name this writer's alone
    lock = open(making / STAGING_LOCK, "w")  # noqa: SIM115 - held until the rename into place
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(making, staging)
    except BaseException:
        lock.close()
        shutil.rmtree(making, ignore_errors=True)
        raise
    return lock


def _lost(staging: Path) -> PipelineError:
    return PipelineError(f"{staging} was deleted or replaced by another process while this run was being written: "
                         "nothing was saved; rerun the command (and check what else cleans that folder)")


def open_regular(path: Path, flags: int = os.O_RDONLY, mode: int = 0o666, follow_links: bool = False) -> int:
    """A file descriptor for `path` only if it is a regular file: opened without blocking (a FIFO
    would block the open until a writer came) and, unless `follow_links` (image files: a link to
    an image is read), without following a final symlink. OSError (EINVAL) for a FIFO, a device,
    a socket or a directory."""
    descriptor = os.open(path, flags | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW), mode)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(descriptor, True)
        return descriptor
    except BaseException:
        os.close(descriptor)
        raise


def staging_is_abandoned(staging: Path) -> bool:
    """True when no live process holds `staging`'s lock (its writer died); False while one does,
    for a directory without a lock file (made by an older version: see runs.remove_leftovers), and
    for a lock that is not a regular file (no writer of this pipeline made it; never waited on)."""
    try:
        handle = os.fdopen(open_regular(Path(staging) / STAGING_LOCK))
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def write_text(path: Path, text: str) -> None:
    with replacing(path) as temporary:
        temporary.write_text(text)


def write_json(path: Path, content: Any, compact: bool = False) -> None:
    text = json.dumps(content, separators=(",", ":")) if compact else json.dumps(content, indent=2) + "\n"
    write_text(path, text)


def read_json(path: Path) -> Any:
    """A JSON file as written by write_json, or by anyone: OSError when it cannot be read or is not
    a regular file (a FIFO is never waited on), ValueError when it is not JSON, nested too deeply
    included (json raises RecursionError)."""
    with os.fdopen(open_regular(Path(path)), encoding="utf-8") as handle:
        text = handle.read()
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _fsync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
