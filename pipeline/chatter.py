"""Keep TensorFlow's native start-up chatter off the user's terminal.

TensorFlow 2.21 and absl write lines such as `I0000 00:00:... cudart_stub.cc:31] Could not find
cuda drivers` from C++ straight to file descriptor 2, some before TF_CPP_MIN_LOG_LEVEL is read.
While a command runs, descriptor 2 is a pipe read by a thread that drops those lines and passes
every other line on; Python's own `sys.stderr` (the pipeline's messages, progress bars) writes
to the terminal directly. `--debug` shows everything.
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHATTER = re.compile(
    r"^(?:[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]"  # absl: I0000 00:00:1795... 12426 port.cc:153]
    r"|E\d{4} \d\d:\d\d:\d+\.\d+ +\d+ cuda_\w+\.cc:\d+\]"  # absl errors of the CUDA stubs on a CPU machine
    # absl errors of TensorFlow's JPEG decoder on damaged files (E0000 ... jpeg_mem.cc:...] Premature end
    # of JPEG data): the pipeline says what it did with such a file itself
    r"|E\d{4} \d\d:\d\d:\d+\.\d+ +\d+ jpeg_\w+\.cc:\d+\]"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IW] "  # TensorFlow's own: 2026-11-22 18:00:00.0: I tensorflow/...
    r"|To enable the following instructions:.*rebuild TensorFlow"
    r"|INFO: Created TensorFlow Lite XNNPACK delegate"
    # libjpeg's warnings on damaged JPEGs: the pipeline says what it did with such a file itself
    r"|Corrupt JPEG data: |Premature end of JPEG (?:file|data)|Warning: unknown JFIF revision number"
    r"|Improper call to JPEG library in state \d+$"  # a JPEG cut inside its headers
    # Ray's advice on actors restarted with arguments in the object store: the driver holds them
    r"|\[[\d :,-]+ E \d+ \d+\] core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the "
    r"object store"
    r")"
)


def is_chatter(line: str) -> bool:
    return CHATTER.match(line) is not None


# Libraries whose Python warnings are theirs to fix, not the user's (scikit-learn's convergence
# and API notices, matplotlib's layout notices): kept off stderr unless --debug.
QUIET_LIBRARIES = r"(sklearn|matplotlib|joblib)(\.|$)"


@contextmanager
def library_warnings_quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=QUIET_LIBRARIES)
        yield


@contextmanager
def native_chatter_filtered() -> Iterator[None]:
    """Filter descriptor 2 for the duration; a no-op when sys.stderr is not the process's own
    (under a test's capture) or when descriptor 2 cannot be duplicated."""
    if sys.stderr is not sys.__stderr__:
        yield
        return
    try:
        sys.stderr.flush()
        terminal = os.dup(2)
        read_end, write_end = os.pipe()
    except OSError:
        yield
        return
    previous = sys.stderr
    sys.stderr = _direct_stderr(terminal, previous.encoding)
    os.dup2(write_end, 2)
    os.close(write_end)
    forwarder = threading.Thread(target=_forward, args=(read_end, terminal), daemon=True, name="stderr-filter")
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # closes this process's write end of the pipe
        forwarder.join(timeout=2)  # children (joblib workers) may hold the pipe open: don't wait on them
        sys.stderr = previous


_DIRECT: list[io.TextIOWrapper] = []


def _direct_stderr(terminal: int, encoding: str | None) -> io.TextIOWrapper:
    """Python's own stderr while descriptor 2 is filtered: straight to the terminal. One for the
    process, never closed: a logging handler made during one filtered call (TensorFlow's) keeps
    writing to it after the call, from the Python API's many calls as from the command line's one."""
    if not _DIRECT:
        _DIRECT.append(io.TextIOWrapper(io.FileIO(os.dup(terminal), "w"), encoding=encoding,
                                        errors="backslashreplace", line_buffering=True))
    return _DIRECT[0]


def _forward(read_end: int, terminal: int) -> None:
    pending = b""
    with open(read_end, "rb", buffering=0) as pipe:
        while True:
            block = pipe.read(65536)
            if not block:
                break
            *lines, pending = (pending + block).split(b"\n")
            _write(terminal, lines)
    if pending:
        _write(terminal, [pending])
    os.close(terminal)


def _write(terminal: int, lines: list[bytes]) -> None:
    kept = [line for line in lines if not is_chatter(line.decode("utf-8", "replace"))]
    if kept:
        try:
            os.write(terminal, b"".join(line + b"\n" for line in kept))
        except OSError:
            pass


def kept_off(function: Any) -> Any:
    """A Python API function with TensorFlow's native start-up chatter (the cuInit line on a machine
    without a GPU, absl's notices) filtered from descriptor 2 while it runs, as the command line
    does. A no-op where stderr is not the process's own (a notebook, a test's capture)."""
    import functools

    from pipeline.errors import spoken_by_command_line

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if spoken_by_command_line():  # the command line filters (or, with --debug, shows) for itself
            return function(*args, **kwargs)
        with native_chatter_filtered():
            return function(*args, **kwargs)

    return wrapper
