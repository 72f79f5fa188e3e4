"""The command line as a user meets it: run in a fresh process, and its one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python run_pipeline.py ARGS` in a fresh process."""
    return subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), *args], cwd=cwd,
                          capture_output=True, text=True)


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

