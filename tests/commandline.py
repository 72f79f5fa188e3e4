"""The command line as a user meets it: run in a fresh process (`run_cli`), or by the test's own
process (`in_process`) where a fresh one is not what a test is about; and its one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python run_pipeline.py ARGS` in a fresh process."""
    return subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), *args], cwd=cwd,
                          capture_output=True, text=True)


def in_process(capsys: Any, *args: str) -> subprocess.CompletedProcess:
    """The command line run by this test's process (`pipeline.cli.main`, TensorFlow already imported
    here), reported as `run_cli` reports a fresh one: the exit code and what Python printed (`capsys`,
    the test's fixture). For what a command does and says; a fresh Python (seconds of CPU to import
    TensorFlow) stays for what only a fresh one shows: native libraries' lines on the real stderr,
    start-up, signals, several processes at once."""
    from pipeline.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as stop:  # argparse's refusals
        code = stop.code if isinstance(stop.code, int) else 1
    said = capsys.readouterr()
    return subprocess.CompletedProcess(["run_pipeline.py", *args], code, said.out, said.err)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line a failed command printed (and nothing else, no traceback)."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def dead_pid() -> int:
    """The PID of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# The first lines of a script run with `python -I` where the project must not be importable: the
# dev venv has it installed editable, so -I alone would still find it.
WITHOUT_THE_PROJECT = r'''
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name == "pipeline" or name.startswith("pipeline."):
            raise ImportError("the project is not importable here")
sys.meta_path.insert(0, _Blocked())
'''

